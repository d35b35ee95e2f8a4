//! Recurring-job definitions in Longhorn's JSON, and their validation.
//!
//! This module owns the `recurringJobs` StorageClass parameter: a JSON array
//! as in Longhorn 1.1,
//! `[{"name":"snap","task":"snapshot","cron":"*/1 * * * *","retain":1,"labels":{"k":"v"}}]`,
//! with Longhorn 1.2's optional `concurrency` and `groups`.
//!
//! Where we differ from Longhorn, on purpose:
//! * Unknown fields are an error naming them. Longhorn decodes with Go's
//!   `encoding/json`, which drops them silently, so a typo such as `"retian"`
//!   there goes unnoticed; every field Longhorn defines is known here.
//! * Job names are DNS-1123 labels of at most 40 characters. Longhorn allows
//!   40 characters of `[a-zA-Z0-9][a-zA-Z0-9_.-]+`; Cairn puts the job name
//!   into snapshot names, which are DNS-1123 labels (see `crate::name`).
//! * Only the four tasks Cairn runs are accepted; Longhorn's
//!   `snapshot-cleanup`, `snapshot-delete` and `filesystem-trim` are refused
//!   by name rather than accepted and ignored.
//!
//! `retain` is 1..=100: Longhorn's default `recurring-job-max-retention`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::cron::{CronError, CronSchedule};
use crate::name::{validate_label, NameError};

/// Longest job name (Longhorn's `NameMaximumLength`).
pub const MAX_JOB_NAME: usize = 40;
/// Largest `retain` (Longhorn's default for `recurring-job-max-retention`).
pub const MAX_RETAIN: u32 = 100;

/// What a recurring job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum JobTask {
    /// Snapshot when the volume has new data since its last snapshot.
    Snapshot,
    /// Snapshot every time.
    SnapshotForceCreate,
    /// Back up when there is new data since the last backup.
    Backup,
    /// Back up every time.
    BackupForceCreate,
}

impl JobTask {
    const ALL: [JobTask; 4] = [
        Self::Snapshot,
        Self::SnapshotForceCreate,
        Self::Backup,
        Self::BackupForceCreate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Snapshot => "snapshot",
            Self::SnapshotForceCreate => "snapshot-force-create",
            Self::Backup => "backup",
            Self::BackupForceCreate => "backup-force-create",
        }
    }
}

impl fmt::Display for JobTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task name Cairn does not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task {0:?} is not supported: use snapshot, snapshot-force-create, backup or backup-force-create")]
pub struct UnknownTask(pub String);

impl TryFrom<String> for JobTask {
    type Error = UnknownTask;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        JobTask::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or(UnknownTask(s))
    }
}

fn one() -> u32 {
    1
}

/// One recurring job, with Longhorn's field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecurringJob {
    pub name: String,
    pub task: JobTask,
    /// Standard 5-field cron line, UTC (see [`CronSchedule`]).
    pub cron: String,
    /// How many snapshots (or backups) made by this job to keep.
    pub retain: u32,
    /// How many volumes may run this job at once; default 1.
    #[serde(default = "one")]
    pub concurrency: u32,
    /// Added to every snapshot and backup the job makes.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Longhorn job groups; accepted and kept, not used for selection yet.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// Why a `recurringJobs` parameter was rejected.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobSpecError {
    #[error("recurringJobs is not a JSON array: {0}")]
    NotArray(String),
    #[error("recurringJobs[{index}]{}: {problem}", name_suffix(.name))]
    Job {
        index: usize,
        name: Option<String>,
        problem: JobProblem,
    },
}

fn name_suffix(name: &Option<String>) -> String {
    name.as_ref()
        .map(|n| format!(" ({n:?})"))
        .unwrap_or_default()
}

/// What was wrong with one job.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobProblem {
    /// Wrong JSON shape: unknown or missing field, wrong type, unknown task.
    #[error("{0}")]
    Decode(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("name is also used by recurringJobs[{0}]")]
    Duplicate(usize),
    #[error(transparent)]
    Cron(#[from] CronError),
    #[error("retain must be at least 1, got 0")]
    RetainZero,
    #[error("retain must be at most {MAX_RETAIN}, got {0}")]
    RetainTooLarge(u32),
    #[error("concurrency must be at least 1, got 0")]
    ConcurrencyZero,
    #[error("label key {0:?} is not a Kubernetes label key ([prefix/]name, name 1-63 of [A-Za-z0-9-_.] starting and ending alphanumeric)")]
    LabelKey(String),
    #[error("label {key:?} value {value:?} is not a Kubernetes label value (0-63 of [A-Za-z0-9-_.] starting and ending alphanumeric)")]
    LabelValue { key: String, value: String },
    #[error("label {0:?} is reserved: Cairn sets it to the job name")]
    LabelReserved(String),
}

