//! `.dockerignore`, with Docker's rules
//! (<https://docs.docker.com/build/concepts/context/#dockerignore-files>): what a build context
//! leaves out. Shared by the client (`previewd launch --build DIR`, which leaves it out of the
//! tar it sends) and the server (a commit's tarball, which GitHub sends whole: Docker's classic
//! builder does not apply `.dockerignore` itself).
//!
//! The rules, as Docker's `patternmatcher` applies them: one pattern a line, relative to the
//! context root (a leading `/` or `./` is dropped, the pattern is cleaned like Go's
//! `filepath.Clean`, so `docs/` is `docs`); `#` lines and blank lines are skipped; the syntax
//! is Go's `filepath.Match` (`*`, `?`, `[a-z]`, `[^a-z]`, `\` escapes) plus `**` for any number
//! of directories; `!` re-includes. A pattern matching a directory excludes everything under
//! it, and of the patterns matching a path or one of its parents the last decides. The
//! Dockerfile and `.dockerignore` at the root are sent even if excluded, as Docker does
//! ([`ALWAYS_SENT`]).

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// The files Docker sends whatever `.dockerignore` says.
pub const ALWAYS_SENT: [&str; 2] = ["Dockerfile", ".dockerignore"];

/// A line of `.dockerignore` that is not a pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: bad pattern `{pattern}`: {message}")]
pub struct PatternError {
    pub line: usize,
    pub pattern: String,
    pub message: String,
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

    /// Parses `.dockerignore` text.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let mut rules = Vec::new();
        let mut globs = GlobSetBuilder::new();
        for (index, raw) in text.lines().enumerate() {
            let bad =
                |pattern: &str, message: String| PatternError { line: index + 1, pattern: pattern.to_owned(), message };
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
        let globs =
            globs.build().map_err(|err| PatternError { line: 0, pattern: String::new(), message: err.to_string() })?;
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
    pub fn last_match(&self, path: &str) -> Option<usize> {
        self.globs.matches(path).into_iter().max()
    }

    /// Whether the last rule matching a path or one of its parents excludes it.
    pub fn excludes(&self, last: Option<usize>) -> bool {
        last.is_some_and(|index| !self.rules[index].negated)
    }

    /// Whether a `!` rule might re-include something under the excluded directory `dir`: then
    /// the walk goes in. Errs towards going in; a rule whose fixed start leads elsewhere, or
    /// which (without `**`) has no more components than `dir`, cannot.
    pub fn may_reinclude_under(&self, dir: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Ignore {
        Ignore::parse(text).unwrap()
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
    fn bad_patterns_name_their_line() {
        for text in ["ok\n[a", "ok\n!", "ok\n[]", "ok\n\\"] {
            match Ignore::parse(text) {
                Err(err @ PatternError { line: 2, .. }) => {
                    assert!(err.to_string().starts_with("line 2: bad pattern"), "{err}");
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
}
