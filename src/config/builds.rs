//! Building previews from source: the `builds` section (how builds share the host) and a
//! repository's `build` (what to build: context, Dockerfile, build args, the paths that matter).
//! A `build` comes from config.yml and may be refined by the repository's own `.previewd.yml`
//! ([`super::repo_file`]); both go through the same checks here, so a context or Dockerfile path
//! can never leave the repository's tree.

use std::collections::BTreeMap;
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use super::{ByteSize, Problems, parse_byte_size};

/// Validated `builds`.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildsConfig {
    /// Builds at once on this host; the rest wait in a queue.
    pub max_parallel: usize,
    /// Docker's relative CPU weight of a build container (previews have 1024).
    pub cpu_shares: i64,
    /// Bytes a build's containers may use: at most 2 GiB less a byte (see `validate_builds`).
    pub memory: i64,
    /// Images kept per preview (the running one and earlier ones); older ones are removed.
    pub keep: usize,
    pub timeout: Duration,
    /// A build does not start when Docker's disk has less free than this.
    pub min_free_disk: u64,
    /// The largest build context accepted by `POST /api/builds` (and unpacked from a tarball).
    pub max_context: u64,
}

impl Default for BuildsConfig {
    fn default() -> Self {
        Self {
            max_parallel: 1,
            cpu_shares: 256,
            memory: i64::from(i32::MAX),
            keep: 2,
            timeout: Duration::from_secs(20 * 60),
            min_free_disk: 5 << 30,
            max_context: 500 << 20,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawBuilds {
    max_parallel: Option<usize>,
    cpu_shares: Option<i64>,
    memory: Option<ByteSize>,
    keep: Option<usize>,
    timeout: Option<RawDuration>,
    min_free_disk: Option<ByteSize>,
    max_context: Option<ByteSize>,
}

pub(super) fn validate_builds(raw: RawBuilds, problems: &mut Problems) -> BuildsConfig {
    let defaults = BuildsConfig::default();
    let mut at_least_one = |key: &str, value: Option<usize>, default: usize| match value {
        Some(0) => {
            problems.add(&format!("builds.{key}"), "must be at least 1");
            default
        }
        other => other.unwrap_or(default),
    };
    let max_parallel = at_least_one("max_parallel", raw.max_parallel, defaults.max_parallel);
    let keep = at_least_one("keep", raw.keep, defaults.keep);
    let cpu_shares = match raw.cpu_shares {
        Some(shares) if !(2..=262_144).contains(&shares) => {
            problems.add("builds.cpu_shares", "must be between 2 and 262144 (a preview has 1024)");
            defaults.cpu_shares
        }
        other => other.unwrap_or(defaults.cpu_shares),
    };
    let mut size = |key: &str, value: Option<ByteSize>, default: i64| {
        value.map_or(Ok(default), |v| parse_byte_size(&v)).unwrap_or_else(|message| {
            problems.add(&format!("builds.{key}"), message);
            default
        })
    };
    let memory = size("memory", raw.memory, defaults.memory);
    let min_free_disk = size("min_free_disk", raw.min_free_disk, defaults.min_free_disk as i64) as u64;
    let max_context = size("max_context", raw.max_context, defaults.max_context as i64) as u64;
    // Docker's build API takes an int64, but the client library's parameter is an i32: 2g (one
    // byte over) is taken as its largest value, anything more is refused.
    let memory = if memory <= 2 << 30 {
        memory.min(i64::from(i32::MAX))
    } else {
        problems.add("builds.memory", "must be at most 2g (a limit of the Docker client library previewd uses)");
        defaults.memory
    };
    let timeout = positive_duration(raw.timeout, "builds.timeout", "20m", defaults.timeout, problems);
    BuildsConfig { max_parallel, cpu_shares, memory, keep, timeout, min_free_disk, max_context }
}

/// A duration as config.yml writes it: a number of seconds, or a number with `s`, `m`, `h` or `d`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum RawDuration {
    Seconds(u64),
    Text(String),
}

/// A duration that must be longer than 0, or `default` when not set (or not valid: the problem
/// is added, naming `key`, with `example`).
pub(super) fn positive_duration(
    raw: Option<RawDuration>,
    key: &str,
    example: &str,
    default: Duration,
    problems: &mut Problems,
) -> Duration {
    match raw.map(|raw| parse_duration(&raw)) {
        None => default,
        Some(Ok(duration)) if !duration.is_zero() => duration,
        Some(Ok(_)) => {
            problems.add(key, format!("must be longer than 0, e.g. {example}"));
            default
        }
        Some(Err(message)) => {
            problems.add(key, message);
            default
        }
    }
}

pub(super) fn parse_duration(raw: &RawDuration) -> Result<Duration, String> {
    let text = match raw {
        RawDuration::Seconds(seconds) => return Ok(Duration::from_secs(*seconds)),
        RawDuration::Text(text) => text.trim(),
    };
    let (digits, unit) = match text.char_indices().last() {
        Some((at, unit @ ('s' | 'm' | 'h' | 'd'))) => (&text[..at], unit),
        _ => (text, 's'),
    };
    let factor = match unit {
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => 1,
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is not a duration; use seconds or a number with s, m, h or d, e.g. 20m"))
}

/// A relative path inside a repository (`build.context`, `build.dockerfile`): `/`-separated
/// components, none of them empty, `.` or `..`, so it names a place inside the tree it is
/// applied to. `.` alone is the root.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TreePath(Vec<String>);

impl TreePath {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with('/') {
            return Err(format!("{text:?} must be relative to the repository's root, e.g. docker/web"));
        }
        let trimmed = text.trim_start_matches("./").trim_end_matches('/');
        if trimmed.is_empty() || trimmed == "." {
            return Ok(Self(Vec::new()));
        }
        let parts: Vec<String> = trimmed.split('/').map(str::to_owned).collect();
        let bad = |part: &String| part.is_empty() || part == "." || part == ".." || part.contains(['\\', '\0']);
        if parts.iter().any(bad) {
            return Err(format!("{text:?} must stay inside the repository: no '..', empty or '.' parts"));
        }
        Ok(Self(parts))
    }

    pub fn components(&self) -> &[String] {
        &self.0
    }

    /// The path below `self` when `path` lies inside it.
    pub fn strip<'a>(&self, path: &'a [&'a str]) -> Option<&'a [&'a str]> {
        let prefix = self.0.len();
        (path.len() >= prefix && path.iter().zip(&self.0).all(|(a, b)| a == b)).then(|| &path[prefix..])
    }
}

impl std::fmt::Display for TreePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() { f.write_str(".") } else { f.write_str(&self.0.join("/")) }
    }
}

/// `build.paths`: glob patterns (`**` for any depth) of the files whose change needs a rebuild.
#[derive(Debug, Clone)]
pub struct PathFilter {
    patterns: Vec<String>,
    set: GlobSet,
}

impl PathFilter {
    pub fn parse(patterns: &[String]) -> Result<Self, String> {
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            let glob = Glob::new(pattern.trim_start_matches("./"))
                .map_err(|err| format!("{pattern:?} is not a glob pattern: {err}"))?;
            builder.add(glob);
        }
        let set = builder.build().map_err(|err| err.to_string())?;
        Ok(Self { patterns: patterns.to_vec(), set })
    }

