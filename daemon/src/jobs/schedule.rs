//! When each volume's recurring jobs fire, and the small decisions a run makes.
//!
//! This module owns the per-(volume, job) next fire time. It reads the time
//! only through the `now` its callers pass in (taken from a [`Clock`]), so the
//! daemon's timer loop and the tests drive it the same way:
//!
//! ```text
//!  loop {
//!      sleep until scheduler.next_wakeup()        (or a job change)
//!      for d in scheduler.due(clock.now()) { run d.job on d.volume }
//!  }
//! ```
//!
//! Missed windows (daemon down, clock jump, slow loop) are caught up once:
//! a job whose fire time passed runs once, however many fire times it missed,
//! and is then scheduled for its first fire time after `now`. That matches a
//! Kubernetes CronJob with few missed starts, and never floods a volume with
//! back-to-back snapshots after an outage.
//!
//! Concurrency: [`Scheduler`] is a plain value; the daemon keeps it behind its
//! own lock. Clocks are `Send + Sync` so one can be shared with the loop.

use std::collections::BTreeMap;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};

use super::cron::{CronError, CronSchedule};
use super::spec::{JobTask, RecurringJob, MAX_JOB_NAME};

/// Label key marking a snapshot or backup as made by a recurring job; the
/// value is the job name. Longhorn's `types.RecurringJobLabel`.
pub const JOB_LABEL: &str = "RecurringJob";

/// Where the scheduler's idea of "now" comes from.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The real UTC wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told to; for tests, including the daemon's.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
}

impl ManualClock {
    pub fn new(now: DateTime<Utc>) -> ManualClock {
        ManualClock {
            now: Mutex::new(now),
        }
    }

    pub fn set(&self, now: DateTime<Utc>) {
        *self.lock() = now;
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self.lock();
        *now += by;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DateTime<Utc>> {
        // A panic while holding this lock cannot leave a half-written time.
        self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.lock()
    }
}

/// A job whose fire time has come, for one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueJob {
    pub volume: String,
    pub job: RecurringJob,
    /// The fire time that came due (the earliest missed one on catch-up).
    pub scheduled_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
struct Entry {
    job: RecurringJob,
    schedule: CronSchedule,
    /// `None`: never fires again (past the end of chrono's calendar).
    next: Option<DateTime<Utc>>,
}

/// Next fire time of every (volume, job name).
#[derive(Debug, Clone, Default)]
pub struct Scheduler {
    entries: BTreeMap<(String, String), Entry>,
}

impl Scheduler {
    pub fn new() -> Scheduler {
        Scheduler::default()
    }

    /// Makes `jobs` the volume's job set. New jobs and jobs whose cron changed
    /// get their first fire time after `now`; unchanged schedules keep theirs
    /// (so re-applying the same set never delays or repeats a run); jobs not in
    /// `jobs` are dropped. All-or-nothing: on a bad cron nothing changes.
    pub fn set_jobs(
        &mut self,
        volume: &str,
        jobs: &[RecurringJob],
        now: DateTime<Utc>,
    ) -> Result<(), CronError> {
        let parsed: Vec<(RecurringJob, CronSchedule)> = jobs
            .iter()
            .map(|j| CronSchedule::parse(&j.cron).map(|s| (j.clone(), s)))
            .collect::<Result<_, _>>()?;
        let mut kept = BTreeMap::new();
        for (job, schedule) in parsed {
            let key = (volume.to_string(), job.name.clone());
            let next = match self.entries.remove(&key) {
                Some(old) if old.job.cron == job.cron => old.next,
                _ => schedule.next_after(now),
            };
            kept.insert(
                key,
                Entry {
                    job,
                    schedule,
                    next,
                },
            );
        }
        self.entries.retain(|(v, _), _| v != volume);
        self.entries.append(&mut kept);
        Ok(())
    }

    /// Forgets every job of a deleted volume.
    pub fn remove_volume(&mut self, volume: &str) {
        self.entries.retain(|(v, _), _| v != volume);
    }

    /// Jobs due at `now`, each at most once, ordered by fire time then volume
    /// and job name; each is rescheduled for its first fire time after `now`.
    pub fn due(&mut self, now: DateTime<Utc>) -> Vec<DueJob> {
        let mut due = Vec::new();
        for ((volume, _), entry) in self.entries.iter_mut() {
            let Some(at) = entry.next.filter(|at| *at <= now) else {
                continue;
            };
            due.push(DueJob {
                volume: volume.clone(),
                job: entry.job.clone(),
                scheduled_at: at,
            });
            entry.next = entry.schedule.next_after(now);
        }
        due.sort_by(|a, b| {
            (a.scheduled_at, &a.volume, &a.job.name).cmp(&(b.scheduled_at, &b.volume, &b.job.name))
        });
        due
    }