/// Parses and validates the `recurringJobs` StorageClass parameter.
pub fn parse_jobs(json: &str) -> Result<Vec<RecurringJob>, JobSpecError> {
    // Decode entries one by one so an error can name the entry.
    let raw: Vec<serde_json::Value> =
        serde_json::from_str(json).map_err(|e| JobSpecError::NotArray(e.to_string()))?;
    let mut jobs = Vec::with_capacity(raw.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (index, value) in raw.into_iter().enumerate() {
        let name = value
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_string);
        let fail = |problem| JobSpecError::Job {
            index,
            name: name.clone(),
            problem,
        };
        let job: RecurringJob =
            serde_json::from_value(value).map_err(|e| fail(JobProblem::Decode(e.to_string())))?;
        validate_job(&job).map_err(fail)?;
        if let Some(first) = seen.insert(job.name.clone(), index) {
            return Err(fail(JobProblem::Duplicate(first)));
        }
        jobs.push(job);
    }
    Ok(jobs)
}

/// Checks one job's fields (not uniqueness, which needs the whole list).
pub fn validate_job(job: &RecurringJob) -> Result<(), JobProblem> {
    validate_label("recurring job", &job.name, MAX_JOB_NAME)?;
    CronSchedule::parse(&job.cron)?;
    match job.retain {
        0 => return Err(JobProblem::RetainZero),
        r if r > MAX_RETAIN => return Err(JobProblem::RetainTooLarge(r)),
        _ => {}
    }
    if job.concurrency == 0 {
        return Err(JobProblem::ConcurrencyZero);
    }
    for (key, value) in &job.labels {
        if key == super::schedule::JOB_LABEL {
            return Err(JobProblem::LabelReserved(key.clone()));
        }
        if !label_key_ok(key) {
            return Err(JobProblem::LabelKey(key.clone()));
        }
        if !(value.is_empty() || label_name_ok(value)) {
            return Err(JobProblem::LabelValue {
                key: key.clone(),
                value: value.clone(),
            });
        }
    }
    Ok(())
}

/// Kubernetes label key: optional DNS-subdomain prefix and `/`, then a name.
fn label_key_ok(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.')
                .all(|l| validate_label("label prefix", l, 63).is_ok())
    });
    prefix_ok && label_name_ok(name)
}

