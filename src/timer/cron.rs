//! Cron expressions and the next time one fires in a time zone, with the `croner` crate:
//! 5 fields (`minute hour day-of-month month day-of-week`), each `*`, a number, a name
//! (`jan`..`dec`, `sun`..`sat`), a range `a-b`, a step (`*/15`, `10-50/20`, `5/10` meaning
//! `5-max/10`), or a list of them; Vixie cron's nicknames (`@daily`, `@hourly`, ...) and its extensions `L` (last day of
//! the month, `5L` last Friday), `#` (`5#2`: the second Friday) and `W` (`15W`: the weekday
//! nearest the 15th). Day-of-week 7 is Sunday, like 0. As in Vixie cron, when both
//! day-of-month and day-of-week are restricted, a day matches if either does.
//!
//! Daylight-saving time, as Vixie cron: a local time that a spring transition skips fires
//! once, when the clocks go forward (`30 2 * * *` in Europe/Paris runs at 03:00 on the last
//! Sunday of March); a fixed local time that an autumn transition repeats fires at its first
//! occurrence only, while a job whose hour is a wildcard (`0 * * * *`) runs every hour that
//! passes, the repeated one included.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use std::fmt;

/// The fields of a 5-field expression, in order.
const FIELDS: [&str; 5] = ["minute", "hour", "day-of-month", "month", "day-of-week"];

/// The smallest and the largest value of each field.
const MIN: [u32; 5] = [0, 0, 1, 1, 0];
const MAX: [u32; 5] = [59, 23, 31, 12, 7];

fn parse_pattern(expression: &str) -> Result<croner::Cron, croner::errors::CronError> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Disallowed)
        .build()
        .parse(&with_open_steps(expression))
}

/// `expression` with each `start/step` written `start-max/step`, which is what it means here
/// (as in many crons; `croner` takes steps only after `*` or a range).
fn with_open_steps(expression: &str) -> String {
    let fields: Vec<&str> = expression.split_whitespace().collect();
    if fields.len() != FIELDS.len() {
        return expression.to_owned();
    }
    let open_step = |item: &str, max: u32| match item.split_once('/') {
        Some((start, step)) if !start.is_empty() && start.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{start}-{max}/{step}")
        }
        _ => item.to_owned(),
    };
    fields
        .iter()
        .zip(MAX)
        .map(|(field, max)| {
            field
                .split(',')
                .map(|item| open_step(item, max))
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why `expression` does not parse: `croner`'s reason, with the field it is about (found by
/// parsing each field with wildcards in the others).
fn why(expression: &str, error: &croner::errors::CronError) -> String {
    let fields: Vec<&str> = expression.split_whitespace().collect();
    if fields.len() != FIELDS.len() || expression.trim_start().starts_with('@') {
        return format!(
            "{error} (expected 5 fields: minute hour day-of-month month day-of-week, or a \
             nickname such as @daily)"
        );
    }
    for (i, field) in fields.iter().enumerate() {
        let mut alone = ["*"; 5];
        alone[i] = field;
        if let Err(e) = parse_pattern(&alone.join(" ")) {
            let (name, low, high) = (FIELDS[i], MIN[i], MAX[i]);
            let detail = match &e {
                croner::errors::CronError::ComponentError(m) if m.starts_with("Number out") => {
                    format!("{field} is out of range {low}-{high}")
                }
                croner::errors::CronError::ComponentError(m) if m.starts_with("Range out") => {
                    format!("range {field} must go upwards within {low}-{high}")
                }
                croner::errors::CronError::ComponentError(m) => format!("{field:?}: {m}"),
                croner::errors::CronError::IllegalCharacters(_) => {
                    format!("{field:?} is not a number, a name, a range or a step")
                }
                other => format!("{field:?}: {other}"),
            };
            return format!("{name} field: {detail}");
        }
    }
    error.to_string()
}

/// A parsed cron expression.
#[derive(Clone)]
pub(crate) struct CronSchedule {
    cron: Box<croner::Cron>,
}

impl fmt::Debug for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CronSchedule")
            .field(&self.cron.pattern.to_string())
            .finish()
    }
}

impl CronSchedule {
    /// Parses an expression; the error names the field that is wrong and why.
    pub(crate) fn parse(expression: &str) -> Result<Self, String> {
        let cron = parse_pattern(expression).map_err(|e| why(expression, &e))?;
        let schedule = Self {
            cron: Box::new(cron),
        };
        // Some expressions name days that never come (`0 0 30 feb *`).
        let from = DateTime::<Utc>::UNIX_EPOCH;
        if schedule.next_after(from, Tz::UTC).is_none() {
            return Err("it never fires: no selected month has the selected days".into());
        }
        Ok(schedule)
    }

