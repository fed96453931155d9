//! The `lifecycle` section: when a preview nobody uses goes to sleep (`sleep_after` without a
//! request through nginx) and when it is removed (`remove_after` without a request or a deploy),
//! how long a request for a sleeping preview waits for it to wake (`wake_timeout`), how many
//! previews may be awake at once (`max_awake`, `max_awake_memory`), the team's night
//! (`quiet_hours`) and the pull-request label that keeps a preview awake (`keep_awake_label`).

use std::time::Duration;

use serde::Deserialize;

use super::builds::{RawDuration, parse_duration, positive_duration};
use super::{ByteSize, Problems, parse_byte_size};

/// Validated `lifecycle`.
#[derive(Debug, Clone, PartialEq)]
pub struct LifecyclePolicy {
    /// No request through nginx for this long puts a preview to sleep; `None`: never (`0`).
    pub sleep_after: Option<Duration>,
    /// No request and no deploy for this long removes a preview; `None`: never (`0`).
    pub remove_after: Option<Duration>,
    /// How long a request that is not a browser's waits for a sleeping preview to wake before it
    /// is answered 503.
    pub wake_timeout: Duration,
    /// Previews awake at once; waking or launching one more puts the least recently used to sleep.
    pub max_awake: Option<usize>,
    /// The same, counted in the memory limits of awake previews' containers (app and services).
    pub max_awake_memory: Option<u64>,
    /// When every awake preview is put to sleep (requests still wake one).
    pub quiet_hours: Option<QuietHours>,
    /// A pull request with this label (compared without case) is never put to sleep nor removed
    /// by age.
    pub keep_awake_label: Option<String>,
}

/// `lifecycle.quiet_hours`: from `from` to `to` (the next day's when `to` comes first) in
/// `timezone`, starting on `days`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuietHours {
    pub from: jiff::civil::Time,
    pub to: jiff::civil::Time,
    /// The days a quiet period starts on.
    pub days: Vec<jiff::civil::Weekday>,
    pub timezone: jiff::tz::TimeZone,
}

impl Default for LifecyclePolicy {
    fn default() -> Self {
        Self {
            sleep_after: None,
            remove_after: None,
            wake_timeout: Duration::from_secs(30),
            max_awake: None,
            max_awake_memory: None,
            quiet_hours: None,
            keep_awake_label: None,
        }
    }
}

impl LifecyclePolicy {
    /// Whether a setting needs to know each preview's requests (`{{ traffic }}` in the vhost
    /// template): without them a busy preview would sleep or be removed as if unused.
    pub fn follows_traffic(&self) -> bool {
        self.sleep_after.is_some() || self.remove_after.is_some() || self.quiet_hours.is_some()
    }

