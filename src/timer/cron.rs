//! Standard 5-field cron expressions (`minute hour day-of-month month day-of-week`) and the
//! next time one fires in a time zone.
//!
//! Each field is `*`, a number, a name (`jan`..`dec`, `sun`..`sat`), a range `a-b`, any of
//! these with a step (`*/15`, `10-50/20`, `5/10` meaning `5-max/10`), or a comma-separated
//! list of them. Day-of-week 7 is Sunday, like 0. As in Vixie cron, when both day-of-month and
//! day-of-week are restricted (neither starts with `*`), a day matches if either does.
//!
//! Daylight-saving time: each local time fires at most once. A local time that a spring
//! transition skips fires once, when the clocks go forward (`30 2 * * *` in Europe/Paris runs
//! at 03:00 on the last Sunday of March); a local time that an autumn transition repeats fires
//! at its first occurrence only.

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use std::fmt;

/// How many days ahead the next run is looked for: every valid expression fires within 8
/// years (February 29 of the next leap year, across a century that is not one).
const HORIZON_DAYS: u32 = 8 * 366 + 7;

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// A parsed cron expression.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct CronSchedule {
    /// Bit `m` set: minute `m` matches (0-59).
    minutes: u64,
    /// Hours 0-23.
    hours: u64,
    /// Days of the month 1-31.
    days_of_month: u64,
    /// Months 1-12.
    months: u64,
    /// Days of the week 0-6, Sunday 0.
    days_of_week: u64,
    /// Whether the day-of-month field starts with `*`.
    any_day_of_month: bool,
    /// Whether the day-of-week field starts with `*`.
    any_day_of_week: bool,
}

impl fmt::Debug for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = |b: u64| (0..64).filter(|i| b & (1 << i) != 0).collect::<Vec<u32>>();
        f.debug_struct("CronSchedule")
            .field("minutes", &bits(self.minutes))
            .field("hours", &bits(self.hours))
            .field("days_of_month", &bits(self.days_of_month))
            .field("months", &bits(self.months))
            .field("days_of_week", &bits(self.days_of_week))
            .finish()
    }
}

/// One field's bounds and names.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    /// The number of the first name (`jan` is 1, `sun` is 0).
    first_name: u32,
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
        first_name: 0,
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
        first_name: 0,
    },
    Field {
        name: "day-of-month",
        min: 1,
        max: 31,
        names: &[],
        first_name: 0,
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
        names: &MONTHS,
        first_name: 1,
    },
    Field {
        name: "day-of-week",
        min: 0,
        max: 7,
        names: &DAYS,
        first_name: 0,
    },
];

impl Field {
    fn value(&self, s: &str) -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = self.names.iter().position(|n| *n == lower) {
            return Ok(i as u32 + self.first_name);
        }
        let n: u32 = s.parse().map_err(|_| {
            let names = if self.names.is_empty() {
                String::new()
            } else {
                format!(" or a name ({})", self.names.join(", "))
            };
            format!("{} field: {s:?} is not a number{names}", self.name)
        })?;
        if n < self.min || n > self.max {
            return Err(format!(
                "{} field: {n} is out of range {}-{}",
                self.name, self.min, self.max
            ));
        }
        Ok(n)
    }

    /// The set of values `spec` (one field of the expression) stands for.
    fn parse(&self, spec: &str) -> Result<u64, String> {
        let mut set = 0u64;
        for item in spec.split(',') {
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => {
                    let step: u32 = s.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                        format!("{} field: step {s:?} is not a positive number", self.name)
                    })?;
                    (r, Some(step))
                }
                None => (item, None),
            };
            let (lo, hi) = if range == "*" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                (self.value(a)?, self.value(b)?)
            } else {
                let v = self.value(range)?;
                // `5/10` runs from 5 to the end of the range.
                (v, if step.is_some() { self.max } else { v })
            };
            if lo > hi {
                return Err(format!(
                    "{} field: range {range:?} goes backwards",
                    self.name
                ));
            }
            let step = step.unwrap_or(1);
            let mut v = lo;
            while v <= hi {
                set |= 1 << v;
                v += step;
            }
        }
        Ok(set)
    }
}

