//! The `limits` section: how many previews may exist (in all and per user), how many may start
//! at once, and how many followed log streams may be open, so that one user or a flood of
//! launches cannot take the whole host.

use serde::Deserialize;

/// Validated `limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_previews: usize,
    pub max_previews_per_user: usize,
    pub parallel_launches: usize,
    pub log_streams: usize,
    pub log_streams_per_user: usize,
    /// A followed log ends after this long (the client can follow again).
    pub log_stream_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_previews: 100,
            max_previews_per_user: 20,
            parallel_launches: 8,
            log_streams: 64,
            log_streams_per_user: 8,
            log_stream_seconds: 3600,
        }
    }
}

/// `limits` as written in config.yml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    max_previews: Option<usize>,
    max_previews_per_user: Option<usize>,
    parallel_launches: Option<usize>,
    log_streams: Option<usize>,
    log_streams_per_user: Option<usize>,
    log_stream_seconds: Option<u64>,
}

/// The limits, or the `(key, message)` of each value that cannot work.
pub(super) fn validate(raw: RawLimits) -> Result<Limits, Vec<(String, String)>> {
    let defaults = Limits::default();
    let mut problems = Vec::new();
    let mut take = |key: &str, value: Option<u64>, default: u64| {
        let value = value.unwrap_or(default);
        if value == 0 {
            problems.push((format!("limits.{key}"), "must be at least 1".to_owned()));
        }
        value
    };
    let mut count =
        |key: &str, value: Option<usize>, default: usize| take(key, value.map(|v| v as u64), default as u64) as usize;
    let limits = Limits {
        max_previews: count("max_previews", raw.max_previews, defaults.max_previews),
        max_previews_per_user: count(
            "max_previews_per_user",
            raw.max_previews_per_user,
            defaults.max_previews_per_user,
        ),
        parallel_launches: count("parallel_launches", raw.parallel_launches, defaults.parallel_launches),
        log_streams: count("log_streams", raw.log_streams, defaults.log_streams),
        log_streams_per_user: count("log_streams_per_user", raw.log_streams_per_user, defaults.log_streams_per_user),
        log_stream_seconds: take("log_stream_seconds", raw.log_stream_seconds, defaults.log_stream_seconds),
    };
    if problems.is_empty() { Ok(limits) } else { Err(problems) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_take_the_documented_defaults() {
        let limits = validate(RawLimits::default()).unwrap();
        assert_eq!(limits, Limits::default());
        assert_eq!((limits.max_previews, limits.max_previews_per_user, limits.parallel_launches), (100, 20, 8));
        assert_eq!((limits.log_streams, limits.log_streams_per_user, limits.log_stream_seconds), (64, 8, 3600));
    }

    #[test]
    fn a_zero_limit_is_refused_naming_its_key() {
        let raw = RawLimits { parallel_launches: Some(0), ..RawLimits::default() };
        let problems = validate(raw).unwrap_err();
        assert_eq!(problems, vec![("limits.parallel_launches".to_owned(), "must be at least 1".to_owned())]);
    }
}
