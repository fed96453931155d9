//! The build context `previewd launch --build DIR` sends: DIR as a tar stream, minus what its
//! `.dockerignore` excludes, with Docker's rules
//! (<https://docs.docker.com/build/concepts/context/#dockerignore-files>). This module owns
//! reading `.dockerignore` and writing the tar into any
//! [`Write`] as the directory is walked, so a context is never held in memory.
//!
//! The rules are `crate::build::dockerignore`'s (the server applies them to GitHub's tarballs).
//!
//! The tar keeps symlinks as symlinks (never followed), file modes, owners and mtimes; sockets,
//! fifos and devices are skipped. Entries are in name order, so one tree gives one tar.

use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::build::dockerignore::{ALWAYS_SENT, Ignore};

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("the build context {path} does not exist")]
    Missing { path: PathBuf },
    #[error("the build context {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path}:{line}: bad pattern `{pattern}`: {message}")]
    Pattern { path: PathBuf, line: usize, pattern: String, message: String },
    #[error("cannot read {path} for the build context: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Where the tar goes failed (for a request, it ended).
    #[error("cannot send the build context: {source}")]
    Write {
        #[source]
        source: io::Error,
    },
}

/// A directory to send as a build context, with its `.dockerignore` read.
#[derive(Debug)]
pub struct Context {
    root: PathBuf,
    ignore: Ignore,
}

impl Context {
    /// Checks `root` is a directory and reads its `.dockerignore` (none: nothing excluded).
    pub fn open(root: &Path) -> Result<Self, ContextError> {
        match fs::metadata(root) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(ContextError::NotADirectory { path: root.to_owned() }),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(ContextError::Missing { path: root.to_owned() });
            }
            Err(source) => return Err(ContextError::Read { path: root.to_owned(), source }),
        }
        let path = root.join(".dockerignore");
        let ignore = match fs::read_to_string(&path) {
            Ok(text) => Ignore::parse(&text).map_err(|err| ContextError::Pattern {
                path: path.clone(),
                line: err.line,
                pattern: err.pattern,
                message: err.message,
            })?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ignore::empty(),
            Err(source) => return Err(ContextError::Read { path, source }),
        };
        Ok(Self { root: root.to_owned(), ignore })
    }

    /// Writes the context as a tar into `out`, entry by entry as the directory is walked, then
    /// flushes `out` and hands it back. After an error what `out` got is not a whole tar.
    pub fn write_tar<W: Write>(&self, out: W) -> Result<W, ContextError> {
        let mut walk = Walk {
            ignore: &self.ignore,
            tar: tar::Builder::new(Tracked { inner: out, failed: false, closed: false }),
            pending: Vec::new(),
        };
        if let Err(err) = walk.directory(&self.root, Path::new(""), "", None) {
            // The builder finishes the tar when dropped: it must not look whole.
            walk.tar.get_mut().closed = true;
            return Err(err);
        }
        let mut tracked = walk.tar.into_inner().map_err(|source| ContextError::Write { source })?;
        tracked.inner.flush().map_err(|source| ContextError::Write { source })?;
        Ok(tracked.inner)
    }
}

/// The output, remembering whether a write failed: a failed tar call is then the output's
/// fault, not the file's.
struct Tracked<W> {
    inner: W,
    failed: bool,
    /// After a failed walk: no more writes.
    closed: bool,
}

impl<W: Write> Write for Tracked<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.closed {
            return Err(io::Error::other("the build context failed"));
        }
        self.inner.write(buf).inspect_err(|_| self.failed = true)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|_| self.failed = true)
    }
}

/// An excluded directory the walk went into, its header written only if something under it is.
struct Pending {
    path: PathBuf,
    name: PathBuf,
    meta: Metadata,
}

struct Walk<'a, W: Write> {
    ignore: &'a Ignore,
    tar: tar::Builder<Tracked<W>>,
    /// Excluded directories above the current one with nothing sent under them yet, outermost first.
    pending: Vec<Pending>,
}