    /// Whether a file (path relative to the repository's root) is one of the paths.
    pub fn matches(&self, path: &str) -> bool {
        self.set.is_match(path)
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

impl PartialEq for PathFilter {
    fn eq(&self, other: &Self) -> bool {
        self.patterns == other.patterns
    }
}

/// What to build for a repository's pull requests.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildSpec {
    /// The directory sent to Docker as the build context.
    pub context: TreePath,
    /// Relative to `context`.
    pub dockerfile: TreePath,
    pub args: BTreeMap<String, String>,
    /// `None`: every push builds.
    pub paths: Option<PathFilter>,
}

impl BuildSpec {
    /// A short digest of what decides the image besides the files: a push that changes none of
    /// `paths` reuses the last build only when this is the same too.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        let paths = self.paths.as_ref().map(PathFilter::patterns);
        let text = format!("{}|{}|{:?}|{paths:?}", self.context, self.dockerfile, self.args);
        hex::encode(&sha2::Sha256::digest(text.as_bytes())[..8])
    }
}

/// `build` as written in config.yml or in `.previewd.yml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBuild {
    #[serde(default)]
    pub context: Option<String>,
    #[serde(default)]
    pub dockerfile: Option<String>,
    #[serde(default)]
    pub args: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub paths: Option<Vec<String>>,
}