    /// The earliest fire time of any job: when the daemon should next call `due`.
    pub fn next_wakeup(&self) -> Option<DateTime<Utc>> {
        self.entries.values().filter_map(|e| e.next).min()
    }

    /// The next fire time of one job, if scheduled.
    pub fn next_fire(&self, volume: &str, job: &str) -> Option<DateTime<Utc>> {
        self.entries
            .get(&(volume.to_string(), job.to_string()))
            .and_then(|e| e.next)
    }
}

/// Whether a run of `task` takes a snapshot: the plain tasks only when the
/// volume head has data the last snapshot lacks (an identical snapshot would
/// push a useful one out of `retain`); the force variants always. A backup
/// task needs a snapshot to back up, so its daemon path asks
/// [`should_backup`] first and then snapshots unconditionally.
pub fn should_snapshot(task: JobTask, head_has_new_data: bool) -> bool {
    match task {
        JobTask::SnapshotForceCreate | JobTask::BackupForceCreate => true,
        JobTask::Snapshot | JobTask::Backup => head_has_new_data,
    }
}

/// Whether a run of `task` makes a backup: `backup` only when there is data
/// the last backup lacks, `backup-force-create` always, snapshot tasks never.
pub fn should_backup(task: JobTask, new_data_since_last_backup: bool) -> bool {
    match task {
        JobTask::BackupForceCreate => true,
        JobTask::Backup => new_data_since_last_backup,
        JobTask::Snapshot | JobTask::SnapshotForceCreate => false,
    }
}

/// A snapshot or backup made by one job (labelled [`JOB_LABEL`]=job name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedItem {
    pub name: String,
    pub created: DateTime<Utc>,
}

/// Names to delete so only the newest `retain` of one job's items remain,
/// oldest first. Equal creation times are ordered by name so the plan is
/// deterministic. `retain` 0 is treated as 1: a job never deletes everything
/// it made, including what it just made (specs reject 0 anyway).
pub fn retain_plan(items: &[OwnedItem], retain: u32) -> Vec<String> {
    let mut sorted: Vec<&OwnedItem> = items.iter().collect();
    sorted.sort_by(|a, b| (b.created, &b.name).cmp(&(a.created, &a.name)));
    let keep = retain.max(1) as usize;
    sorted
        .iter()
        .skip(keep)
        .rev()
        .map(|i| i.name.clone())
        .collect()
}

/// Whether an item's labels say `job` made it.
pub fn owned_by(labels: &BTreeMap<String, String>, job: &str) -> bool {
    labels.get(JOB_LABEL).is_some_and(|v| v == job)
}

/// Labels for an item the job makes: the job's own labels plus
/// [`JOB_LABEL`]=name, which [`retain_plan`]'s caller filters on.
pub fn job_labels(job: &RecurringJob) -> BTreeMap<String, String> {
    let mut labels = job.labels.clone();
    labels.insert(JOB_LABEL.to_string(), job.name.clone());
    labels
}

