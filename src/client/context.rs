//! The build context `previewd launch --build DIR` sends: DIR as a tar stream, minus what its
//! `.dockerignore` excludes, with Docker's rules
//! (<https://docs.docker.com/build/concepts/context/#dockerignore-files>). This module owns
//! reading `.dockerignore`, deciding what it excludes, and writing the tar into any
//! [`Write`] as the directory is walked, so a context is never held in memory.
//!
//! The rules, as Docker's `patternmatcher` applies them: one pattern a line, relative to the
//! context root (a leading `/` or `./` is dropped, the pattern is cleaned like Go's
//! `filepath.Clean`, so `docs/` is `docs`); `#` lines and blank lines are skipped; the syntax
//! is Go's `filepath.Match` (`*`, `?`, `[a-z]`, `[^a-z]`, `\` escapes) plus `**` for any number
//! of directories; `!` re-includes. A pattern matching a directory excludes everything under
//! it, and of the patterns matching a path or one of its parents the last decides. The
//! Dockerfile and `.dockerignore` at the root are sent even if excluded, as Docker does.
//!
//! The tar keeps symlinks as symlinks (never followed), file modes, owners and mtimes; sockets,
//! fifos and devices are skipped. Entries are in name order, so one tree gives one tar.

use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// The files Docker sends whatever `.dockerignore` says.
const ALWAYS_SENT: [&str; 2] = ["Dockerfile", ".dockerignore"];

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

/// One `.dockerignore` line.
#[derive(Debug)]
struct Rule {
    /// The pattern as Docker keeps it: cleaned, relative, without its `!`.
    pattern: String,
    /// A `!` line: re-includes what it matches.
    negated: bool,
}

/// A parsed `.dockerignore`.
#[derive(Debug)]
pub struct Ignore {
    rules: Vec<Rule>,
    /// One glob per rule, at the rule's index.
    globs: GlobSet,
}

impl Ignore {
    /// Nothing excluded.
    pub fn empty() -> Self {
        Self { rules: Vec::new(), globs: GlobSet::empty() }
    }

    /// Parses `.dockerignore` text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ContextError> {
        let mut rules = Vec::new();
        let mut globs = GlobSetBuilder::new();
        for (index, raw) in text.lines().enumerate() {
            let bad = |pattern: &str, message: String| ContextError::Pattern {
                path: path.to_owned(),
                line: index + 1,
                pattern: pattern.to_owned(),
                message,
            };
            let raw = if index == 0 { raw.trim_start_matches('\u{feff}') } else { raw };
            // As Docker: a comment only when `#` is the line's first character.
            if raw.starts_with('#') {
                continue;
            }
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            let (negated, pattern) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            if pattern.is_empty() {
                return Err(bad(line, "`!` needs a pattern after it".to_owned()));
            }
            let mut pattern = clean(pattern);
            if pattern.len() > 1 && pattern.starts_with('/') {
                pattern.remove(0);
            }
            let glob = glob_for(&pattern).map_err(|message| bad(line, message))?;
            let glob = GlobBuilder::new(&glob)
                .literal_separator(true)
                .backslash_escape(true)
                .empty_alternates(true)
                .build()
                .map_err(|err| bad(line, err.kind().to_string()))?;
            globs.add(glob);
            rules.push(Rule { pattern, negated });
        }
        let globs = globs.build().map_err(|err| ContextError::Pattern {
            path: path.to_owned(),
            line: 0,
            pattern: String::new(),
            message: err.to_string(),
        })?;
        Ok(Self { rules, globs })
    }

    /// Whether `path` (relative to the context root, `/`-separated) is left out of the context.
    /// A directory and a file of one name are alike: Docker cleans `docs/` to `docs`.
    pub fn excluded(&self, path: &str) -> bool {
        let mut last = None;
        for (end, _) in path.match_indices('/').chain([(path.len(), "")]) {
            last = last.max(self.last_match(&path[..end]));
        }
        self.excludes(last)
    }

    /// The index of the last rule matching `path` itself (not its parents).
    fn last_match(&self, path: &str) -> Option<usize> {
        self.globs.matches(path).into_iter().max()
    }

    /// Whether the last rule matching a path or one of its parents excludes it.
    fn excludes(&self, last: Option<usize>) -> bool {
        last.is_some_and(|index| !self.rules[index].negated)
    }

    /// Whether a `!` rule might re-include something under the excluded directory `dir`: then
    /// the walk goes in. Errs towards going in; a rule whose fixed start leads elsewhere, or
    /// which (without `**`) has no more components than `dir`, cannot.
    fn may_reinclude_under(&self, dir: &str) -> bool {
        let depth = dir.split('/').count();
        let dir = format!("{dir}/");
        self.rules.iter().filter(|rule| rule.negated).any(|rule| {
            let pattern = &rule.pattern;
            let deep_enough = pattern.contains("**") || pattern.split('/').count() > depth;
            let fixed = &pattern[..pattern.find(['*', '?', '[', '\\']).unwrap_or(pattern.len())];
            deep_enough && (fixed.starts_with(&dir) || dir.starts_with(fixed))
        })
    }
}