/// A build arg name as Docker's `ARG` accepts it.
fn valid_arg_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `raw` laid over `base` (absent keys keep `base`'s values), each problem reported under `path`.
pub(crate) fn validate_build(
    path: &str,
    raw: RawBuild,
    base: Option<&BuildSpec>,
    problem: &mut dyn FnMut(String, String),
) -> Option<BuildSpec> {
    let mut ok = true;
    let mut tree_path = |key: &str, text: Option<String>, fallback: Option<&TreePath>, default: &str| {
        let parsed = match (text, fallback) {
            (Some(text), _) => TreePath::parse(&text),
            (None, Some(known)) => Ok(known.clone()),
            (None, None) => TreePath::parse(default),
        };
        parsed
            .map_err(|message| {
                problem(format!("{path}.{key}"), message);
                ok = false;
            })
            .ok()
    };
    let context = tree_path("context", raw.context, base.map(|b| &b.context), ".");
    let dockerfile = tree_path("dockerfile", raw.dockerfile, base.map(|b| &b.dockerfile), "Dockerfile");
    if dockerfile.as_ref().is_some_and(|d| d.components().is_empty()) {
        problem(format!("{path}.dockerfile"), "must name a file, e.g. Dockerfile".to_owned());
        ok = false;
    }
    let args = match raw.args {
        Some(args) => args,
        None => base.map(|b| b.args.clone()).unwrap_or_default(),
    };
    for (name, value) in &args {
        if !valid_arg_name(name) {
            problem(format!("{path}.args.{name}"), "is not a build arg name: letters, digits and '_'".to_owned());
            ok = false;
        }
        if value.contains('\0') {
            problem(format!("{path}.args.{name}"), "must not contain a NUL byte".to_owned());
            ok = false;
        }
    }
    let paths = match raw.paths {
        Some(patterns) if patterns.is_empty() => {
            problem(format!("{path}.paths"), "must list at least one pattern; remove it to build every push".into());
            ok = false;
            None
        }
        Some(patterns) => PathFilter::parse(&patterns)
            .map_err(|message| {
                problem(format!("{path}.paths"), message);
                ok = false;
            })
            .ok(),
        None => base.and_then(|b| b.paths.clone()),
    };
    match (ok, context, dockerfile) {
        (true, Some(context), Some(dockerfile)) => Some(BuildSpec { context, dockerfile, args, paths }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_seconds_or_a_number_with_a_unit() {
        let text = |t: &str| parse_duration(&RawDuration::Text(t.into()));
        assert_eq!(text("20m"), Ok(Duration::from_secs(1200)));
        assert_eq!(text("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(text("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration(&RawDuration::Seconds(5)), Ok(Duration::from_secs(5)));
        assert!(text("soon").unwrap_err().contains("not a duration"));
        assert!(text("-5m").is_err());
    }

    #[test]
    fn tree_paths_cannot_leave_the_repository() {
        assert_eq!(TreePath::parse(".").unwrap().to_string(), ".");
        assert_eq!(TreePath::parse("./shop/").unwrap().to_string(), "shop");
        for bad in ["../x", "a/../../b", "/etc", "a//b", "a/./b"] {
            assert!(TreePath::parse(bad).is_err(), "{bad}");
        }
        let shop = TreePath::parse("shop").unwrap();
        assert_eq!(shop.strip(&["shop", "app.py"]), Some(&["app.py"][..]));
        assert_eq!(shop.strip(&["other", "app.py"]), None);
    }

    #[test]
    fn a_build_takes_defaults_and_is_refined_key_by_key() {
        let mut problems = Vec::new();
        let mut problem = |key: String, message: String| problems.push(format!("{key}: {message}"));
        let base = validate_build("b", RawBuild::default(), None, &mut problem).unwrap();
        assert_eq!((base.context.to_string(), base.dockerfile.to_string()), (".".into(), "Dockerfile".into()));
        let raw = RawBuild { context: Some("web".into()), paths: Some(vec!["web/**".into()]), ..RawBuild::default() };
        let refined = validate_build("b", raw, Some(&base), &mut problem).unwrap();
        assert_eq!((refined.context.to_string(), refined.dockerfile.to_string()), ("web".into(), "Dockerfile".into()));
        assert!(refined.paths.as_ref().unwrap().matches("web/src/app.py"));
        assert!(!refined.paths.as_ref().unwrap().matches("docs/readme.md"));
        assert_ne!(base.digest(), refined.digest());
        let raw = RawBuild { args: Some([("NOT-A-NAME".into(), "x".into())].into()), ..RawBuild::default() };
        assert!(validate_build("b", raw, None, &mut problem).is_none());
        assert!(problems.iter().any(|p| p.starts_with("b.args.NOT-A-NAME")), "{problems:?}");
    }
}
