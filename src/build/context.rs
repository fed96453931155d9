//! Build contexts from sources: a commit's tarball as GitHub serves it (gzip'd, every path under
//! one top directory `owner-repo-sha/`), or a tar uploaded by `previewd launch --build`. Reading
//! is pure over `Read`ers, so the rules are tested without Docker or GitHub:
//!
//! - [`read_repo_file`] finds the repository's `.previewd.yml` (a first, cheap pass: the file
//!   may move the context);
//! - [`write_context`] writes the `build.context` directory as a plain tar for Docker, checks that
//!   the Dockerfile is in it and that it stays under `builds.max_context`, and digests the files
//!   of `build.paths` (anywhere in the repository), so that a push changing none of them can
//!   reuse the last build.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

use super::dockerignore::{ALWAYS_SENT, Ignore};
use crate::config::builds::{PathFilter, TreePath};
use crate::config::repo_file::{MAX_REPO_FILE, REPO_FILE};

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("cannot read the source archive: {0}")]
    Read(#[source] io::Error),
    #[error("cannot write the build context: {0}")]
    Write(#[source] io::Error),
    #[error(
        "the build context is larger than builds.max_context ({limit} bytes); make it smaller (.dockerignore) or raise the limit"
    )]
    TooLarge { limit: u64 },
    #[error("{0} is larger than {MAX_REPO_FILE} bytes")]
    FileTooLarge(String),
    #[error("{0} is not UTF-8 text")]
    NotText(String),
    #[error("the source holds more than {limit} bytes of files in all (4 × builds.max_context)")]
    TreeTooLarge { limit: u64 },
    #[error("the build was stopped")]
    Stopped,
    #[error("the Dockerfile {0} is larger than 1 MiB")]
    DockerfileTooLarge(String),
    #[error(
        "the build context {context} has no Dockerfile at {dockerfile}; set build.dockerfile (relative to build.context)"
    )]
    NoDockerfile { context: String, dockerfile: String },
    #[error("the source archive holds the path {0:?}, which leaves its directory")]
    UnsafePath(String),
}

/// How a source's paths are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// GitHub's tarball: gzip'd, with one top directory to strip.
    GitHubTarball,
    /// A plain tar of the context itself (an upload).
    Plain,
}

/// What [`write_context`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextSummary {
    pub bytes: u64,
    pub files: usize,
    /// Digest of the files `build.paths` matches; `None` without `paths`.
    pub paths_digest: Option<String>,
}

fn entries<R: Read + Send + 'static>(layout: Layout, source: R) -> tar::Archive<Box<dyn Read + Send>> {
    let reader: Box<dyn Read + Send> = match layout {
        Layout::GitHubTarball => Box::new(flate2::read::GzDecoder::new(source)),
        Layout::Plain => Box::new(source),
    };
    tar::Archive::new(reader)
}

/// The path of an entry in the repository (or upload), as components; `None` for the top
/// directory itself and for entries that are not part of the tree (pax headers).
fn tree_path(layout: Layout, raw: &[u8]) -> Result<Option<Vec<String>>, ContextError> {
    let text = String::from_utf8_lossy(raw);
    let mut parts: Vec<&str> = text.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    if parts.contains(&"..") {
        return Err(ContextError::UnsafePath(text.into_owned()));
    }
    if layout == Layout::GitHubTarball {
        if parts.is_empty() {
            return Ok(None);
        }
        parts.remove(0);
    }
    Ok((!parts.is_empty()).then(|| parts.into_iter().map(str::to_owned).collect()))
}

fn is_tree_entry(kind: tar::EntryType) -> bool {
    kind.is_file() || kind.is_dir() || kind.is_symlink()
}

/// The text of `.previewd.yml` at the root of the source, if it has one.
pub fn read_repo_file<R: Read + Send + 'static>(layout: Layout, source: R) -> Result<Option<String>, ContextError> {
    read_small_file(layout, source, &[REPO_FILE])
}