impl CronSchedule {
    /// Parses a 5-field expression; the error says which field is wrong and why.
    pub(crate) fn parse(expression: &str) -> Result<Self, String> {
        let parts: Vec<&str> = expression.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = parts[..] else {
            return Err(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week), got {}",
                parts.len()
            ));
        };
        let minutes = FIELDS[0].parse(minute)?;
        let hours = FIELDS[1].parse(hour)?;
        let days_of_month = FIELDS[2].parse(dom)?;
        let months = FIELDS[3].parse(month)?;
        let mut days_of_week = FIELDS[4].parse(dow)?;
        // 7 is Sunday too.
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week & !(1 << 7)) | 1;
        }
        let schedule = Self {
            minutes,
            hours,
            days_of_month,
            months,
            days_of_week,
            any_day_of_month: dom.starts_with('*'),
            any_day_of_week: dow.starts_with('*'),
        };
        if !schedule.can_fire() {
            return Err("it never fires: no selected month has the selected days".into());
        }
        Ok(schedule)
    }

    /// Whether some day matches: a day of the month that exists in one of the months (the
    /// day of the week matches some day of every month).
    fn can_fire(&self) -> bool {
        if self.any_day_of_month || !self.any_day_of_week {
            return true;
        }
        (1..=12u32).any(|m| {
            let longest = match m {
                2 => 29,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            self.months & (1 << m) != 0 && (1..=longest).any(|d| self.days_of_month & (1 << d) != 0)
        })
    }

    fn matches_day(&self, date: NaiveDate) -> bool {
        if self.months & (1 << date.month()) == 0 {
            return false;
        }
        let dom = self.days_of_month & (1 << date.day()) != 0;
        let dow = self.days_of_week & (1 << date.weekday().num_days_from_sunday()) != 0;
        match (self.any_day_of_month, self.any_day_of_week) {
            // Vixie cron: both restricted, either may match.
            (false, false) => dom || dow,
            (true, false) => dow,
            (false, true) => dom,
            (true, true) => true,
        }
    }

    /// The first time after `after` (strictly) at which the schedule fires in `tz`, or `None`
    /// if it does not within the search horizon.
    pub(crate) fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        // The instant of a local time never decreases as the local time increases (see
        // `instant`), so the first matching local time whose instant is after `after` is the
        // answer, and no local time before `after`'s own can be.
        let local = after.with_timezone(&tz).naive_local();
        let start = local.with_second(0)?.with_nanosecond(0)?;
        let mut date = start.date();
        for _ in 0..HORIZON_DAYS {
            if self.matches_day(date) {
                for hour in bits(self.hours) {
                    for minute in bits(self.minutes) {
                        let candidate = date.and_hms_opt(hour, minute, 0)?;
                        if candidate < start {
                            continue;
                        }
                        if let Some(at) = instant(candidate, tz) {
                            if at > after {
                                return Some(at);
                            }
                        }
                    }
                }
            }
            date = date.succ_opt()?;
        }
        None
    }
}

fn bits(set: u64) -> impl Iterator<Item = u32> {
    (0..64).filter(move |i| set & (1u64 << i) != 0)
}

