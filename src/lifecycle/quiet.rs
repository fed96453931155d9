//! Quiet hours (`lifecycle.quiet_hours`): when a quiet period begins, every awake preview that
//! is not pinned or busy goes to sleep; a request still wakes one, and a preview used since the
//! period began is left to `sleep_after`. Which period `now` falls in is pure planning, tested
//! here with chosen moments.

use std::time::SystemTime;

use jiff::Timestamp;
use jiff::civil::Date;

use crate::config::lifecycle::QuietHours;

/// The start of the quiet period `now` falls in, if it falls in one. A period starts at `from`
/// on one of `days` and ends at the next `to` (the next day's when `to` comes first), both in
/// the configured time zone; a start or end in a DST gap or fold is taken as the clock shows it
/// first.
pub fn quiet_since(now: Timestamp, quiet: &QuietHours) -> Option<Timestamp> {
    let today = now.to_zoned_datetime(quiet.timezone.clone()).date();
    let overnight = quiet.to <= quiet.from;
    // A period that began yesterday may still run today.
    [today.yesterday().ok(), Some(today)].into_iter().flatten().rev().find_map(|day| {
        let start = period_start(day, quiet)?;
        let end_day = if overnight { day.tomorrow().ok()? } else { day };
        let end = end_day.to_datetime(quiet.to).to_zoned_datetime(quiet.timezone.clone()).ok()?.timestamp();
        (start <= now && now < end).then_some(start)
    })
}

fn period_start(day: Date, quiet: &QuietHours) -> Option<Timestamp> {
    quiet.days.contains(&day.weekday()).then_some(())?;
    Some(day.to_datetime(quiet.from).to_zoned_datetime(quiet.timezone.clone()).ok()?.timestamp())
}

/// `SystemTime` as a `jiff` timestamp (the epoch when it cannot be one).
pub fn timestamp(at: SystemTime) -> Timestamp {
    Timestamp::try_from(at).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Whether a preview last used at `last` (`None`: not since previewd started) sleeps for a
/// quiet period that began at `since`: only if it was not used after the period began.
pub fn sleeps_for_quiet(last: Option<SystemTime>, since: Timestamp) -> bool {
    last.is_none_or(|last| timestamp(last) < since)
}

#[cfg(test)]
mod tests {
    use jiff::civil::Weekday::{Friday, Monday, Saturday, Sunday, Thursday, Tuesday, Wednesday};
    use jiff::civil::time;
    use jiff::tz::TimeZone;

    use super::*;

    fn paris_nights() -> QuietHours {
        QuietHours {
            from: time(20, 0, 0, 0),
            to: time(7, 0, 0, 0),
            days: vec![Monday, Tuesday, Wednesday, Thursday, Friday],
            timezone: TimeZone::get("Europe/Paris").unwrap(),
        }
    }

    /// A moment given as Paris wall-clock time.
    fn paris(text: &str) -> Timestamp {
        let civil: jiff::civil::DateTime = text.parse().unwrap();
        civil.to_zoned_datetime(TimeZone::get("Europe/Paris").unwrap()).unwrap().timestamp()
    }

    #[test]
    fn a_weeknight_is_quiet_from_its_evening_to_the_next_morning() {
        let quiet = paris_nights();
        // 2026-12-07 is a Monday.
        assert_eq!(quiet_since(paris("2026-12-07T19:59:59"), &quiet), None);
        assert_eq!(quiet_since(paris("2026-12-07T20:00:00"), &quiet), Some(paris("2026-12-07T20:00:00")));
        assert_eq!(quiet_since(paris("2026-12-08T03:00:00"), &quiet), Some(paris("2026-12-07T20:00:00")));
        assert_eq!(quiet_since(paris("2026-12-08T07:00:00"), &quiet), None);
    }

    #[test]
    fn a_period_belongs_to_the_day_it_starts_on() {
        let quiet = paris_nights();
        // Friday night runs into Saturday morning; Saturday and Sunday nights are not quiet.
        assert_eq!(quiet_since(paris("2026-12-12T06:00:00"), &quiet), Some(paris("2026-12-11T20:00:00")));
        assert_eq!(quiet_since(paris("2026-12-12T21:00:00"), &quiet), None);
        assert_eq!(quiet_since(paris("2026-12-14T06:00:00"), &quiet), None, "Sunday night is not quiet");
        let weekend = QuietHours { days: vec![Saturday, Sunday], ..paris_nights() };
        assert_eq!(quiet_since(paris("2026-12-14T06:00:00"), &weekend), Some(paris("2026-12-13T20:00:00")));
    }

    #[test]
    fn a_period_within_one_day_ends_that_day() {
        let lunch = QuietHours { from: time(12, 0, 0, 0), to: time(13, 30, 0, 0), ..paris_nights() };
        assert_eq!(quiet_since(paris("2026-12-08T12:45:00"), &lunch), Some(paris("2026-12-08T12:00:00")));
        assert_eq!(quiet_since(paris("2026-12-08T13:30:00"), &lunch), None);
        assert_eq!(quiet_since(paris("2026-12-08T11:59:00"), &lunch), None);
    }

    #[test]
    fn hours_follow_the_time_zones_clock_across_a_dst_change() {
        let quiet = paris_nights();
        // 2027-03-28 (Sunday) Paris moves from UTC+1 to UTC+2; Monday 20:00 is 18:00 UTC.
        let monday_evening: Timestamp = "2027-03-29T18:00:00Z".parse().unwrap();
        assert_eq!(quiet_since(monday_evening, &quiet), Some(monday_evening));
        let winter_monday: Timestamp = "2026-12-07T19:00:00Z".parse().unwrap();
        assert_eq!(quiet_since(winter_monday, &quiet), Some(winter_monday), "20:00 in Paris is 19:00 UTC in winter");
    }

    #[test]
    fn only_previews_unused_since_the_period_began_sleep_for_it() {
        let since = paris("2026-12-07T20:00:00");
        let at = |text: &str| SystemTime::try_from(paris(text)).unwrap();
        assert!(sleeps_for_quiet(Some(at("2026-12-07T19:00:00")), since));
        assert!(sleeps_for_quiet(None, since));
        assert!(!sleeps_for_quiet(Some(at("2026-12-07T21:00:00")), since), "woken by a request during the night");
    }
}
