//! The `lifecycle` section: when a preview nobody uses goes to sleep (`sleep_after` without a
//! request through nginx), how long a request for a sleeping preview waits for it to wake
//! (`wake_timeout`), and how many previews may be awake at once (`max_awake`,
//! `max_awake_memory`).

use std::time::Duration;

use serde::Deserialize;

use super::builds::{RawDuration, parse_duration, positive_duration};
use super::{ByteSize, Problems, parse_byte_size};

/// Validated `lifecycle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifecyclePolicy {
    /// No request through nginx for this long puts a preview to sleep; `None`: never (`0`).
    pub sleep_after: Option<Duration>,
    /// How long a request that is not a browser's waits for a sleeping preview to wake before it
    /// is answered 503.
    pub wake_timeout: Duration,
    /// Previews awake at once; waking or launching one more puts the least recently used to sleep.
    pub max_awake: Option<usize>,
    /// The same, counted in the memory limits of awake previews' containers (app and services).
    pub max_awake_memory: Option<u64>,
}

impl Default for LifecyclePolicy {
    fn default() -> Self {
        Self { sleep_after: None, wake_timeout: Duration::from_secs(30), max_awake: None, max_awake_memory: None }
    }
}

impl LifecyclePolicy {
    /// How often previews are checked for idleness: often enough that one sleeps within a tenth
    /// of `sleep_after` of its last request (at most every 10 s, at least every 100 ms).
    pub fn sweep_every(&self) -> Option<Duration> {
        self.sleep_after.map(|after| (after / 10).clamp(Duration::from_millis(100), Duration::from_secs(10)))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLifecycle {
    sleep_after: Option<RawDuration>,
    wake_timeout: Option<RawDuration>,
    max_awake: Option<usize>,
    max_awake_memory: Option<ByteSize>,
}

pub(super) fn validate(raw: RawLifecycle, problems: &mut Problems) -> LifecyclePolicy {
    let defaults = LifecyclePolicy::default();
    let sleep_after = match raw.sleep_after.map(|after| parse_duration(&after)) {
        None => None,
        Some(Ok(after)) => Some(after).filter(|after| !after.is_zero()),
        Some(Err(message)) => {
            problems.add("lifecycle.sleep_after", message);
            None
        }
    };
    let wake_timeout =
        positive_duration(raw.wake_timeout, "lifecycle.wake_timeout", "30s", defaults.wake_timeout, problems);
    if raw.max_awake == Some(0) {
        problems.add("lifecycle.max_awake", "must be at least 1 (leave it out for no cap)");
    }
    let max_awake = raw.max_awake.filter(|max| *max > 0);
    let max_awake_memory = match raw.max_awake_memory.map(|size| parse_byte_size(&size)) {
        None => None,
        Some(Ok(bytes)) if bytes > 0 => Some(bytes as u64),
        Some(Ok(_)) => {
            problems.add("lifecycle.max_awake_memory", "must be more than 0, e.g. 16g (leave it out for no cap)");
            None
        }
        Some(Err(message)) => {
            problems.add("lifecycle.max_awake_memory", message);
            None
        }
    };
    LifecyclePolicy { sleep_after, wake_timeout, max_awake, max_awake_memory }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<LifecyclePolicy, Vec<String>> {
        let raw: RawLifecycle = serde_norway::from_str(yaml).map_err(|err| vec![err.to_string()])?;
        let mut problems = Problems::default();
        let policy = validate(raw, &mut problems);
        if problems.0.is_empty() { Ok(policy) } else { Err(problems.0.iter().map(|p| p.message.clone()).collect()) }
    }

    #[test]
    fn durations_are_seconds_or_text_and_zero_means_never() {
        let policy = parse("sleep_after: 30m\nwake_timeout: 45").unwrap();
        assert_eq!(policy.sleep_after, Some(Duration::from_secs(1800)));
        assert_eq!(policy.wake_timeout, Duration::from_secs(45));
        assert_eq!(parse("sleep_after: 0").unwrap().sleep_after, None);
        assert_eq!(parse("{}").unwrap(), LifecyclePolicy::default());
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let errors = parse("sleep_after: soon\nwake_timeout: 0").unwrap_err();
        assert!(errors.iter().any(|e| e.starts_with("lifecycle.sleep_after")), "{errors:?}");
        assert!(errors.iter().any(|e| e.starts_with("lifecycle.wake_timeout") && e.contains("30s")), "{errors:?}");
        assert!(parse("quiet_hours: {}").is_err(), "a key previewd does not know is refused");
        let errors = parse("max_awake: 0\nmax_awake_memory: lots").unwrap_err();
        assert!(errors.iter().any(|e| e.starts_with("lifecycle.max_awake:")), "{errors:?}");
        assert!(errors.iter().any(|e| e.starts_with("lifecycle.max_awake_memory")), "{errors:?}");
    }

    #[test]
    fn caps_on_awake_previews_are_a_count_and_bytes() {
        let policy = parse("max_awake: 20\nmax_awake_memory: 16g").unwrap();
        assert_eq!((policy.max_awake, policy.max_awake_memory), (Some(20), Some(16 << 30)));
    }

    #[test]
    fn idle_previews_are_looked_for_ten_times_per_sleep_after_within_bounds() {
        let every = |after: u64| {
            LifecyclePolicy { sleep_after: Some(Duration::from_secs(after)), ..Default::default() }.sweep_every()
        };
        assert_eq!(every(1800), Some(Duration::from_secs(10)));
        assert_eq!(every(20), Some(Duration::from_secs(2)));
        assert_eq!(every(0), Some(Duration::from_millis(100)));
        assert_eq!(LifecyclePolicy::default().sweep_every(), None);
    }
}
