//! Wall-clock time as previewd writes it: Unix seconds, UTC dates (ISO 8601 as GitHub writes
//! them, so that they order as text) and short ages for people.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn unix_now() -> i64 {
    unix_seconds(SystemTime::now())
}

pub fn unix_seconds(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Unix seconds as a `SystemTime` (the epoch for a time before it).
pub fn system_time(unix: i64) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(unix).unwrap_or(0))
}

/// A duration as config.yml writes it, in its largest whole unit: `7d`, `36h`, `90m`, `45s`.
pub fn span(duration: std::time::Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0 => "0s".to_owned(),
        _ if secs.is_multiple_of(86_400) => format!("{}d", secs / 86_400),
        _ if secs.is_multiple_of(3600) => format!("{}h", secs / 3600),
        _ if secs.is_multiple_of(60) => format!("{}m", secs / 60),
        _ => format!("{secs}s"),
    }
}

/// A moment in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

/// Unix seconds to UTC in the proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`).
pub fn utc(unix: i64) -> Utc {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400) as u32);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    Utc { year, month, day, hour: secs / 3600, minute: secs % 3600 / 60, second: secs % 60 }
}

/// `2030-01-01T10:00:05Z`.
pub fn iso8601(unix: i64) -> String {
    let t = utc(unix);
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", t.year, t.month, t.day, t.hour, t.minute, t.second)
}

/// `42s`, `5m`, `3h`, `2d`.
pub fn age(seconds: i64) -> String {
    match seconds.max(0) {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_is_written_in_its_largest_whole_unit() {
        let span_of = |secs| span(std::time::Duration::from_secs(secs));
        assert_eq!([span_of(604_800), span_of(129_600), span_of(5400), span_of(45)], ["7d", "36h", "90m", "45s"]);
    }

    #[test]
    fn dates_are_gregorian_and_iso() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_709_164_800), "2024-02-29T00:00:00Z");
        assert_eq!(iso8601(951_782_400 + 3_723), "2000-02-29T01:02:03Z");
    }

    #[test]
    fn ages_are_short() {
        assert_eq!([age(5), age(300), age(7200), age(200_000), age(-3)], ["5s", "5m", "2h", "2d", "0s"]);
    }
}