/// The text of the `.dockerignore` at the root of `context` in the source, if it has one.
pub fn read_dockerignore<R: Read + Send + 'static>(
    layout: Layout,
    source: R,
    context: &TreePath,
) -> Result<Option<String>, ContextError> {
    let mut path: Vec<&str> = context.components().iter().map(String::as_str).collect();
    path.push(".dockerignore");
    read_small_file(layout, source, &path)
}

/// A small text file of the source, by path.
fn read_small_file<R: Read + Send + 'static>(
    layout: Layout,
    source: R,
    wanted: &[&str],
) -> Result<Option<String>, ContextError> {
    let mut archive = entries(layout, source);
    for entry in archive.entries().map_err(ContextError::Read)? {
        let mut entry = entry.map_err(ContextError::Read)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = tree_path(layout, &entry.path_bytes())?;
        if path.as_deref().is_some_and(|p| p.iter().map(String::as_str).eq(wanted.iter().copied())) {
            if entry.size() > MAX_REPO_FILE {
                return Err(ContextError::FileTooLarge(wanted.join("/")));
            }
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(ContextError::Read)?;
            return String::from_utf8(bytes).map(Some).map_err(|_| ContextError::NotText(wanted.join("/")));
        }
    }
    Ok(None)
}

/// Hashes what it passes on.
struct Tee<'a, R> {
    inner: R,
    hasher: Option<&'a mut Sha256>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        if let Some(hasher) = self.hasher.as_deref_mut() {
            hasher.update(&buf[..read]);
        }
        Ok(read)
    }
}

/// What [`write_context`] needs besides the source.
pub struct ContextPlan<'a> {
    pub context: &'a TreePath,
    /// The context's `.dockerignore`: what it excludes is left out, as `docker build` does.
    pub ignore: &'a Ignore,
    /// Checked at each entry: a stopped build stops writing its context.
    pub stopped: &'a (dyn Fn() -> bool + Sync),
    pub dockerfile: &'a TreePath,
    pub paths: Option<&'a PathFilter>,
    pub max_context: u64,
}

/// A Dockerfile larger than this is not a Dockerfile.
const MAX_DOCKERFILE: u64 = 1 << 20;

/// Writes the `context` directory of the source as a tar to `out`; see the module doc.
pub fn write_context<R: Read + Send + 'static, W: Write>(
    layout: Layout,
    source: R,
    plan: &ContextPlan<'_>,
    out: W,
) -> Result<ContextSummary, ContextError> {
    let ContextPlan { context, dockerfile, paths, max_context, .. } = *plan;
    let mut archive = entries(layout, source);
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut digest = paths.map(|_| Sha256::new());
    let mut summary = ContextSummary { bytes: 0, files: 0, paths_digest: None };
    let dockerfile_path = dockerfile.to_string();
    let mut has_dockerfile = false;
    let tree_limit = max_context.saturating_mul(4);
    let mut tree_bytes = 0u64;
    for entry in archive.entries().map_err(ContextError::Read)? {
        if (plan.stopped)() {
            return Err(ContextError::Stopped);
        }
        let entry = entry.map_err(ContextError::Read)?;
        let kind = entry.header().entry_type();
        if !is_tree_entry(kind) {
            continue;
        }
        tree_bytes += entry.size();
        if tree_bytes > tree_limit {
            return Err(ContextError::TreeTooLarge { limit: tree_limit });
        }
        let Some(path) = tree_path(layout, &entry.path_bytes())? else { continue };
        let repo_path = path.join("/");
        let hashed = kind.is_file() && paths.is_some_and(|p| p.matches(&repo_path));
        let borrowed: Vec<&str> = path.iter().map(String::as_str).collect();
        let inside =
            context.strip(&borrowed).filter(|rest| !rest.is_empty()).map(|rest| rest.join("/")).filter(|inner| {
                *inner == dockerfile_path || ALWAYS_SENT.contains(&inner.as_str()) || !plan.ignore.excluded(inner)
            });
        if hashed && let Some(hasher) = digest.as_mut() {
            hasher.update(repo_path.as_bytes());
            hasher.update([0]);
            hasher.update(entry.header().mode().unwrap_or(0).to_le_bytes());
        }
        let hasher = if hashed { digest.as_mut() } else { None };
        match inside {
            Some(inner) => {
                summary.bytes += entry.size();
                if summary.bytes > max_context {
                    return Err(ContextError::TooLarge { limit: max_context });
                }
                summary.files += usize::from(kind.is_file());
                if kind.is_file() && inner == dockerfile_path {
                    if entry.size() > MAX_DOCKERFILE {
                        return Err(ContextError::DockerfileTooLarge(dockerfile_path));
                    }
                    has_dockerfile = true;
                }
                append(&mut builder, entry, &inner, hasher)?;
            }
            None if hashed => {
                io::copy(&mut Tee { inner: entry, hasher }, &mut io::sink()).map_err(ContextError::Read)?;
            }
            None => {}
        }
    }
    if !has_dockerfile {
        return Err(ContextError::NoDockerfile { context: context.to_string(), dockerfile: dockerfile_path });
    }
    summary.paths_digest = digest.map(|hasher| hex::encode(&hasher.finalize()[..12]));
    builder.into_inner().and_then(|mut out| out.flush()).map_err(ContextError::Write)?;
    Ok(summary)
}

