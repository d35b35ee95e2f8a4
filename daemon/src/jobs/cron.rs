//! Standard 5-field crontab lines, read the way Kubernetes CronJob
//! (robfig/cron v3 `ParseStandard`) and Longhorn read them, evaluated in UTC.
//!
//! This module owns parsing a `cron` string from a recurring job and
//! answering "when does it fire next?". Times are UTC: Longhorn and
//! Kubernetes evaluate schedules in the controller's zone, which is UTC in
//! practice, and a daemon whose schedule moved with the node's zone would fire
//! at different instants on different nodes.
//!
//! ```text
//!  "0 0 * * 1-5" ──parse──▶ Fields (explicit sets, standard numbering)
//!                                 │ to_saffron
//!                                 ▼
//!            "0 0 * * 2,3,4,5,6"  (Quartz numbering, 1 = Sunday)
//!                                 │ saffron::Cron::next_after
//!                                 ▼
//!                             next fire time
//! ```
//!
//! # Why the line is rewritten before saffron sees it
//!
//! saffron is a Quartz-style parser. Measured against its source (0.1.0):
//! day-of-week 1 is Sunday, so `0 0 * * 1` would fire on Sundays and
//! `0 0 * * 0` fails to parse; it also accepts Quartz forms (`L`, `W`, `#`)
//! that standard cron does not. So we parse the standard line ourselves into
//! explicit sets of values and hand saffron only plain comma lists in its own
//! numbering. saffron then does what it is good at: jumping to the next
//! matching minute without scanning.
//!
//! # Day-of-month OR day-of-week
//!
//! In standard cron, when both day fields are restricted the job fires on a
//! day that matches EITHER. robfig decides "restricted" per field: a field is
//! unrestricted when one of its list items is `*` or `?` with no step or a step
//! of 1 (`*/2` IS a restriction; so is `1-31`). saffron ORs too, but only
//! treats a literal `*` as unrestricted, so `*/1` would diverge. Rather than
//! rely on that, a line with both fields restricted becomes two saffron
//! expressions, one per day field (the other `*`), and the next fire time is
//! the earlier of the two: exact by construction.
//!
//! # Differences from robfig, on purpose
//!
//! * Day-of-week 7 is accepted as Sunday (Vixie cron, crontab(5)); robfig
//!   rejects it. Ranges may end at 7 (`5-7` = Fri, Sat, Sun).
//! * A line that can never fire (`0 0 30 2 *`) is rejected at parse time;
//!   robfig accepts it and never schedules it.
//! * `@every`, `TZ=`/`CRON_TZ=` prefixes and 6-field (seconds) lines are
//!   rejected: Kubernetes rejects the first two and the standard parser the
//!   third.
//!
//! saffron was kept over `croner` because the rewrite above makes it exact:
//! the unit tests check it against a brute-force evaluator over random lines.

use std::fmt;

use chrono::{DateTime, Utc};

/// One of the five fields of a crontab line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CronField {
    Minute,
    Hour,
    DayOfMonth,
    Month,
    DayOfWeek,
}

impl CronField {
    const ALL: [CronField; 5] = [
        Self::Minute,
        Self::Hour,
        Self::DayOfMonth,
        Self::Month,
        Self::DayOfWeek,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::DayOfMonth => "day-of-month",
            Self::Month => "month",
            Self::DayOfWeek => "day-of-week",
        }
    }

    /// Values a number may take in this field.
    fn bounds(self) -> (u32, u32) {
        match self {
            Self::Minute => (0, 59),
            Self::Hour => (0, 23),
            Self::DayOfMonth => (1, 31),
            Self::Month => (1, 12),
            // 7 is Sunday again; folded onto 0 after expansion.
            Self::DayOfWeek => (0, 7),
        }
    }

    /// The span `*` and an open `N/step` cover. For day-of-week this stops at
    /// 6 as in robfig, so `*/2` is Sun, Tue, Thu, Sat and not also Sun again.
    fn star_bounds(self) -> (u32, u32) {
        match self {
            Self::DayOfWeek => (0, 6),
            f => f.bounds(),
        }
    }

    fn names(self) -> &'static [&'static str] {
        match self {
            Self::Month => &[
                "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
            ],
            Self::DayOfWeek => &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
            _ => &[],
        }
    }

    /// Value of a name (case-insensitive): months count from 1, days from 0.
    fn name_value(self, s: &str) -> Option<u32> {
        let first = if self == Self::Month { 1 } else { 0 };
        let lower = s.to_ascii_lowercase();
        self.names()
            .iter()
            .position(|n| *n == lower)
            .map(|i| i as u32 + first)
    }
}

impl fmt::Display for CronField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a cron line was rejected; the message names the field and value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cron {line:?}: {kind}")]
pub struct CronError {
    /// The line as given.
    pub line: String,
    pub kind: CronErrorKind,
}

