//! The vhost files of this instance in nginx's sites directory: one file per preview, named
//! `previewd.<instance>.<slug>.conf` (dots cannot occur in either name, so instances never
//! claim each other's files), always written atomically.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::preview::{InstanceName, Slug};

pub struct SitesDir {
    dir: PathBuf,
    prefix: String,
}

impl SitesDir {
    pub fn new(dir: PathBuf, instance: &InstanceName) -> Self {
        Self { dir, prefix: format!("previewd.{instance}.") }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_for(&self, slug: &Slug) -> PathBuf {
        self.dir.join(format!("{}{slug}.conf", self.prefix))
    }

    pub fn read(&self, slug: &Slug) -> io::Result<Option<String>> {
        match std::fs::read_to_string(self.path_for(slug)) {
            Ok(text) => Ok(Some(text)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Writes, or with `None` removes, the vhost of one preview.
    pub fn set(&self, slug: &Slug, content: Option<&str>) -> io::Result<()> {
        let path = self.path_for(slug);
        match content {
            Some(content) => write_atomic(&path, content.as_bytes()),
            None => match std::fs::remove_file(&path) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
                _ => Ok(()),
            },
        }
    }

    /// Deletes temp files of this instance that an interrupted write left behind.
    pub fn remove_temp_files(&self) -> io::Result<()> {
        let temp_prefix = format!(".{}", self.prefix);
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let is_temp =
                entry.file_name().to_str().is_some_and(|n| n.starts_with(&temp_prefix) && n.ends_with(".tmp"));
            if is_temp {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    /// The previews that have a vhost file of this instance.
    pub fn slugs(&self) -> io::Result<Vec<Slug>> {
        let mut slugs = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let slug = name
                .to_str()
                .and_then(|name| name.strip_prefix(&self.prefix))
                .and_then(|rest| rest.strip_suffix(".conf"))
                .and_then(|slug| Slug::parse(slug).ok());
            slugs.extend(slug);
        }
        slugs.sort();
        Ok(slugs)
    }
}

/// Writes a file so that readers see either the old or the new content, never a part: a temp
/// file beside it (dot-named, so nginx's `include dir/*` globs skip it), fsync, rename.
pub fn write_atomic(path: &Path, content: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temp = dir.join(format!(".{name}.{:08x}.tmp", rand::random::<u32>()));
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(content)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        std::fs::remove_file(&temp).ok();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sites(dir: &Path, instance: &str) -> SitesDir {
        SitesDir::new(dir.to_owned(), &InstanceName::parse(instance).unwrap())
    }

    #[test]
    fn set_writes_reads_and_removes_one_file_per_preview() {
        let dir = tempfile::tempdir().unwrap();
        let sites = sites(dir.path(), "a");
        let slug = Slug::parse("test").unwrap();
        sites.set(&slug, Some("server {}")).unwrap();
        assert_eq!(sites.read(&slug).unwrap().as_deref(), Some("server {}"));
        assert!(dir.path().join("previewd.a.test.conf").exists());
        sites.set(&slug, None).unwrap();
        sites.set(&slug, None).unwrap();
        assert_eq!(sites.read(&slug).unwrap(), None);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no temp file left behind");
    }

    #[test]
    fn slugs_lists_only_this_instances_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "previewd.a.one.conf",
            "previewd.a-b.two.conf",
            "previewd.a.conf",
            "other.conf",
            ".previewd.a.x.conf.1.tmp",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        assert_eq!(sites(dir.path(), "a").slugs().unwrap(), vec![Slug::parse("one").unwrap()]);
        assert_eq!(sites(dir.path(), "a-b").slugs().unwrap(), vec![Slug::parse("two").unwrap()]);
    }

    #[test]
    fn remove_temp_files_deletes_only_this_instances_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        for name in [".previewd.a.x.conf.0001.tmp", ".previewd.b.x.conf.0001.tmp", "previewd.a.x.conf"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        sites(dir.path(), "a").remove_temp_files().unwrap();
        let mut left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, [".previewd.b.x.conf.0001.tmp", "previewd.a.x.conf"]);
    }
}