impl<W: Write> Walk<'_, W> {
    /// Sends what is under `path` (`name` in the tar, `text` for the rules); `inherited` is the
    /// last rule matching `name` or a parent of it.
    fn directory(
        &mut self,
        path: &Path,
        name: &Path,
        text: &str,
        inherited: Option<usize>,
    ) -> Result<(), ContextError> {
        let read = |source: io::Error| ContextError::Read { path: path.to_owned(), source };
        let mut entries = fs::read_dir(path).map_err(read)?.collect::<Result<Vec<_>, _>>().map_err(read)?;
        entries.sort_by_key(fs::DirEntry::file_name);
        for entry in entries {
            let file_name = entry.file_name();
            let lossy = file_name.to_string_lossy();
            let child_text = if text.is_empty() { lossy.into_owned() } else { format!("{text}/{lossy}") };
            let child_name = name.join(&file_name);
            let child_path = entry.path();
            let meta = match fs::symlink_metadata(&child_path) {
                Ok(meta) => meta,
                // Gone since the directory was listed.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(ContextError::Read { path: child_path, source }),
            };
            let last = inherited.max(self.ignore.last_match(&child_text));
            let always = text.is_empty() && !meta.is_dir() && ALWAYS_SENT.contains(&child_text.as_str());
            let excluded = !always && self.ignore.excludes(last);
            let kind = meta.file_type();
            if kind.is_dir() {
                if !excluded {
                    self.flush_pending()?;
                    self.header_only(&child_path, &child_name, &meta)?;
                    self.directory(&child_path, &child_name, &child_text, last)?;
                } else if self.ignore.may_reinclude_under(&child_text) {
                    let depth = self.pending.len();
                    self.pending.push(Pending { path: child_path.clone(), name: child_name.clone(), meta });
                    self.directory(&child_path, &child_name, &child_text, last)?;
                    self.pending.truncate(depth);
                }
            } else if excluded {
                continue;
            } else if kind.is_file() {
                self.flush_pending()?;
                self.file(&child_path, &child_name)?;
            } else if kind.is_symlink() {
                self.flush_pending()?;
                self.symlink(&child_path, &child_name, &meta)?;
            }
            // Sockets, fifos and devices are not sent, as Docker does.
        }
        Ok(())
    }

    /// The headers of the excluded directories above an entry about to be sent.
    fn flush_pending(&mut self) -> Result<(), ContextError> {
        for pending in std::mem::take(&mut self.pending) {
            self.header_only(&pending.path, &pending.name, &pending.meta)?;
        }
        Ok(())
    }

    /// A directory's entry.
    fn header_only(&mut self, path: &Path, name: &Path, meta: &Metadata) -> Result<(), ContextError> {
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
        let result = self.tar.append_data(&mut header, name, io::empty());
        result.map_err(|err| self.failure(path, err))
    }

    fn file(&mut self, path: &Path, name: &Path) -> Result<(), ContextError> {
        let read = |source: io::Error| ContextError::Read { path: path.to_owned(), source };
        let file = File::open(path).map_err(read)?;
        let meta = file.metadata().map_err(read)?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        // The header's size is the one written, even if the file changes meanwhile.
        let body = Exactly(file.take(meta.len()));
        let result = self.tar.append_data(&mut header, name, body);
        result.map_err(|err| self.failure(path, err))
    }

    fn symlink(&mut self, path: &Path, name: &Path, meta: &Metadata) -> Result<(), ContextError> {
        let target = fs::read_link(path).map_err(|source| ContextError::Read { path: path.to_owned(), source })?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
        let result = self.tar.append_link(&mut header, name, target);
        result.map_err(|err| self.failure(path, err))
    }

    /// A failed tar call: the output's fault if a write failed, else `path`'s.
    fn failure(&self, path: &Path, source: io::Error) -> ContextError {
        if self.tar.get_ref().failed {
            ContextError::Write { source }
        } else {
            ContextError::Read { path: path.to_owned(), source }
        }
    }
}

/// A file's first `limit` bytes, an error if it has fewer (it shrank while being sent).
struct Exactly(io::Take<File>);

impl Read for Exactly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.0.read(buf)?;
        if read == 0 && !buf.is_empty() && self.0.limit() > 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while being read"));
        }
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// (path, (type, mode, link target)) per entry of a tar.
    fn entries(tar: &[u8]) -> BTreeMap<String, (tar::EntryType, u32, Option<String>)> {
        let mut archive = tar::Archive::new(tar);
        let mut found = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let header = entry.header();
            let link = entry.link_name().unwrap().map(|l| l.to_string_lossy().into_owned());
            let path = entry.path().unwrap().to_string_lossy().trim_end_matches('/').to_owned();
            found.insert(path, (header.entry_type(), header.mode().unwrap() & 0o7777, link));
        }
        found
    }

    #[test]
    fn a_directory_becomes_a_tar_of_what_dockerignore_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let write = |path: &str, text: &str| {
            let path = root.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        };
        write(
            ".dockerignore",
            "# built here\nDockerfile\n.dockerignore\ntarget\n*.log\n!keep.log\nnode_modules\n!node_modules/kept/**\n",
        );
        write("Dockerfile", "FROM scratch\n");
        write("src/main.sh", "echo hi\n");
        fs::set_permissions(root.join("src/main.sh"), fs::Permissions::from_mode(0o750)).unwrap();
        write("app.log", "noise");
        write("keep.log", "signal");
        write("target/debug/app", "binary");
        write("node_modules/other/a.js", "a");
        write("node_modules/kept/lib/b.js", "b");
        fs::create_dir(root.join("empty")).unwrap();
        symlink("src/main.sh", root.join("link")).unwrap();
        symlink("/nowhere", root.join("dangling")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();

        let tar = Context::open(root).unwrap().write_tar(Vec::new()).unwrap();
        let found = entries(&tar);
        let names: Vec<&str> = found.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                ".dockerignore",
                "Dockerfile",
                "dangling",
                "empty",
                "keep.log",
                "link",
                "node_modules",
                "node_modules/kept",
                "node_modules/kept/lib",
                "node_modules/kept/lib/b.js",
                "src",
                "src/main.sh",
            ]
        );
        assert_eq!(found["src/main.sh"], (tar::EntryType::Regular, 0o750, None));
        assert_eq!(found["link"].0, tar::EntryType::Symlink);
        assert_eq!(found["link"].2.as_deref(), Some("src/main.sh"));
        assert_eq!(found["dangling"].2.as_deref(), Some("/nowhere"));
        assert_eq!(found["node_modules"].0, tar::EntryType::Directory);
        let mut archive = tar::Archive::new(&tar[..]);
        let mut script = String::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.path().unwrap() == Path::new("src/main.sh") {
                entry.read_to_string(&mut script).unwrap();
            }
        }
        assert_eq!(script, "echo hi\n");
    }

    #[test]
    fn a_failing_output_is_a_write_error_and_a_missing_root_is_named() {
        #[derive(Debug)]
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), "a").unwrap();
        let err = Context::open(dir.path()).unwrap().write_tar(Broken).unwrap_err();
        assert!(matches!(err, ContextError::Write { .. }), "{err:?}");

        let missing = dir.path().join("nope");
        let err = Context::open(&missing).unwrap_err();
        assert!(matches!(err, ContextError::Missing { .. }) && err.to_string().contains("nope"), "{err}");
        let err = Context::open(&dir.path().join("a")).unwrap_err();
        assert!(matches!(err, ContextError::NotADirectory { .. }), "{err}");
    }
}