/// Go's `filepath.Clean` on a `/`-separated path.
fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." if parts.last().is_some_and(|last| *last != "..") => {
                parts.pop();
            }
            ".." if rooted => {}
            part => parts.push(part),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// A cleaned Docker pattern as a globset glob of the same meaning (with `literal_separator`,
/// `backslash_escape` and `empty_alternates`). Docker's `**` as a whole component is globset's;
/// its other uses follow Docker's matcher: `**x` at the start matches any path ending in `x`,
/// `x**` at the end any path starting with `x`, `x**y` inside `x`, then any directories, then
/// `y`. Globset's `{a,b}` is escaped (Docker has none), and Go's classes are rewritten.
fn glob_for(pattern: &str) -> Result<String, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let literal = |rest: &[char]| !rest.iter().any(|c| matches!(c, '*' | '?' | '[' | ']' | '\\'));
    let mut glob = String::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' if chars.get(i + 1) == Some(&'*') => {
                let at_start = i == 0;
                let after_separator = i > 0 && chars[i - 1] == '/';
                i += 2;
                // Docker reads `**/` as `**`.
                let ate_separator = chars.get(i) == Some(&'/');
                if ate_separator {
                    i += 1;
                }
                let at_end = i == chars.len();
                glob.push_str(match (at_start || after_separator, at_end) {
                    (true, true) => "**",
                    (false, true) => "*",
                    // Docker matches `**x` (x fixed) as "ends with x".
                    (true, false) if at_start && !ate_separator && literal(&chars[i..]) => "**/*",
                    (true, false) => "**/",
                    (false, false) => "{,*/**/}",
                });
                continue;
            }
            '[' => {
                let (class, next) = class_for(&chars, i)?;
                glob.push_str(&class);
                i = next;
                continue;
            }
            '\\' => match chars.get(i + 1) {
                Some(c) => {
                    glob.push('\\');
                    glob.push(*c);
                    i += 2;
                    continue;
                }
                None => return Err("a `\\` at the end escapes nothing".to_owned()),
            },
            c @ ('{' | '}' | ',' | ']') => {
                glob.push('\\');
                glob.push(c);
            }
            c => glob.push(c),
        }
        i += 1;
    }
    Ok(glob)
}

/// Characters a globset class cannot hold just anywhere: they get a place of their own.
const AWKWARD_IN_CLASS: [char; 5] = [']', '-', '!', '^', '['];

