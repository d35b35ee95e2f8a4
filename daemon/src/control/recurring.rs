//! Recurring jobs of the control plane: keeps the scheduler's view of
//! every volume's jobs, runs the jobs that are due (snapshot or backup,
//! with Longhorn's rules: only when there is new data unless forced, then
//! `retain` the newest N the job made), on an injectable clock so tests
//! drive time. The cron, spec and scheduling logic live in [`crate::jobs`].

use std::collections::BTreeMap;
use std::time::Duration;

use super::manager::{Inner, VolumeManager};
use super::settings;
use super::ControlError;
use crate::jobs::schedule::{
    job_labels, retain_plan, should_backup, should_snapshot, snapshot_name,
};
use crate::jobs::{parse_jobs, JobTask, OwnedItem, RecurringJob, JOB_LABEL};

/// What one run of a job did (for logs and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRun {
    pub volume: String,
    pub job: String,
    /// "snapshot", "backup", "skipped: ..." or "failed: ...".
    pub outcome: String,
    /// Snapshots or backups deleted by `retain`.
    pub pruned: Vec<String>,
}

impl VolumeManager {
    /// Replaces a volume's recurring jobs (`jobs` is a JSON array in
    /// Longhorn's format; `[]` or empty removes them).
    pub async fn set_recurring_jobs(
        &self,
        volume: &str,
        jobs: &str,
    ) -> Result<super::VolumeInfo, ControlError> {
        let parsed = if jobs.trim().is_empty() {
            Vec::new()
        } else {
            parse_jobs(jobs)?
        };
        // Checks every cron line before anything changes.
        crate::jobs::Scheduler::new().set_jobs(volume, &parsed, self.inner.clock.now())?;
        let normalized = if parsed.is_empty() {
            String::new()
        } else {
            serde_json::to_string(&parsed).map_err(|e| ControlError::Internal(e.to_string()))?
        };
        let mut st = self.inner.state.lock().await;
        let v = st.volume_mut(volume)?;
        let mut next = v.record.clone();
        next.recurring_jobs = normalized;
        self.inner.store.save(&next)?;
        v.record = next;
        let now = self.inner.clock.now();
        self.inner.scheduler().set_jobs(volume, &parsed, now)?;
        let info = v.info(&self.inner);
        self.inner.publish(&st);
        tracing::info!(volume, jobs = %info.recurring_jobs, "recurring jobs set");
        Ok(info)
    }

    /// Runs every job due at the clock's current time, one after another;
    /// the background loop calls this every second, tests call it after
    /// moving a manual clock.
    pub async fn run_due_jobs(&self) -> Vec<JobRun> {
        let now = self.inner.clock.now();
        let due = self.inner.scheduler().due(now);
        let mut runs = Vec::new();
        for d in due {
            runs.push(self.run_job(&d.volume, &d.job).await);
        }
        runs
    }

    async fn run_job(&self, volume: &str, job: &RecurringJob) -> JobRun {
        let mut run = JobRun {
            volume: volume.to_string(),
            job: job.name.clone(),
            outcome: String::new(),
            pruned: Vec::new(),
        };
        match self.run_job_inner(volume, job, &mut run).await {
            Ok(outcome) => run.outcome = outcome,
            Err(e) => {
                tracing::warn!(volume, job = %job.name, error = %e, "recurring job failed");
                run.outcome = format!("failed: {e}");
            }
        }
        if !run.outcome.starts_with("failed") {
            tracing::info!(volume, job = %job.name, outcome = %run.outcome, pruned = ?run.pruned, "recurring job ran");
        }
        run
    }