/// Name for a snapshot the job makes at `now`: `<job>-c-<YYYYMMDDhhmmss>`,
/// e.g. `daily-c-20240315100000`. Longhorn uses `<job>-c-<random>`; a time
/// stamp is as unique (a job fires at most once a minute per volume) and
/// sorts by age. At most 40 + 3 + 14 = 57 characters, a DNS-1123 label when
/// the job name is one (names longer than 40 are cut, trailing `-` dropped).
pub fn snapshot_name(job: &RecurringJob, now: DateTime<Utc>) -> String {
    let mut base: String = job.name.chars().take(MAX_JOB_NAME).collect();
    while base.ends_with('-') {
        base.pop();
    }
    format!("{base}-c-{}", now.format("%Y%m%d%H%M%S"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        match DateTime::parse_from_rfc3339(s) {
            Ok(d) => d.with_timezone(&Utc),
            Err(e) => panic!("bad test time {s}: {e}"),
        }
    }

    fn job(name: &str, cron: &str) -> RecurringJob {
        RecurringJob {
            name: name.into(),
            task: JobTask::Snapshot,
            cron: cron.into(),
            retain: 3,
            concurrency: 1,
            labels: BTreeMap::new(),
            groups: vec![],
        }
    }

    fn names(due: &[DueJob]) -> Vec<(String, String, String)> {
        due.iter()
            .map(|d| {
                (
                    d.volume.clone(),
                    d.job.name.clone(),
                    d.scheduled_at.format("%H:%M").to_string(),
                )
            })
            .collect()
    }

    fn set(s: &mut Scheduler, vol: &str, jobs: &[RecurringJob], now: DateTime<Utc>) {
        if let Err(e) = s.set_jobs(vol, jobs, now) {
            panic!("{e}");
        }
    }

    #[test]
    fn every_five_minutes_fires_on_the_instants() {
        let clock = ManualClock::new(t("2024-03-15T10:02:00Z"));
        let mut s = Scheduler::new();
        set(&mut s, "vol", &[job("snap", "*/5 * * * *")], clock.now());
        assert_eq!(s.next_wakeup(), Some(t("2024-03-15T10:05:00Z")));
        let mut fired = Vec::new();
        // Step the clock 30 s at a time for 20 minutes.
        for _ in 0..40 {
            clock.advance(Duration::seconds(30));
            for d in s.due(clock.now()) {
                assert_eq!(d.scheduled_at, clock.now(), "fires on the tick it came due");
                fired.push(d.scheduled_at.format("%H:%M:%S").to_string());
            }
        }
        assert_eq!(fired, ["10:05:00", "10:10:00", "10:15:00", "10:20:00"]);
        assert_eq!(s.next_wakeup(), Some(t("2024-03-15T10:25:00Z")));
    }

    #[test]
    fn nothing_due_before_the_time() {
        let mut s = Scheduler::new();
        set(
            &mut s,
            "vol",
            &[job("snap", "*/5 * * * *")],
            t("2024-03-15T10:00:00Z"),
        );
        assert!(s.due(t("2024-03-15T10:04:59Z")).is_empty());
        assert_eq!(
            names(&s.due(t("2024-03-15T10:05:00Z"))),
            [("vol".into(), "snap".into(), "10:05".into())]
        );
        assert!(
            s.due(t("2024-03-15T10:05:00Z")).is_empty(),
            "once per fire time"
        );
    }

    #[test]
    fn missed_windows_fire_once_then_resume_after_now() {
        let mut s = Scheduler::new();
        set(
            &mut s,
            "vol",
            &[job("snap", "*/5 * * * *")],
            t("2024-03-15T10:00:00Z"),
        );
        // Asleep for 42 minutes: eight fire times missed.
        let due = s.due(t("2024-03-15T10:42:00Z"));
        assert_eq!(names(&due), [("vol".into(), "snap".into(), "10:05".into())]);
        assert_eq!(s.next_wakeup(), Some(t("2024-03-15T10:45:00Z")));
        assert!(s.due(t("2024-03-15T10:44:00Z")).is_empty());
    }

    #[test]
    fn changed_cron_reschedules_unchanged_keeps_its_time() {
        let mut s = Scheduler::new();
        let now = t("2024-03-15T10:00:00Z");
        set(
            &mut s,
            "vol",
            &[job("a", "0 * * * *"), job("b", "*/5 * * * *")],
            now,
        );
        assert_eq!(s.next_fire("vol", "a"), Some(t("2024-03-15T11:00:00Z")));
        let later = t("2024-03-15T10:07:00Z");
        // b's fire time (10:05) is pending; re-applying must not lose or move it.
        let mut b = job("b", "*/5 * * * *");
        b.retain = 9;
        set(&mut s, "vol", &[job("a", "30 * * * *"), b], later);
        assert_eq!(s.next_fire("vol", "a"), Some(t("2024-03-15T10:30:00Z")));
        assert_eq!(s.next_fire("vol", "b"), Some(t("2024-03-15T10:05:00Z")));
        let due = s.due(later);
        assert_eq!(names(&due), [("vol".into(), "b".into(), "10:05".into())]);
        assert_eq!(due[0].job.retain, 9, "the updated job is what runs");
    }

    #[test]
    fn removed_job_and_volume_disappear() {
        let mut s = Scheduler::new();
        let now = t("2024-03-15T10:00:00Z");
        set(
            &mut s,
            "v1",
            &[job("a", "*/5 * * * *"), job("b", "@hourly")],
            now,
        );
        set(&mut s, "v2", &[job("a", "*/10 * * * *")], now);
        set(&mut s, "v1", &[job("b", "@hourly")], now);
        assert_eq!(s.next_fire("v1", "a"), None);
        assert_eq!(
            s.next_fire("v2", "a"),
            Some(t("2024-03-15T10:10:00Z")),
            "other volume untouched"
        );
        assert_eq!(s.next_wakeup(), Some(t("2024-03-15T10:10:00Z")));
        let due = s.due(t("2024-03-15T11:00:00Z"));
        assert_eq!(
            names(&due),
            [
                ("v2".into(), "a".into(), "10:10".into()),
                ("v1".into(), "b".into(), "11:00".into())
            ]
        );
        s.remove_volume("v2");
        set(&mut s, "v1", &[], now);
        assert_eq!(s.next_wakeup(), None);
        assert!(s.due(t("2030-01-01T00:00:00Z")).is_empty());
    }

    #[test]
    fn bad_cron_changes_nothing() {
        let mut s = Scheduler::new();
        let now = t("2024-03-15T10:00:00Z");
        set(&mut s, "vol", &[job("a", "@hourly")], now);
        let r = s.set_jobs("vol", &[job("b", "@daily"), job("a", "0 0 * * 8")], now);
        assert!(r.is_err());
        assert_eq!(s.next_fire("vol", "a"), Some(t("2024-03-15T11:00:00Z")));
        assert_eq!(s.next_fire("vol", "b"), None);
    }

    #[test]
    fn system_clock_is_utc_now() {
        let before = Utc::now();
        let now = SystemClock.now();
        assert!(now >= before && now <= Utc::now());
        let m = ManualClock::new(before);
        m.set(t("2024-01-01T00:00:00Z"));
        assert_eq!(m.now(), t("2024-01-01T00:00:00Z"));
    }

    #[test]
    fn snapshot_and_backup_decisions() {
        use JobTask::*;
        for (task, new_data, snap, backup) in [
            (Snapshot, true, true, false),
            (Snapshot, false, false, false),
            (SnapshotForceCreate, false, true, false),
            (SnapshotForceCreate, true, true, false),
            (Backup, true, true, true),
            (Backup, false, false, false),
            (BackupForceCreate, false, true, true),
            (BackupForceCreate, true, true, true),
        ] {
            assert_eq!(should_snapshot(task, new_data), snap, "{task} {new_data}");
            assert_eq!(should_backup(task, new_data), backup, "{task} {new_data}");
        }
    }

    #[test]
    fn retain_plan_keeps_the_newest() {
        let item = |n: &str, at: &str| OwnedItem {
            name: n.into(),
            created: t(at),
        };
        let items = [
            item("s3", "2024-03-15T10:15:00Z"),
            item("s1", "2024-03-15T10:05:00Z"),
            item("s4", "2024-03-15T10:20:00Z"),
            item("s2", "2024-03-15T10:10:00Z"),
        ];
        assert_eq!(retain_plan(&items, 2), ["s1", "s2"]);
        assert_eq!(retain_plan(&items, 3), ["s1"]);
        assert!(retain_plan(&items, 4).is_empty());
        assert!(retain_plan(&items, 10).is_empty());
        assert_eq!(
            retain_plan(&items, 0),
            ["s1", "s2", "s3"],
            "0 keeps the newest"
        );
        assert!(retain_plan(&[], 1).is_empty());
        let tie = [
            item("b", "2024-03-15T10:00:00Z"),
            item("a", "2024-03-15T10:00:00Z"),
        ];
        assert_eq!(retain_plan(&tie, 1), ["a"]);
    }

    #[test]
    fn names_and_labels() {
        let mut j = job("daily", "@daily");
        j.labels.insert("team".into(), "db".into());
        let at = t("2024-03-15T10:00:00Z");
        let name = snapshot_name(&j, at);
        assert_eq!(name, "daily-c-20240315100000");
        assert_ne!(name, snapshot_name(&j, at + Duration::minutes(1)));
        let long = job(&format!("{}-{}", "a".repeat(39), "b".repeat(10)), "@daily");
        let n = snapshot_name(&long, at);
        assert_eq!(n, format!("{}-c-20240315100000", "a".repeat(39)));
        assert!(
            crate::name::validate_label("snapshot", &n, 63).is_ok(),
            "{n}"
        );
        let labels = job_labels(&j);
        assert_eq!(labels.get("team").map(String::as_str), Some("db"));
        assert!(owned_by(&labels, "daily"));
        assert!(!owned_by(&labels, "weekly"));
        assert!(!owned_by(&BTreeMap::new(), "daily"));
    }
}
