use chrono::{Datelike, Duration, TimeZone, Timelike};
use proptest::prelude::*;

use super::*;

fn t(s: &str) -> DateTime<Utc> {
    match DateTime::parse_from_rfc3339(s) {
        Ok(d) => d.with_timezone(&Utc),
        Err(e) => panic!("bad test time {s}: {e}"),
    }
}

fn sched(line: &str) -> CronSchedule {
    match CronSchedule::parse(line) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

/// Start: Friday 2024-03-15 10:07:30 UTC. Expected times worked out by hand
/// and cross-checked with Python's croniter while writing (it agrees on every
/// row except the `*/1` one, where croniter ORs the day fields and robfig does not).
const START: &str = "2024-03-15T10:07:30Z";
const TABLE: &[(&str, &str)] = &[
    ("0 0 * * 0", "2024-03-17T00:00:00Z"),   // Sunday as 0
    ("0 0 * * 7", "2024-03-17T00:00:00Z"),   // Sunday as 7
    ("0 0 * * 1", "2024-03-18T00:00:00Z"),   // Monday, not Sunday (saffron's own numbering)
    ("0 0 * * 1-5", "2024-03-18T00:00:00Z"), // Fri 00:00 passed, weekend skipped
    ("0 0 * * 5-7", "2024-03-16T00:00:00Z"), // Fri, Sat, Sun
    ("0 0 * * 0-6", "2024-03-16T00:00:00Z"),
    ("0 0 * * 7,1", "2024-03-17T00:00:00Z"),
    ("0 0 * * */2", "2024-03-16T00:00:00Z"), // Sun, Tue, Thu, Sat
    ("0 0 * * 1/2", "2024-03-18T00:00:00Z"), // Mon, Wed, Fri
    ("0 0 * * SUN", "2024-03-17T00:00:00Z"),
    ("0 0 * * mon-fri", "2024-03-18T00:00:00Z"),
    ("0 0 * * Sat", "2024-03-16T00:00:00Z"),
    ("*/15 * * * *", "2024-03-15T10:15:00Z"),
    ("0 */6 * * *", "2024-03-15T12:00:00Z"),
    ("30 2 1 * *", "2024-04-01T02:30:00Z"),
    ("0 0 1 * 1", "2024-03-18T00:00:00Z"), // DOM or DOW: Monday comes before the 1st
    ("0 0 13 * 5", "2024-03-22T00:00:00Z"), // the 13th passed; next Friday
    ("0 12 15 * 0", "2024-03-15T12:00:00Z"), // DOM matches today
    ("0 0 */2 * 1", "2024-03-17T00:00:00Z"), // odd days OR Monday
    ("0 0 */1 * 1", "2024-03-18T00:00:00Z"), // `*/1` is a star: Mondays only
    ("0 0 * JAN,JUL *", "2024-07-01T00:00:00Z"),
    ("0 0 * FEB-APR SAT", "2024-03-16T00:00:00Z"),
    ("0 0 1 */3 *", "2024-04-01T00:00:00Z"), // Jan, Apr, Jul, Oct
    ("0 0 */10 * *", "2024-03-21T00:00:00Z"), // 1, 11, 21, 31
    ("0 0 1,15 * *", "2024-04-01T00:00:00Z"),
    ("0 0 31 * *", "2024-03-31T00:00:00Z"),
    ("@daily", "2024-03-16T00:00:00Z"),
    ("@midnight", "2024-03-16T00:00:00Z"),
    ("@weekly", "2024-03-17T00:00:00Z"), // Sunday 00:00
    ("@hourly", "2024-03-15T11:00:00Z"),
    ("@monthly", "2024-04-01T00:00:00Z"),
    ("@yearly", "2025-01-01T00:00:00Z"),
    ("@annually", "2025-01-01T00:00:00Z"),
    ("@DAILY", "2024-03-16T00:00:00Z"),
    ("59 23 31 12 *", "2024-12-31T23:59:00Z"),
    ("0 0 29 2 *", "2028-02-29T00:00:00Z"), // 2024's leap day has passed
    ("1-5/2 * * * *", "2024-03-15T11:01:00Z"),
    ("10/20 * * * *", "2024-03-15T10:10:00Z"), // 10, 30, 50
    ("5 4 * * *", "2024-03-16T04:05:00Z"),
    ("15 10 * * *", "2024-03-15T10:15:00Z"),
    ("7 10 * * *", "2024-03-16T10:07:00Z"), // 10:07 is before 10:07:30
    ("0 9-17 * * 1-5", "2024-03-15T11:00:00Z"),
    ("* * * * *", "2024-03-15T10:08:00Z"),
    ("  0   0 * *   0 ", "2024-03-17T00:00:00Z"),
];

#[test]
fn table_of_next_fire_times() {
    let start = t(START);
    let mut bad = Vec::new();
    for (line, want) in TABLE {
        let got = sched(line).next_after(start);
        if got != Some(t(want)) {
            bad.push(format!("{line:?}: want {want}, got {got:?}"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert!(TABLE.len() >= 25);
}

#[test]
fn next_after_is_strictly_after() {
    let s = sched("*/5 * * * *");
    assert_eq!(
        s.next_after(t("2024-03-15T10:05:00Z")),
        Some(t("2024-03-15T10:10:00Z"))
    );
    assert_eq!(
        s.next_after(t("2024-03-15T10:04:59Z")),
        Some(t("2024-03-15T10:05:00Z"))
    );
    let y = sched("59 23 31 12 *");
    assert_eq!(
        y.next_after(t("2024-12-31T23:59:00Z")),
        Some(t("2025-12-31T23:59:00Z"))
    );
    let leap = sched("0 0 29 2 *");
    assert_eq!(
        leap.next_after(t("2028-02-29T00:00:00Z")),
        Some(t("2032-02-29T00:00:00Z"))
    );
    // 2100 is not a leap year.
    assert_eq!(
        leap.next_after(t("2096-03-01T00:00:00Z")),
        Some(t("2104-02-29T00:00:00Z"))
    );
}

#[test]
fn weekdays_in_sequence() {
    let s = sched("30 1 * * 1-5");
    let mut at = t(START);
    let mut days = Vec::new();
    for _ in 0..6 {
        at = s.next_after(at).expect("fires");
        days.push(at.day());
    }
    assert_eq!(days, [18, 19, 20, 21, 22, 25]);
}

#[test]
fn display_is_the_line_as_given() {
    assert_eq!(sched("@weekly").to_string(), "@weekly");
    assert_eq!(sched("0 0 * * mon-FRI").to_string(), "0 0 * * mon-FRI");
}

fn err(line: &str) -> String {
    match CronSchedule::parse(line) {
        Ok(_) => panic!("{line:?} parsed"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn errors_name_the_field_and_value() {
    let cases = [
        ("0 0 * * 8", "cron \"0 0 * * 8\": day-of-week 8 is out of range 0-7"),
        ("60 * * * *", "cron \"60 * * * *\": minute 60 is out of range 0-59"),
        ("0 24 * * *", "cron \"0 24 * * *\": hour 24 is out of range 0-23"),
        ("0 0 0 * *", "cron \"0 0 0 * *\": day-of-month 0 is out of range 1-31"),
        ("0 0 32 * *", "cron \"0 0 32 * *\": day-of-month 32 is out of range 1-31"),
        ("0 0 * 13 *", "cron \"0 0 * 13 *\": month 13 is out of range 1-12"),
        ("0 0 * 0 *", "cron \"0 0 * 0 *\": month 0 is out of range 1-12"),
        ("0 0 * * 99999999999", "cron \"0 0 * * 99999999999\": day-of-week 4294967295 is out of range 0-7"),
        ("0 0 * * FUN", "cron \"0 0 * * FUN\": day-of-week \"FUN\" is not a number or day name (sun-sat)"),
        ("0 0 * JANUARY *", "cron \"0 0 * JANUARY *\": month \"JANUARY\" is not a number or month name (jan-dec)"),
        ("x * * * *", "cron \"x * * * *\": minute \"x\" is not a number"),
        ("-1 * * * *", "cron \"-1 * * * *\": minute \"\" is not a number"),
        ("5-1 * * * *", "cron \"5-1 * * * *\": minute range 5-1 runs backwards"),
        ("0 0 * * fri-mon", "cron \"0 0 * * fri-mon\": day-of-week range 5-1 runs backwards"),
        ("*/0 * * * *", "cron \"*/0 * * * *\": minute step \"0\" must be a whole number of at least 1"),
        ("*/x * * * *", "cron \"*/x * * * *\": minute step \"x\" must be a whole number of at least 1"),
        ("1,,2 * * * *", "cron \"1,,2 * * * *\": minute has an empty list item"),
        ("0 0 * *", "cron \"0 0 * *\": has 4 fields: give 5 (minute hour day-of-month month day-of-week)"),
        ("0 0 * * * * *", "cron \"0 0 * * * * *\": has 7 fields: give 5 (minute hour day-of-month month day-of-week)"),
        ("0 0 0 * * *", "cron \"0 0 0 * * *\": has 6 fields: a seconds field is not supported, give the 5-field form (minute hour day-of-month month day-of-week)"),
        ("@every 5m", "cron \"@every 5m\": @every is not supported: give a 5-field schedule such as \"*/5 * * * *\""),
        ("@fortnightly", "cron \"@fortnightly\": unknown macro @fortnightly: use @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly"),
        ("CRON_TZ=UTC 0 0 * * *", "cron \"CRON_TZ=UTC 0 0 * * *\": time zone prefixes are not supported: schedules run in UTC"),
        ("0 0 30 2 *", "cron \"0 0 30 2 *\": never fires: no month in the month field has any of the days in day-of-month"),
        ("0 0 31 4,6 *", "cron \"0 0 31 4,6 *\": never fires: no month in the month field has any of the days in day-of-month"),
        ("", "cron \"\": empty schedule: give 5 fields (minute hour day-of-month month day-of-week) or a macro such as @daily"),
        // Quartz-only syntax saffron would have accepted.
        ("0 0 L * *", "cron \"0 0 L * *\": day-of-month \"L\" is not a number"),
        ("0 0 * * MON#1", "cron \"0 0 * * MON#1\": day-of-week \"MON#1\" is not a number or day name (sun-sat)"),
    ];
    for (line, want) in cases {
        assert_eq!(err(line), want, "{line:?}");
    }
}

#[test]
fn never_check_respects_day_of_week() {
    // Feb 30 never exists, but the day-of-week half of the OR still fires.
    let s = sched("0 0 30 2 1");
    assert_eq!(s.next_after(t(START)), Some(t("2025-02-03T00:00:00Z")));
}

/// Reference evaluator: walks day by day and checks every minute with
/// `Fields::matches`; slow but obviously right.
fn brute_next(s: &CronSchedule, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let start = after.with_second(0)?.with_nanosecond(0)? + Duration::minutes(1);
    let mut day = start.date_naive();
    for _ in 0..(366 * 9) {
        let midnight = Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0)?);
        // Any minute of the day can only match if the day itself matches.
        let probe_day = s.fields.matches_day(midnight);
        if probe_day {
            for m in 0..(24 * 60) {
                let at = midnight + Duration::minutes(m);
                if at >= start && s.matches(at) {
                    return Some(at);
                }
            }
        }
        day = day.succ_opt()?;
    }
    None
}

fn field_strategy(
    min: u32,
    max: u32,
    names: &'static [&'static str],
) -> impl Strategy<Value = String> {
    let v = move || min..=max;
    prop_oneof![
        Just("*".to_string()),
        (1..=max.max(2)).prop_map(|s| format!("*/{s}")),
        v().prop_map(|a| a.to_string()),
        (v(), v()).prop_map(|(a, b)| format!("{}-{}", a.min(b), a.max(b))),
        (v(), v(), 1..5u32).prop_map(|(a, b, s)| format!("{}-{}/{s}", a.min(b), a.max(b))),
        (v(), 1..7u32).prop_map(|(a, s)| format!("{a}/{s}")),
        (v(), v(), v()).prop_map(|(a, b, c)| format!("{a},{b},{c}")),
        (0..names.len().max(1))
            .prop_map(move |i| names.get(i).map_or("*".to_string(), |n| n.to_uppercase())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// saffron behind the rewrite agrees with the brute-force evaluator on
    /// random standard lines, including ones with both day fields restricted.
    #[test]
    fn saffron_agrees_with_brute_force(
        minute in field_strategy(0, 59, &[]),
        hour in field_strategy(0, 23, &[]),
        dom in field_strategy(1, 31, &[]),
        month in field_strategy(1, 12, &["jan", "feb", "jun", "dec"]),
        dow in field_strategy(0, 7, &["sun", "mon", "fri", "sat"]),
        start_min in 0i64..(60 * 24 * 365 * 4),
    ) {
        let line = format!("{minute} {hour} {dom} {month} {dow}");
        let Ok(s) = CronSchedule::parse(&line) else {
            // Only "never fires" may fail for generated lines.
            let e = err(&line);
            prop_assert!(e.contains("never fires"), "{line}: {e}");
            return Ok(());
        };
        let start = t("2023-01-01T00:00:00Z") + Duration::minutes(start_min) + Duration::seconds(17);
        let mut at = start;
        for _ in 0..3 {
            let want = brute_next(&s, at);
            let got = s.next_after(at);
            prop_assert_eq!(got, want, "{} after {}", line, at);
            match got { Some(g) => at = g, None => break }
        }
    }
}

#[test]
fn end_of_calendar_is_none_not_a_panic() {
    for line in ["* * * * *", "0 0 29 2 *", "0 0 1 * 1", "59 23 31 12 *"] {
        assert_eq!(
            sched(line).next_after(DateTime::<Utc>::MAX_UTC),
            None,
            "{line}"
        );
    }
}
