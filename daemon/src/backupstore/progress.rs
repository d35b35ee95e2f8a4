//! Progress of a long backup or restore: bytes known and done, and the rate
//! since it started. Updated by the workers with relaxed atomics; read by
//! `cairnctl backup get` / `volume get`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[derive(Debug)]
pub struct Progress {
    total: AtomicU64,
    done: AtomicU64,
    started: Instant,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            started: Instant::now(),
        }
    }
    pub fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
    }
    pub fn add_done(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
    pub fn percent(&self) -> u32 {
        let (t, d) = (self.total(), self.done());
        if t == 0 {
            return 0;
        }
        (d.min(t) * 100 / t) as u32
    }
    /// Bytes per second since the start.
    pub fn rate(&self) -> u64 {
        let s = self.started.elapsed().as_secs_f64();
        if s <= 0.0 {
            0
        } else {
            (self.done() as f64 / s) as u64
        }
    }
}