/// What was wrong with a cron line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronErrorKind {
    #[error("empty schedule: give 5 fields (minute hour day-of-month month day-of-week) or a macro such as @daily")]
    Empty,
    #[error("has {got} fields: give 5 (minute hour day-of-month month day-of-week)")]
    FieldCount { got: usize },
    #[error("has 6 fields: a seconds field is not supported, give the 5-field form (minute hour day-of-month month day-of-week)")]
    Seconds,
    #[error("@every is not supported: give a 5-field schedule such as \"*/5 * * * *\"")]
    Every,
    #[error("time zone prefixes are not supported: schedules run in UTC")]
    TimeZone,
    #[error("unknown macro {0}: use @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly")]
    UnknownMacro(String),
    #[error("{field} has an empty list item")]
    EmptyItem { field: CronField },
    #[error("{field} {value:?} is not a number{}", names_hint(*.field))]
    BadValue { field: CronField, value: String },
    #[error("{field} {value} is out of range {min}-{max}")]
    OutOfRange {
        field: CronField,
        value: u32,
        min: u32,
        max: u32,
    },
    #[error("{field} range {start}-{end} runs backwards")]
    Backwards {
        field: CronField,
        start: u32,
        end: u32,
    },
    #[error("{field} step {step:?} must be a whole number of at least 1")]
    BadStep { field: CronField, step: String },
    #[error("never fires: no month in the month field has any of the days in day-of-month")]
    Never,
}

fn names_hint(field: CronField) -> &'static str {
    match field {
        CronField::Month => " or month name (jan-dec)",
        CronField::DayOfWeek => " or day name (sun-sat)",
        _ => "",
    }
}

/// A parsed schedule. `Display` shows the line as the user wrote it.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    line: String,
    fields: Fields,
    /// One saffron expression, or two when both day fields are restricted
    /// (day-of-month OR day-of-week); the next time is the earliest of them.
    crons: Vec<saffron::Cron>,
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.line == other.line
    }
}
impl Eq for CronSchedule {}

/// The line as explicit sets, standard numbering (day-of-week 0 = Sunday,
/// bit i set = value i allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fields {
    minutes: u64,
    hours: u64,
    doms: u64,
    months: u64,
    dows: u64,
    /// robfig's star bits: this day field does not restrict the day.
    dom_star: bool,
    dow_star: bool,
}

impl CronSchedule {
    /// Parses a standard 5-field line or a macro (`@daily` ...).
    pub fn parse(line: &str) -> Result<CronSchedule, CronError> {
        let err = |kind| CronError {
            line: line.to_string(),
            kind,
        };
        let fields = parse_fields(line.trim()).map_err(err)?;
        let crons = fields
            .to_saffron()
            .into_iter()
            .map(|s| s.parse::<saffron::Cron>());
        let crons: Result<Vec<_>, _> = crons.collect();
        // Every number we emit is in saffron's range, so a failure here is a
        // bug in to_saffron; report it as the line never firing rather than panic.
        let crons = crons.map_err(|_| err(CronErrorKind::Never))?;
        Ok(CronSchedule {
            line: line.to_string(),
            fields,
            crons,
        })
    }

    /// The first fire time strictly after `t` (UTC; fire times are whole
    /// minutes). `None` only past the end of chrono's calendar.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.crons.iter().filter_map(|c| c.next_after(t)).min()
    }

    /// Whether the schedule fires at the minute containing `t`.
    pub fn matches(&self, t: DateTime<Utc>) -> bool {
        self.fields.matches(t)
    }
}

impl fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line)
    }
}

impl std::str::FromStr for CronSchedule {
    type Err = CronError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn parse_fields(line: &str) -> Result<Fields, CronErrorKind> {
    let expanded;
    let line = if let Some(name) = line.strip_prefix('@') {
        expanded = expand_macro(name)?;
        expanded
    } else {
        line
    };
    if line.starts_with("TZ=") || line.starts_with("CRON_TZ=") {
        return Err(CronErrorKind::TimeZone);
    }
    let parts: Vec<&str> = line.split_whitespace().collect();
    match parts.len() {
        5 => {}
        0 => return Err(CronErrorKind::Empty),
        6 => return Err(CronErrorKind::Seconds),
        got => return Err(CronErrorKind::FieldCount { got }),
    }
    let mut sets = [(0u64, false); 5];
    for (i, field) in CronField::ALL.into_iter().enumerate() {
        sets[i] = parse_field(field, parts[i])?;
    }
    // Fold day-of-week 7 onto Sunday.
    let mut dows = sets[4].0;
    if dows & (1 << 7) != 0 {
        dows = (dows & !(1 << 7)) | 1;
    }
    let fields = Fields {
        minutes: sets[0].0,
        hours: sets[1].0,
        doms: sets[2].0,
        months: sets[3].0,
        dows,
        dom_star: sets[2].1,
        dow_star: sets[4].1,
    };
    if fields.never() {
        return Err(CronErrorKind::Never);
    }
    Ok(fields)
}

fn expand_macro(name: &str) -> Result<&'static str, CronErrorKind> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "yearly" | "annually" => "0 0 1 1 *",
        "monthly" => "0 0 1 * *",
        "weekly" => "0 0 * * 0",
        "daily" | "midnight" => "0 0 * * *",
        "hourly" => "0 * * * *",
        n if n == "every" || n.starts_with("every ") => return Err(CronErrorKind::Every),
        _ => return Err(CronErrorKind::UnknownMacro(format!("@{name}"))),
    })
}