    async fn run_job_inner(
        &self,
        volume: &str,
        job: &RecurringJob,
        run: &mut JobRun,
    ) -> Result<String, ControlError> {
        let attached = { self.inner.state.lock().await.volume(volume)?.live.is_some() };
        if !attached && !self.inner.settings.bool(settings::ALLOW_DETACHED_JOBS) {
            return Ok(format!(
                "skipped: volume detached (set {} to true to run jobs on detached volumes)",
                settings::ALLOW_DETACHED_JOBS
            ));
        }
        let now = self.inner.clock.now();
        let labels: BTreeMap<String, String> = job_labels(job);
        let chain = self.snapshot_list(volume).await?;
        let head_data = chain.iter().any(|s| s.is_head && s.size > 0);
        match job.task {
            JobTask::Snapshot | JobTask::SnapshotForceCreate => {
                if !should_snapshot(job.task, head_data) {
                    return Ok("skipped: no new data since the last snapshot".into());
                }
                let s = self
                    .snapshot_create(volume, Some(&snapshot_name(job, now)), labels)
                    .await?;
                run.pruned = self.prune_snapshots(volume, job).await?;
                Ok(format!("snapshot {}", s.name))
            }
            JobTask::Backup | JobTask::BackupForceCreate => {
                let last = {
                    self.inner
                        .state
                        .lock()
                        .await
                        .volume(volume)?
                        .record
                        .last_backup_snapshot
                        .clone()
                };
                // New data since the last backup: in the head, or in a
                // snapshot newer than the one it was taken from.
                let newer = match chain.iter().position(|s| !s.is_head && s.name == last) {
                    Some(i) => chain[i + 1..].iter().any(|s| s.size > 0),
                    None => true,
                };
                if !should_backup(job.task, newer || head_data) {
                    return Ok("skipped: no new data since the last backup".into());
                }
                let snap = self
                    .snapshot_create(volume, Some(&snapshot_name(job, now)), labels.clone())
                    .await?;
                let b = self.backup_create(volume, Some(&snap.name), labels).await?;
                run.pruned = self.prune_backups(volume, job).await?;
                run.pruned.extend(self.prune_snapshots(volume, job).await?);
                Ok(format!("backup {}", b.name))
            }
        }
    }

    /// Deletes the job's snapshots beyond the newest `retain`.
    async fn prune_snapshots(
        &self,
        volume: &str,
        job: &RecurringJob,
    ) -> Result<Vec<String>, ControlError> {
        let owned: Vec<OwnedItem> = self
            .snapshot_list(volume)
            .await?
            .into_iter()
            .filter(|s| !s.is_head && !s.removed && s.labels.get(JOB_LABEL) == Some(&job.name))
            .map(|s| OwnedItem {
                name: s.name,
                created: parse_time(&s.created),
            })
            .collect();
        let doomed = retain_plan(&owned, job.retain);
        for name in &doomed {
            if self.inner.snapshot_in_use(volume, name) {
                continue;
            }
            self.snapshot_delete(volume, name).await?;
        }
        if !doomed.is_empty() {
            // Merge what the removals could not merge yet.
            let _ = self.snapshot_purge(volume).await;
        }
        Ok(doomed)
    }

    /// Deletes the job's backups beyond the newest `retain`.
    async fn prune_backups(
        &self,
        volume: &str,
        job: &RecurringJob,
    ) -> Result<Vec<String>, ControlError> {
        let owned: Vec<OwnedItem> = self
            .backup_list(Some(volume))
            .await?
            .into_iter()
            .filter(|b| {
                b.state == super::backups::BackupState::Completed
                    && b.labels.get(JOB_LABEL) == Some(&job.name)
            })
            .map(|b| OwnedItem {
                name: b.name,
                created: parse_time(&b.created),
            })
            .collect();
        let doomed = retain_plan(&owned, job.retain);
        for name in &doomed {
            self.backup_delete(&format!("bak://{volume}/{name}"))
                .await?;
        }
        Ok(doomed)
    }
}

fn parse_time(s: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_default()
}

impl Inner {
    pub(super) fn scheduler(&self) -> std::sync::MutexGuard<'_, crate::jobs::Scheduler> {
        self.scheduler.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs due jobs every second (the scheduler decides, on the injected
/// clock, which are due).
pub(super) async fn jobs_loop(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(inner) = inner.upgrade() else { return };
        let m = VolumeManager::handle(inner);
        for run in m.run_due_jobs().await {
            if run.outcome.starts_with("failed") {
                tracing::warn!(volume = %run.volume, job = %run.job, outcome = %run.outcome, "recurring job");
            }
        }
    }
}