fn append<R: Read, W: Write>(
    builder: &mut tar::Builder<W>,
    entry: tar::Entry<'_, R>,
    path: &str,
    hasher: Option<&mut Sha256>,
) -> Result<(), ContextError> {
    let mut header = entry.header().clone();
    let kind = header.entry_type();
    if kind.is_symlink() {
        let target = entry.link_name().map_err(ContextError::Read)?.unwrap_or_default().into_owned();
        return builder.append_link(&mut header, path, target).map_err(ContextError::Write);
    }
    let size = if kind.is_file() { entry.size() } else { 0 };
    header.set_size(size);
    builder.append_data(&mut header, path, Tee { inner: entry, hasher }).map_err(ContextError::Write)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A gzip'd tarball shaped like GitHub's: a pax global header, then everything under
    /// `owner-repo-sha/`.
    pub(crate) fn github_tarball(files: &[(&str, &str)]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut builder = tar::Builder::new(gz);
        let mut pax = tar::Header::new_ustar();
        pax.set_entry_type(tar::EntryType::XGlobalHeader);
        let record = b"52 comment=0123456789abcdef0123456789abcdef01234567\n";
        pax.set_size(record.len() as u64);
        builder.append_data(&mut pax, "pax_global_header", &record[..]).unwrap();
        let mut dir = tar::Header::new_ustar();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o775);
        dir.set_size(0);
        builder.append_data(&mut dir, "acme-shop-0123456/", io::empty()).unwrap();
        for (path, text) in files {
            let mut header = tar::Header::new_ustar();
            header.set_mode(0o644);
            header.set_size(text.len() as u64);
            builder.append_data(&mut header, format!("acme-shop-0123456/{path}"), text.as_bytes()).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    fn tree(text: &str) -> TreePath {
        TreePath::parse(text).unwrap()
    }

    fn files_of(tar_bytes: &[u8]) -> Vec<(String, String)> {
        let mut archive = tar::Archive::new(tar_bytes);
        let mut files = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut text = String::new();
            entry.read_to_string(&mut text).unwrap();
            files.push((entry.path().unwrap().display().to_string(), text));
        }
        files
    }

    fn write(
        source: Vec<u8>,
        context: &str,
        paths: Option<&PathFilter>,
    ) -> Result<(ContextSummary, Vec<u8>), ContextError> {
        let mut out = Vec::new();
        let (context, dockerfile) = (tree(context), tree("Dockerfile"));

        let ignore = Ignore::parse("*.log\n!keep.log\n").unwrap();
        let plan = ContextPlan {
            context: &context,
            ignore: &ignore,
            stopped: &|| false,
            dockerfile: &dockerfile,
            paths,
            max_context: 1 << 20,
        };
        let summary = write_context(Layout::GitHubTarball, io::Cursor::new(source), &plan, &mut out)?;
        Ok((summary, out))
    }

    #[test]
    fn the_context_directory_becomes_the_root_of_a_plain_tar() {
        let source =
            github_tarball(&[("README.md", "hi"), ("web/Dockerfile", "FROM x"), ("web/src/app.py", "print(1)")]);
        let (summary, out) = write(source, "web", None).unwrap();
        let files = files_of(&out);
        assert_eq!(
            files,
            vec![("Dockerfile".to_owned(), "FROM x".to_owned()), ("src/app.py".to_owned(), "print(1)".to_owned())],
            "the Dockerfile as it is in the repository"
        );
        assert_eq!((summary.files, summary.bytes, summary.paths_digest), (2, 14, None));
    }

    #[test]
    fn what_the_contexts_dockerignore_excludes_is_left_out() {
        let source = github_tarball(&[("Dockerfile", "FROM x"), ("debug.log", "secret"), ("keep.log", "kept")]);
        let names: Vec<String> = files_of(&write(source, ".", None).unwrap().1).into_iter().map(|(p, _)| p).collect();
        assert_eq!(names, vec!["Dockerfile".to_owned(), "keep.log".to_owned()]);
        let source = github_tarball(&[("web/Dockerfile", "FROM x"), ("web/.dockerignore", "tmp\n"), ("web/tmp/a", "")]);
        let text = read_dockerignore(Layout::GitHubTarball, io::Cursor::new(source), &tree("web")).unwrap();
        assert_eq!(text.as_deref(), Some("tmp\n"));
    }

    #[test]
    fn a_context_without_its_dockerfile_is_refused_by_name() {
        let source = github_tarball(&[("Dockerfile", "FROM x"), ("web/app.py", "")]);
        let err = write(source, "web", None).unwrap_err();
        assert!(err.to_string().contains("no Dockerfile at Dockerfile"), "{err}");
    }

    #[test]
    fn the_paths_digest_changes_only_with_the_files_it_covers() {
        let paths = PathFilter::parse(&["shop/**".to_owned(), "Dockerfile".to_owned()]).unwrap();
        let digest = |files: &[(&str, &str)]| write(github_tarball(files), ".", Some(&paths)).unwrap().0.paths_digest;
        let first = digest(&[("Dockerfile", "FROM x"), ("shop/app.py", "1"), ("docs/a.md", "a")]);
        let docs_changed = digest(&[("Dockerfile", "FROM x"), ("shop/app.py", "1"), ("docs/a.md", "b")]);
        let shop_changed = digest(&[("Dockerfile", "FROM x"), ("shop/app.py", "2"), ("docs/a.md", "a")]);
        assert!(first.is_some());
        assert_eq!(first, docs_changed);
        assert_ne!(first, shop_changed);
    }

    #[test]
    fn a_context_over_the_limit_is_refused() {
        let big = "x".repeat(2 << 20);
        let err = write(github_tarball(&[("Dockerfile", "FROM x"), ("blob", &big)]), ".", None).unwrap_err();
        assert!(matches!(err, ContextError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn the_repository_file_is_read_from_the_root_only() {
        let source = github_tarball(&[("sub/.previewd.yml", "port: 1"), (".previewd.yml", "port: 8000\n")]);
        let text = read_repo_file(Layout::GitHubTarball, io::Cursor::new(source)).unwrap();
        assert_eq!(text.as_deref(), Some("port: 8000\n"));
        let none = read_repo_file(Layout::GitHubTarball, io::Cursor::new(github_tarball(&[("a", "b")]))).unwrap();
        assert_eq!(none, None);
    }
}