/// Parses one field into a bit set and robfig's star flag.
fn parse_field(field: CronField, text: &str) -> Result<(u64, bool), CronErrorKind> {
    let mut bits = 0u64;
    let mut star = false;
    for item in text.split(',') {
        if item.is_empty() {
            return Err(CronErrorKind::EmptyItem { field });
        }
        let (range, step_text) = match item.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (item, None),
        };
        let step = match step_text {
            None => 1,
            Some(s) => match s.parse::<u32>() {
                Ok(n) if n >= 1 => n,
                _ => {
                    return Err(CronErrorKind::BadStep {
                        field,
                        step: s.to_string(),
                    })
                }
            },
        };
        let (start, end) = if range == "*" || range == "?" {
            // robfig: `*` (or `*/1`) leaves the field unrestricted; a real step restricts it.
            if step == 1 {
                star = true;
            }
            field.star_bounds()
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(field, a)?, value(field, b)?);
            if a > b {
                return Err(CronErrorKind::Backwards {
                    field,
                    start: a,
                    end: b,
                });
            }
            (a, b)
        } else {
            let a = value(field, range)?;
            // robfig: `N/step` means N through the field's end.
            if step_text.is_some() {
                (a, field.star_bounds().1.max(a))
            } else {
                (a, a)
            }
        };
        let mut v = start;
        while v <= end {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok((bits, star))
}

fn value(field: CronField, s: &str) -> Result<u32, CronErrorKind> {
    let v = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        // Long digit strings overflow u32; they are out of range all the same.
        s.parse::<u32>().unwrap_or(u32::MAX)
    } else {
        field.name_value(s).ok_or_else(|| CronErrorKind::BadValue {
            field,
            value: s.to_string(),
        })?
    };
    let (min, max) = field.bounds();
    if v < min || v > max {
        return Err(CronErrorKind::OutOfRange {
            field,
            value: v,
            min,
            max,
        });
    }
    Ok(v)
}

/// Days in each month in the longest year (February 29 exists in leap years).
const MAX_DAYS: [u32; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

impl Fields {
    /// True when no date can ever match: day-of-month alone decides the day
    /// and none of its days exists in any chosen month.
    fn never(&self) -> bool {
        if self.dom_star || !self.dow_star {
            return false;
        }
        !(1..=12u32).any(|m| {
            self.months & (1 << m) != 0
                && (1..=MAX_DAYS[m as usize - 1]).any(|d| self.doms & (1 << d) != 0)
        })
    }

    /// saffron lines equal to this schedule (see the module doc for the two-line case).
    fn to_saffron(&self) -> Vec<String> {
        let minutes = list(self.minutes, 0, 59, 0);
        let hours = list(self.hours, 0, 23, 0);
        let months = list(self.months, 1, 12, 0);
        let doms = list(self.doms, 1, 31, 0);
        // saffron numbers days of the week 1 (Sunday) to 7 (Saturday).
        let dows = list(self.dows, 0, 6, 1);
        match (self.dom_star, self.dow_star) {
            (true, true) => vec![format!("{minutes} {hours} * {months} *")],
            (false, true) => vec![format!("{minutes} {hours} {doms} {months} *")],
            (true, false) => vec![format!("{minutes} {hours} * {months} {dows}")],
            (false, false) => vec![
                format!("{minutes} {hours} {doms} {months} *"),
                format!("{minutes} {hours} * {months} {dows}"),
            ],
        }
    }

    fn matches(&self, t: DateTime<Utc>) -> bool {
        use chrono::Timelike;
        self.matches_day(t) && bit(self.minutes, t.minute()) && bit(self.hours, t.hour())
    }

    /// Month and day rule: robfig ANDs the day fields when either is a
    /// star, and ORs them when both restrict.
    fn matches_day(&self, t: DateTime<Utc>) -> bool {
        use chrono::Datelike;
        let dom = bit(self.doms, t.day());
        let dow = bit(self.dows, t.weekday().num_days_from_sunday());
        let day = if self.dom_star || self.dow_star {
            dom && dow
        } else {
            dom || dow
        };
        day && bit(self.months, t.month())
    }
}

fn bit(set: u64, v: u32) -> bool {
    set & (1 << v) != 0
}

/// A set as a saffron list: `*` when every value is in it, else the values
/// (shifted by `offset`) joined with commas.
fn list(set: u64, min: u32, max: u32, offset: u32) -> String {
    let values: Vec<u32> = (min..=max).filter(|v| set & (1 << v) != 0).collect();
    if values.len() as u32 == max - min + 1 {
        return "*".to_string();
    }
    let strs: Vec<String> = values.iter().map(|v| (v + offset).to_string()).collect();
    strs.join(",")
}

#[cfg(test)]
mod tests;