/// Kubernetes label name (also a non-empty label value).
fn label_name_ok(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_alphanumeric();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter()
            .all(|c| alnum(c) || matches!(c, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        match parse_jobs(json) {
            Ok(j) => panic!("{json} parsed: {j:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_longhorn_1_1_example() {
        let jobs = parse_jobs(
            r#"[{"name":"snap","task":"snapshot","cron":"*/1 * * * *","retain":1,"labels":{"k":"v"}},
                {"name":"backup","task":"backup","cron":"0 0 * * *","retain":2,"concurrency":3,"groups":["default"]}]"#,
        )
        .expect("valid");
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].name, "snap");
        assert_eq!(jobs[0].task, JobTask::Snapshot);
        assert_eq!(jobs[0].concurrency, 1, "default");
        assert_eq!(jobs[0].labels.get("k").map(String::as_str), Some("v"));
        assert!(jobs[0].groups.is_empty());
        assert_eq!(jobs[1].task, JobTask::Backup);
        assert_eq!(jobs[1].concurrency, 3);
        assert_eq!(jobs[1].groups, ["default"]);
        assert_eq!(parse_jobs("[]"), Ok(vec![]));
    }

    #[test]
    fn all_four_tasks_round_trip() {
        for task in JobTask::ALL {
            let json = format!(r#"[{{"name":"j","task":"{task}","cron":"@daily","retain":1}}]"#);
            let jobs = parse_jobs(&json).expect("valid");
            assert_eq!(jobs[0].task, task);
            let back = serde_json::to_string(&jobs).expect("serializes");
            assert_eq!(parse_jobs(&back).expect("round trip"), jobs);
        }
    }

    #[test]
    fn errors_name_the_job_and_field() {
        let cases = [
            (
                r#"[{"name":"a","task":"snapshot","cron":"@daily","retain":1},{"name":"daily","task":"snapshot","cron":"@daily","retain":0}]"#,
                r#"recurringJobs[1] ("daily"): retain must be at least 1, got 0"#,
            ),
            (
                r#"[{"name":"daily","task":"snapshot","cron":"@daily","retain":101}]"#,
                r#"recurringJobs[0] ("daily"): retain must be at most 100, got 101"#,
            ),
            (
                r#"[{"name":"daily","task":"snapshot","cron":"0 0 * * 8","retain":1}]"#,
                r#"recurringJobs[0] ("daily"): cron "0 0 * * 8": day-of-week 8 is out of range 0-7"#,
            ),
            (
                r#"[{"name":"daily","task":"filesystem-trim","cron":"@daily","retain":1}]"#,
                r#"recurringJobs[0] ("daily"): task "filesystem-trim" is not supported: use snapshot, snapshot-force-create, backup or backup-force-create"#,
            ),
            (
                r#"[{"name":"daily","task":"snapshot","cron":"@daily","retian":1}]"#,
                r#"recurringJobs[0] ("daily"): unknown field `retian`, expected one of `name`, `task`, `cron`, `retain`, `concurrency`, `labels`, `groups`"#,
            ),
            (
                r#"[{"name":"daily","task":"snapshot","cron":"@daily"}]"#,
                r#"recurringJobs[0] ("daily"): missing field `retain`"#,
            ),
            (
                r#"[{"task":"snapshot","cron":"@daily","retain":1}]"#,
                r#"recurringJobs[0]: missing field `name`"#,
            ),
            (
                r#"[{"name":"daily","task":"snapshot","cron":"@daily","retain":-1}]"#,
                r#"recurringJobs[0] ("daily"): invalid value: integer `-1`, expected u32"#,
            ),
            (
                r#"[{"name":"daily","task":"snapshot","cron":"@daily","retain":1,"concurrency":0}]"#,
                r#"recurringJobs[0] ("daily"): concurrency must be at least 1, got 0"#,
            ),
            (
                r#"[{"name":"Daily","task":"snapshot","cron":"@daily","retain":1}]"#,
                r#"recurringJobs[0] ("Daily"): recurring job name "Daily" is not a DNS-1123 label: use lower-case letters, digits and '-', starting and ending with a letter or digit"#,
            ),
            (
                r#"[{"name":"","task":"snapshot","cron":"@daily","retain":1}]"#,
                r#"recurringJobs[0] (""): recurring job name is empty: give a name of 1-40 characters"#,
            ),
            (
                r#"[{"name":"a","task":"snapshot","cron":"@daily","retain":1},{"name":"a","task":"backup","cron":"@daily","retain":1}]"#,
                r#"recurringJobs[1] ("a"): name is also used by recurringJobs[0]"#,
            ),
            (
                r#"[{"name":"a","task":"snapshot","cron":"@daily","retain":1,"labels":{"bad key":"v"}}]"#,
                r#"recurringJobs[0] ("a"): label key "bad key" is not a Kubernetes label key ([prefix/]name, name 1-63 of [A-Za-z0-9-_.] starting and ending alphanumeric)"#,
            ),
            (
                r#"[{"name":"a","task":"snapshot","cron":"@daily","retain":1,"labels":{"k":"-v"}}]"#,
                r#"recurringJobs[0] ("a"): label "k" value "-v" is not a Kubernetes label value (0-63 of [A-Za-z0-9-_.] starting and ending alphanumeric)"#,
            ),
            (
                r#"[{"name":"a","task":"snapshot","cron":"@daily","retain":1,"labels":{"RecurringJob":"x"}}]"#,
                r#"recurringJobs[0] ("a"): label "RecurringJob" is reserved: Cairn sets it to the job name"#,
            ),
        ];
        for (json, want) in cases {
            assert_eq!(err(json), want, "{json}");
        }
        let long = "x".repeat(MAX_JOB_NAME + 1);
        let e = err(&format!(
            r#"[{{"name":"{long}","task":"snapshot","cron":"@daily","retain":1}}]"#
        ));
        assert!(e.contains("longer than 40 characters"), "{e}");
        assert!(err("{}").starts_with("recurringJobs is not a JSON array: "));
        assert!(err("[1]").starts_with("recurringJobs[0]: invalid type: integer `1`"));
    }

    #[test]
    fn label_rules() {
        for k in ["k", "app.kubernetes.io/name", "a_b.c-d", "x/y"] {
            assert!(label_key_ok(k), "{k}");
        }
        for k in [
            "",
            "/x",
            "x/",
            "-a",
            "a/b/c",
            "UPPER.prefix/x",
            &"k".repeat(64),
        ] {
            assert!(!label_key_ok(k), "{k}");
        }
    }
}
