//! The `http` section: how long the API waits for a client's request headers and body, and how
//! many connections it serves at once, so that slow or flooding clients cannot tie it up.

use std::time::Duration;

use serde::Deserialize;

/// Validated `http`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpSettings {
    /// A connection whose request headers are not complete after this long is closed (an idle
    /// keep-alive connection too: it is waiting for the headers of its next request).
    pub header_timeout: Duration,
    /// A request body not complete this long after its headers fails with 408.
    pub body_timeout: Duration,
    /// Connections served at once; further ones wait in the listen queue.
    pub max_connections: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self { header_timeout: Duration::from_secs(10), body_timeout: Duration::from_secs(30), max_connections: 1024 }
    }
}

/// `http` as written in config.yml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHttp {
    header_timeout: Option<u64>,
    body_timeout: Option<u64>,
    max_connections: Option<usize>,
}

/// The settings, or the `(key, message)` of each value that cannot work.
pub(super) fn validate(raw: RawHttp) -> Result<HttpSettings, Vec<(String, String)>> {
    let defaults = HttpSettings::default();
    let mut problems = Vec::new();
    let mut at_least_one = |key: &str, value: Option<u64>, default: u64| {
        let value = value.unwrap_or(default);
        if value == 0 {
            problems.push((format!("http.{key}"), "must be at least 1".to_owned()));
        }
        value
    };
    let seconds = |value: u64| Duration::from_secs(value);
    let settings = HttpSettings {
        header_timeout: seconds(at_least_one("header_timeout", raw.header_timeout, defaults.header_timeout.as_secs())),
        body_timeout: seconds(at_least_one("body_timeout", raw.body_timeout, defaults.body_timeout.as_secs())),
        max_connections: at_least_one(
            "max_connections",
            raw.max_connections.map(|v| v as u64),
            defaults.max_connections as u64,
        ) as usize,
    };
    if problems.is_empty() { Ok(settings) } else { Err(problems) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<HttpSettings, Vec<(String, String)>> {
        validate(serde_norway::from_str(yaml).expect("parses"))
    }

    #[test]
    fn missing_keys_take_the_documented_defaults() {
        let settings = validate(RawHttp::default()).unwrap();
        assert_eq!(settings.header_timeout, Duration::from_secs(10));
        assert_eq!(settings.body_timeout, Duration::from_secs(30));
        assert_eq!(settings.max_connections, 1024);
    }

    #[test]
    fn set_keys_are_seconds_and_a_count() {
        let settings = parse("header_timeout: 2\nbody_timeout: 5\nmax_connections: 8\n").unwrap();
        assert_eq!(
            settings,
            HttpSettings {
                header_timeout: Duration::from_secs(2),
                body_timeout: Duration::from_secs(5),
                max_connections: 8
            }
        );
    }

    #[test]
    fn a_zero_is_refused_naming_its_key() {
        let problems = parse("header_timeout: 0\nmax_connections: 0\n").unwrap_err();
        assert_eq!(
            problems,
            vec![
                ("http.header_timeout".to_owned(), "must be at least 1".to_owned()),
                ("http.max_connections".to_owned(), "must be at least 1".to_owned()),
            ]
        );
    }

    #[test]
    fn unknown_keys_and_negative_or_text_values_do_not_parse() {
        for yaml in ["read_timeout: 5\n", "body_timeout: -1\n", "header_timeout: 10s\n"] {
            assert!(serde_norway::from_str::<RawHttp>(yaml).is_err(), "{yaml}");
        }
    }
}