/// Go's class at `chars[start]` (`[`) as globset's, and the index after it. Go negates with
/// `^` only (`[!a]` is `!` or `a`), escapes with `\`, and wants `-` and `]` escaped.
fn class_for(chars: &[char], start: usize) -> Result<(String, usize), String> {
    const UNCLOSED: &str = "a `[` is never closed";
    let member = |i: usize| -> Result<(char, usize), String> {
        match chars.get(i) {
            None => Err(UNCLOSED.to_owned()),
            Some('-' | ']') => Err("`-` and `]` inside `[...]` need a `\\` before them".to_owned()),
            Some('\\') => chars.get(i + 1).map(|c| (*c, i + 2)).ok_or_else(|| UNCLOSED.to_owned()),
            Some(c) => Ok((*c, i + 1)),
        }
    };
    let mut i = start + 1;
    let negated = chars.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let (mut singles, mut ranges) = (Vec::new(), Vec::new());
    loop {
        if chars.get(i) == Some(&']') && !(singles.is_empty() && ranges.is_empty()) {
            i += 1;
            break;
        }
        let (mut low, next) = member(i)?;
        i = next;
        let mut high = low;
        if chars.get(i) == Some(&'-') {
            (high, i) = member(i + 1)?;
            if high < low {
                return Err(format!("the range `{low}-{high}` is backwards"));
            }
        }
        // Awkward ends (all ASCII) become singles, the range shrinks past them.
        while low <= high && AWKWARD_IN_CLASS.contains(&low) {
            singles.push(low);
            low = char::from_u32(low as u32 + 1).unwrap_or(low);
        }
        while low <= high && AWKWARD_IN_CLASS.contains(&high) {
            singles.push(high);
            high = char::from_u32(high as u32 - 1).unwrap_or(high);
        }
        match low.cmp(&high) {
            std::cmp::Ordering::Less => ranges.push((low, high)),
            std::cmp::Ordering::Equal => singles.push(low),
            std::cmp::Ordering::Greater => {}
        }
    }
    let has = |c: char| singles.contains(&c);
    let mut ordinary: String = singles.iter().filter(|c| !AWKWARD_IN_CLASS.contains(c)).collect();
    for (low, high) in &ranges {
        ordinary.extend([*low, '-', *high]);
    }
    if !negated && ordinary.is_empty() && !has(']') {
        // Only `!`, `^`, `[`, `-`: none can open a class that is not negated; spell them out.
        let mut awkward: Vec<String> = singles.iter().map(|c| format!("\\{c}")).collect();
        awkward.dedup();
        return Ok((format!("{{{}}}", awkward.join(",")), i));
    }
    let mut class = String::from("[");
    if negated {
        class.push('!');
    }
    // `]` first, `-` last: where globset reads them as members.
    if has(']') {
        class.push(']');
    }
    class.push_str(&ordinary);
    for c in ['!', '^', '['] {
        if has(c) {
            class.push(c);
        }
    }
    if has('-') {
        class.push('-');
    }
    class.push(']');
    Ok((class, i))
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
            Ok(text) => Ignore::parse(&text, &path)?,
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

    fn rules(text: &str) -> Ignore {
        Ignore::parse(text, Path::new(".dockerignore")).unwrap()
    }

    /// Asserts, for each `(path, excluded)`, what `text` decides.
    fn check(text: &str, cases: &[(&str, bool)]) {
        let ignore = rules(text);
        for (path, expected) in cases {
            assert_eq!(ignore.excluded(path), *expected, "{text:?} on {path:?}");
        }
    }

    #[test]
    fn patterns_are_relative_to_the_root_and_a_directory_takes_what_is_under_it() {
        check("docs", &[("docs", true), ("docs/a/b.md", true), ("docsx", false), ("src/docs", false)]);
        check("/tmp\n./build/\n", &[("tmp", true), ("tmp/x", true), ("build", true), ("build/out", true)]);
        check("a/../b\n", &[("b", true), ("a", false)]);
        check("src/gen\n", &[("src/gen/x.rs", true), ("src/lib.rs", false)]);
    }

    #[test]
    fn star_and_question_mark_stay_within_a_component() {
        check("*.md", &[("README.md", true), ("docs/a.md", false)]);
        check("*/*.md", &[("docs/a.md", true), ("a/b/c.md", false), ("README.md", false)]);
        check("temp?", &[("temp1", true), ("temp12", false), ("temp", false)]);
    }

    #[test]
    fn double_star_is_any_number_of_directories() {
        check("**/*.md", &[("README.md", true), ("a/b/c.md", true), ("a/b/c.rs", false)]);
        check("a/**/b", &[("a/b", true), ("a/x/y/b", true), ("a/x/y/bb", false), ("b", false)]);
        check("foo/**", &[("foo", false), ("foo/x", true), ("foo/x/y", true)]);
        check("**", &[("anything", true), ("a/b/c", true)]);
        // Docker's own readings of `**` that is not a whole component.
        check("**.pyc", &[("x.pyc", true), ("a/b/x.pyc", true), ("x.py", false)]);
        check("logs**", &[("logs", true), ("logs2/a", true), ("log", false)]);
        check("a**b", &[("ab", true), ("a/b", true), ("a/x/y/b", true), ("axb", false)]);
    }

    #[test]
    fn classes_and_escapes_are_go_s() {
        check("[a-c].txt", &[("b.txt", true), ("d.txt", false)]);
        check("[^a].txt", &[("b.txt", true), ("a.txt", false)]);
        // Go has no `[!...]`: `!` is a member.
        check("[!].txt", &[("!.txt", true), ("a.txt", false)]);
        check("[!a].txt", &[("!.txt", true), ("a.txt", true), ("b.txt", false)]);
        check("x[\\]\\-]", &[("x]", true), ("x-", true), ("xa", false)]);
        check("\\*.txt", &[("*.txt", true), ("a.txt", false)]);
        // Globset's alternates mean nothing to Docker.
        check("{a,b}", &[("{a,b}", true), ("a", false)]);
    }

    #[test]
    fn the_last_matching_line_wins_and_bang_re_includes() {
        check("*.txt\n!keep.txt\n", &[("a.txt", true), ("keep.txt", false)]);
        check("!keep.txt\n*.txt\n", &[("keep.txt", true)]);
        check("*\n!src\n", &[("README", true), ("src", false), ("src/a/b.rs", false)]);
        check("node_modules\n!node_modules/keep\n", &[("node_modules/x", true), ("node_modules/keep/y", false)]);
    }

    #[test]
    fn comments_blank_lines_and_spaces_are_skipped() {
        check("\u{feff}# *\n\n   \n  *.log  \n", &[("a.log", true), ("a.rs", false), ("# *", false)]);
        // Only a `#` in the first column starts a comment.
        check(" #x", &[("#x", true)]);
    }

    #[test]
    fn bad_patterns_name_the_file_and_line() {
        for text in ["ok\n[a", "ok\n!", "ok\n[]", "ok\n\\"] {
            match Ignore::parse(text, Path::new("ctx/.dockerignore")) {
                Err(err @ ContextError::Pattern { line: 2, .. }) => {
                    assert!(err.to_string().starts_with("ctx/.dockerignore:2: bad pattern"), "{err}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_reinclude_elsewhere_does_not_open_an_excluded_directory() {
        let ignore = rules("node_modules\n!node_modules/kept/**\n!*.md\n");
        assert!(ignore.may_reinclude_under("node_modules"));
        assert!(ignore.may_reinclude_under("node_modules/kept"));
        assert!(!ignore.may_reinclude_under("node_modules/other"));
        assert!(!rules("target\n!*.md\n").may_reinclude_under("target"));
        assert!(rules("target\n!**/*.md\n").may_reinclude_under("target"));
    }

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