    /// How often previews are checked for idleness, age and quiet hours: often enough that one
    /// sleeps (or goes) within a tenth of `sleep_after` (`remove_after`) of its last request, at
    /// most every 10 s, at least every 100 ms; every 10 s for quiet hours alone.
    pub fn sweep_every(&self) -> Option<Duration> {
        let tenth = |after: Duration| (after / 10).clamp(Duration::from_millis(100), Duration::from_secs(10));
        let quiet = self.quiet_hours.as_ref().map(|_| Duration::from_secs(10));
        [self.sleep_after.map(tenth), self.remove_after.map(tenth), quiet].into_iter().flatten().min()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLifecycle {
    sleep_after: Option<RawDuration>,
    remove_after: Option<RawDuration>,
    wake_timeout: Option<RawDuration>,
    max_awake: Option<usize>,
    max_awake_memory: Option<ByteSize>,
    quiet_hours: Option<RawQuietHours>,
    keep_awake_label: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuietHours {
    from: String,
    to: String,
    days: Option<Vec<String>>,
    timezone: Option<String>,
}

/// A duration where `0` means never.
fn optional_duration(raw: Option<RawDuration>, key: &str, problems: &mut Problems) -> Option<Duration> {
    match raw.map(|after| parse_duration(&after)) {
        None => None,
        Some(Ok(after)) => Some(after).filter(|after| !after.is_zero()),
        Some(Err(message)) => {
            problems.add(key, message);
            None
        }
    }
}

fn quiet_hours(raw: RawQuietHours, problems: &mut Problems) -> Option<QuietHours> {
    let time = |text: &str, key: &str, problems: &mut Problems| match jiff::civil::Time::strptime("%H:%M", text) {
        Ok(time) => Some(time),
        Err(_) => {
            problems.add(key, format!("{text:?} is not a time of day as HH:MM, e.g. \"20:00\""));
            None
        }
    };
    let from = time(&raw.from, "lifecycle.quiet_hours.from", problems);
    let to = time(&raw.to, "lifecycle.quiet_hours.to", problems);
    let zone_name = raw.timezone.unwrap_or_else(|| "UTC".to_owned());
    let timezone = match jiff::tz::TimeZone::get(&zone_name) {
        Ok(zone) => Some(zone),
        Err(_) => {
            problems.add(
                "lifecycle.quiet_hours.timezone",
                format!("{zone_name:?} is not a time zone of the IANA database, e.g. Europe/Paris or UTC"),
            );
            None
        }
    };
    let days = match raw.days {
        None => Some(ALL_DAYS.iter().map(|(_, day)| *day).collect()),
        Some(days) if days.is_empty() => {
            problems.add("lifecycle.quiet_hours.days", "lists no day (leave it out for every day)");
            None
        }
        Some(days) => days
            .iter()
            .map(|text| {
                let day = ALL_DAYS.iter().find(|(name, _)| text.to_ascii_lowercase().starts_with(name));
                day.map(|(_, day)| *day).ok_or_else(|| {
                    problems.add(
                        "lifecycle.quiet_hours.days",
                        format!("{text:?} is not a day: use mon, tue, wed, thu, fri, sat, sun"),
                    )
                })
            })
            .collect::<Result<Vec<_>, ()>>()
            .ok(),
    };
    if from.is_some() && from == to {
        problems.add("lifecycle.quiet_hours", "from and to are the same time: a quiet period needs a length");
        return None;
    }
    Some(QuietHours { from: from?, to: to?, days: days?, timezone: timezone? })
}

const ALL_DAYS: [(&str, jiff::civil::Weekday); 7] = [
    ("mon", jiff::civil::Weekday::Monday),
    ("tue", jiff::civil::Weekday::Tuesday),
    ("wed", jiff::civil::Weekday::Wednesday),
    ("thu", jiff::civil::Weekday::Thursday),
    ("fri", jiff::civil::Weekday::Friday),
    ("sat", jiff::civil::Weekday::Saturday),
    ("sun", jiff::civil::Weekday::Sunday),
];

pub(super) fn validate(raw: RawLifecycle, problems: &mut Problems) -> LifecyclePolicy {
    let defaults = LifecyclePolicy::default();
    let sleep_after = optional_duration(raw.sleep_after, "lifecycle.sleep_after", problems);
    let remove_after = optional_duration(raw.remove_after, "lifecycle.remove_after", problems);
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
    let quiet_hours = raw.quiet_hours.and_then(|raw| quiet_hours(raw, problems));
    let keep_awake_label = match raw.keep_awake_label.map(|label| label.trim().to_owned()) {
        Some(label) if label.is_empty() => {
            problems.add("lifecycle.keep_awake_label", "is empty (leave it out for no such label)");
            None
        }
        label => label,
    };
    LifecyclePolicy {
        sleep_after,
        remove_after,
        wake_timeout,
        max_awake,
        max_awake_memory,
        quiet_hours,
        keep_awake_label,
    }
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
        assert!(parse("quiet_hour: {}").is_err(), "a key previewd does not know is refused");
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
    fn quiet_hours_read_times_days_and_a_time_zone() {
        let policy = parse(
            "quiet_hours: {from: \"20:00\", to: \"07:00\", days: [mon, tue, Friday], timezone: Europe/Paris}\nremove_after: 7d\nkeep_awake_label: keep-awake",
        )
        .unwrap();
        let quiet = policy.quiet_hours.unwrap();
        assert_eq!((quiet.from, quiet.to), (jiff::civil::time(20, 0, 0, 0), jiff::civil::time(7, 0, 0, 0)));
        use jiff::civil::Weekday::{Friday, Monday, Tuesday};
        assert_eq!(quiet.days, vec![Monday, Tuesday, Friday]);
        assert_eq!(quiet.timezone.iana_name(), Some("Europe/Paris"));
        assert_eq!(policy.remove_after, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(policy.keep_awake_label.as_deref(), Some("keep-awake"));
        let every_day = parse("quiet_hours: {from: \"22:00\", to: \"23:00\"}").unwrap().quiet_hours.unwrap();
        assert_eq!((every_day.days.len(), every_day.timezone.iana_name()), (7, Some("UTC")));
    }

    #[test]
    fn bad_quiet_hours_are_refused_saying_what_to_write() {
        let errors =
            parse("quiet_hours: {from: \"8pm\", to: \"07:00\", days: [someday], timezone: Mars/Olympus}").unwrap_err();
        assert!(
            errors.iter().any(|e| e.starts_with("lifecycle.quiet_hours.from") && e.contains("HH:MM")),
            "{errors:?}"
        );
        assert!(errors.iter().any(|e| e.starts_with("lifecycle.quiet_hours.days") && e.contains("mon")), "{errors:?}");
        assert!(errors.iter().any(|e| e.starts_with("lifecycle.quiet_hours.timezone")), "{errors:?}");
        let errors = parse("quiet_hours: {from: \"20:00\", to: \"20:00\"}").unwrap_err();
        assert!(errors.iter().any(|e| e.contains("same time")), "{errors:?}");
        assert!(parse("keep_awake_label: \" \"").is_err());
        assert!(parse("remove_after: sometime").unwrap_err().iter().any(|e| e.starts_with("lifecycle.remove_after")));
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
        let removal_only = LifecyclePolicy { remove_after: Some(Duration::from_secs(5)), ..Default::default() };
        assert_eq!(removal_only.sweep_every(), Some(Duration::from_millis(500)));
    }
}
