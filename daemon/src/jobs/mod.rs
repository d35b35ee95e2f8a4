//! Recurring jobs (Longhorn's `recurringJobs`): snapshot and backup on a cron
//! schedule, pure logic that the daemon drives.
//!
//! ```text
//!  StorageClass "recurringJobs" JSON ──spec::parse_jobs──▶ [RecurringJob]
//!                                                             │ Scheduler::set_jobs(volume, ..)
//!  daemon timer ──Clock::now──▶ Scheduler::due(now) ──▶ [DueJob] ──▶ daemon runs
//!                               Scheduler::next_wakeup()            should_snapshot / should_backup,
//!                                                                   snapshot_name, retain_plan
//! ```
//!
//! Nothing here does I/O or starts threads: the daemon owns the timer, the
//! volumes and the snapshot calls, and asks this module what to do, so every
//! decision is testable with a [`schedule::ManualClock`].

pub mod cron;
pub mod schedule;
pub mod spec;

pub use cron::{CronError, CronSchedule};
pub use schedule::{Clock, DueJob, ManualClock, OwnedItem, Scheduler, SystemClock, JOB_LABEL};
pub use spec::{parse_jobs, JobSpecError, JobTask, RecurringJob};