/// When local time `local` happens in `tz`: its first occurrence if the clocks show it twice,
/// and the end of the gap (when the clocks go forward) if they skip it.
fn instant(local: NaiveDateTime, tz: Tz) -> Option<DateTime<Utc>> {
    let mut t = local;
    // Gaps are at most a day long; look for the first local minute after this one that exists.
    for _ in 0..=24 * 60 {
        if let Some(at) = tz.from_local_datetime(&t).earliest() {
            return Some(at.with_timezone(&Utc));
        }
        t = t.checked_add_signed(Duration::minutes(1))?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("a valid test timestamp")
            .with_timezone(&Utc)
    }

    fn parse(expression: &str) -> CronSchedule {
        CronSchedule::parse(expression).expect("a valid test expression")
    }

    /// The first `n` runs after `from`, in RFC 3339 (UTC).
    fn runs(expression: &str, tz: Tz, from: &str, n: usize) -> Vec<String> {
        let schedule = parse(expression);
        let mut at = utc(from);
        (0..n)
            .map(|_| {
                at = schedule
                    .next_after(at, tz)
                    .expect("the schedule fires again");
                at.to_rfc3339()
            })
            .collect()
    }

    #[test]
    fn fields_take_stars_lists_ranges_steps_and_names() {
        let s = parse("*/15 9-17/4 1,15 jan-mar,DEC mon-fri");
        assert_eq!(bits(s.minutes).collect::<Vec<_>>(), [0, 15, 30, 45]);
        assert_eq!(bits(s.hours).collect::<Vec<_>>(), [9, 13, 17]);
        assert_eq!(bits(s.days_of_month).collect::<Vec<_>>(), [1, 15]);
        assert_eq!(bits(s.months).collect::<Vec<_>>(), [1, 2, 3, 12]);
        assert_eq!(bits(s.days_of_week).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        assert_eq!(
            bits(parse("5/20 * * * *").minutes).collect::<Vec<_>>(),
            [5, 25, 45]
        );
    }

    #[test]
    fn day_of_week_seven_is_sunday() {
        assert_eq!(parse("0 0 * * 7").days_of_week, 1);
        assert_eq!(parse("0 0 * * 5-7").days_of_week, 0b110_0001);
    }

    #[test]
    fn invalid_expressions_say_which_field_is_wrong() {
        let cases = [
            ("* * * *", "expected 5 fields"),
            ("60 * * * *", "minute field: 60 is out of range 0-59"),
            ("* 24 * * *", "hour field: 24 is out of range 0-23"),
            ("* * 0 * *", "day-of-month field: 0 is out of range 1-31"),
            ("* * * 13 *", "month field: 13 is out of range 1-12"),
            (
                "* * * foo *",
                "month field: \"foo\" is not a number or a name",
            ),
            ("* * * * 8", "day-of-week field: 8 is out of range 0-7"),
            (
                "*/0 * * * *",
                "minute field: step \"0\" is not a positive number",
            ),
            (
                "30-10 * * * *",
                "minute field: range \"30-10\" goes backwards",
            ),
            ("0 0 30 feb *", "never fires"),
            ("a b c d e", "minute field: \"a\" is not a number"),
        ];
        for (expression, expected) in cases {
            let e = CronSchedule::parse(expression).expect_err(expression);
            assert!(e.contains(expected), "{expression:?}: got {e:?}");
        }
    }

    #[test]
    fn top_of_every_hour() {
        assert_eq!(
            runs("0 * * * *", Tz::UTC, "2024-01-01T10:00:00Z", 3),
            [
                "2024-01-01T11:00:00+00:00",
                "2024-01-01T12:00:00+00:00",
                "2024-01-01T13:00:00+00:00"
            ]
        );
        // From inside an hour, the next top of the hour.
        assert_eq!(
            runs("0 * * * *", Tz::UTC, "2024-01-01T10:59:59.9Z", 1),
            ["2024-01-01T11:00:00+00:00"]
        );
    }

    #[test]
    fn restricted_day_of_month_and_day_of_week_either_match() {
        // 2024-06-13 is a Thursday: the 14th is a Friday, the 15th the next match by date.
        assert_eq!(
            runs("0 12 15 * fri", Tz::UTC, "2024-06-13T00:00:00Z", 3),
            [
                "2024-06-14T12:00:00+00:00",
                "2024-06-15T12:00:00+00:00",
                "2024-06-21T12:00:00+00:00"
            ]
        );
        // With `*` day-of-month only the weekday counts.
        assert_eq!(
            runs("0 12 * * fri", Tz::UTC, "2024-06-13T00:00:00Z", 2),
            ["2024-06-14T12:00:00+00:00", "2024-06-21T12:00:00+00:00"]
        );
    }

    #[test]
    fn february_29_is_found_years_ahead() {
        assert_eq!(
            runs("0 0 29 2 *", Tz::UTC, "2097-03-01T00:00:00Z", 1),
            ["2104-02-29T00:00:00+00:00"]
        );
    }

    #[test]
    fn a_time_zone_shifts_the_runs() {
        // 09:30 in Paris is 08:30 UTC in winter and 07:30 UTC in summer.
        let paris = chrono_tz::Europe::Paris;
        assert_eq!(
            runs("30 9 * * *", paris, "2024-01-10T12:00:00Z", 1),
            ["2024-01-11T08:30:00+00:00"]
        );
        assert_eq!(
            runs("30 9 * * *", paris, "2024-07-10T12:00:00Z", 1),
            ["2024-07-11T07:30:00+00:00"]
        );
    }

    #[test]
    fn a_local_time_skipped_in_spring_runs_once_when_the_clocks_go_forward() {
        // Europe/Paris, 2024-03-31: 02:00 CET (01:00 UTC) becomes 03:00 CEST.
        let paris = chrono_tz::Europe::Paris;
        assert_eq!(
            runs("30 2 * * *", paris, "2024-03-30T12:00:00Z", 2),
            ["2024-03-31T01:00:00+00:00", "2024-04-01T00:30:00+00:00"]
        );
        // Hourly: 01:00 CET, then 03:00 CEST (02:00 and 03:00 both fall on 01:00 UTC: once).
        assert_eq!(
            runs("0 * * * *", paris, "2024-03-30T23:30:00Z", 3),
            [
                "2024-03-31T00:00:00+00:00",
                "2024-03-31T01:00:00+00:00",
                "2024-03-31T02:00:00+00:00"
            ]
        );
    }

    #[test]
    fn a_local_time_repeated_in_autumn_runs_once() {
        // Europe/Paris, 2024-10-27: 03:00 CEST (01:00 UTC) becomes 02:00 CET.
        let paris = chrono_tz::Europe::Paris;
        assert_eq!(
            runs("30 2 * * *", paris, "2024-10-26T12:00:00Z", 2),
            ["2024-10-27T00:30:00+00:00", "2024-10-28T01:30:00+00:00"]
        );
        // Hourly: 02:00 CEST, then 03:00 CET; not 02:00 CET again.
        assert_eq!(
            runs("0 * * * *", paris, "2024-10-26T23:30:00Z", 3),
            [
                "2024-10-27T00:00:00+00:00",
                "2024-10-27T02:00:00+00:00",
                "2024-10-27T03:00:00+00:00"
            ]
        );
        // Starting inside the repeated hour (02:10 CET), 02:30 CET is not run again.
        assert_eq!(
            runs("30 2 * * *", paris, "2024-10-27T01:10:00Z", 1),
            ["2024-10-28T01:30:00+00:00"]
        );
    }
}
