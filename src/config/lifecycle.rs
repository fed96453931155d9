//! The `lifecycle` section: when a preview nobody uses goes to sleep (`sleep_after` without a
//! request through nginx) and how long a request for a sleeping preview waits for it to wake
//! (`wake_timeout`).

use std::time::Duration;

use serde::Deserialize;

use super::Problems;
use super::builds::{RawDuration, parse_duration, positive_duration};

/// Validated `lifecycle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifecyclePolicy {
    /// No request through nginx for this long puts a preview to sleep; `None`: never (`0`).
    pub sleep_after: Option<Duration>,
    /// How long a request that is not a browser's waits for a sleeping preview to wake before it
    /// is answered 503.
    pub wake_timeout: Duration,
}

impl Default for LifecyclePolicy {
    fn default() -> Self {
        Self { sleep_after: None, wake_timeout: Duration::from_secs(30) }
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
    LifecyclePolicy { sleep_after, wake_timeout }
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
        assert!(parse("max_awake: 3").is_err(), "a key previewd does not know is refused");
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