    /// The first time after `after` (strictly) at which the schedule fires in `tz`, or `None`
    /// if it does not.
    pub(crate) fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&tz), false)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    }
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
        // 2024-01-01 is a Monday: a weekday in January (either restriction matches).
        assert_eq!(
            runs(
                "*/15 9-17/4 1,15 jan-mar,DEC mon-fri",
                Tz::UTC,
                "2024-01-01T00:00:00Z",
                6
            ),
            [
                "2024-01-01T09:00:00+00:00",
                "2024-01-01T09:15:00+00:00",
                "2024-01-01T09:30:00+00:00",
                "2024-01-01T09:45:00+00:00",
                "2024-01-01T13:00:00+00:00",
                "2024-01-01T13:15:00+00:00"
            ]
        );
        // `5/20`: from 5, every 20.
        assert_eq!(
            runs("5/20 * * * *", Tz::UTC, "2024-01-01T10:00:00Z", 3),
            [
                "2024-01-01T10:05:00+00:00",
                "2024-01-01T10:25:00+00:00",
                "2024-01-01T10:45:00+00:00"
            ]
        );
        // April is not selected: the 15th of December comes next.
        assert_eq!(
            runs("0 12 15 jan-mar,dec *", Tz::UTC, "2024-03-20T00:00:00Z", 1),
            ["2024-12-15T12:00:00+00:00"]
        );
    }

    #[test]
    fn day_of_week_seven_is_sunday() {
        // 2024-06-12 is a Wednesday.
        assert_eq!(
            runs("0 0 * * 7", Tz::UTC, "2024-06-12T00:00:00Z", 1),
            ["2024-06-16T00:00:00+00:00"]
        );
        assert_eq!(
            runs("0 0 * * 5-7", Tz::UTC, "2024-06-12T00:00:00Z", 4),
            [
                "2024-06-14T00:00:00+00:00",
                "2024-06-15T00:00:00+00:00",
                "2024-06-16T00:00:00+00:00",
                "2024-06-21T00:00:00+00:00"
            ]
        );
    }

    #[test]
    fn nicknames_last_days_nth_weekdays_and_nearest_weekdays() {
        assert_eq!(
            runs("@daily", Tz::UTC, "2024-06-12T10:00:00Z", 1),
            ["2024-06-13T00:00:00+00:00"]
        );
        // The last day of June, then of July.
        assert_eq!(
            runs("0 0 L * *", Tz::UTC, "2024-06-12T00:00:00Z", 2),
            ["2024-06-30T00:00:00+00:00", "2024-07-31T00:00:00+00:00"]
        );
        // The second Friday of the month: 2024-06-14, 2024-07-12.
        assert_eq!(
            runs("0 0 * * 5#2", Tz::UTC, "2024-06-01T00:00:00Z", 2),
            ["2024-06-14T00:00:00+00:00", "2024-07-12T00:00:00+00:00"]
        );
        // 2024-06-15 is a Saturday: the nearest weekday is Friday the 14th.
        assert_eq!(
            runs("0 9 15W * *", Tz::UTC, "2024-06-01T00:00:00Z", 1),
            ["2024-06-14T09:00:00+00:00"]
        );
    }

    #[test]
    fn invalid_expressions_say_which_field_is_wrong() {
        let cases = [
            ("* * * *", "expected 5 fields"),
            ("60 * * * *", "minute field: 60 is out of range 0-59"),
            ("* 24 * * *", "hour field: 24 is out of range 0-23"),
            ("* * 0 * *", "day-of-month field: 0 is out of range 1-31"),
            ("* * * 13 *", "month field: 13 is out of range 1-12"),
            ("* * * foo *", "month field: \"foo\" is not a number"),
            ("* * * * 8", "day-of-week field: 8 is out of range 0-7"),
            ("*/0 * * * *", "minute field: \"*/0\""),
            ("30-10 * * * *", "minute field: range 30-10 must go upwards"),
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
    fn a_fixed_local_time_repeated_in_autumn_runs_once_and_hourly_jobs_run_every_hour() {
        // Europe/Paris, 2024-10-27: 03:00 CEST (01:00 UTC) becomes 02:00 CET.
        let paris = chrono_tz::Europe::Paris;
        assert_eq!(
            runs("30 2 * * *", paris, "2024-10-26T12:00:00Z", 2),
            ["2024-10-27T00:30:00+00:00", "2024-10-28T01:30:00+00:00"]
        );
        // Hourly (a wildcard hour, as Vixie cron): every hour that passes, so 02:00 CEST,
        // 02:00 CET, then 03:00 CET.
        assert_eq!(
            runs("0 * * * *", paris, "2024-10-26T23:30:00Z", 3),
            [
                "2024-10-27T00:00:00+00:00",
                "2024-10-27T01:00:00+00:00",
                "2024-10-27T02:00:00+00:00"
            ]
        );
        // Starting inside the repeated hour (02:10 CET), 02:30 CET is not run again.
        assert_eq!(
            runs("30 2 * * *", paris, "2024-10-27T01:10:00Z", 1),
            ["2024-10-28T01:30:00+00:00"]
        );
    }
}
