//! Per-thread CPU time and context switches of this process, from
//! `/proc/self/task/*`: what each thread (queue driver, remote receivers,
//! replica server connections) costs per I/O.

use std::collections::BTreeMap;

/// One thread's counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// Time on a CPU, nanoseconds (`schedstat`'s first field).
    pub cpu_ns: u64,
    pub voluntary: u64,
    pub involuntary: u64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            cpu_ns: self.cpu_ns.saturating_sub(o.cpu_ns),
            voluntary: self.voluntary.saturating_sub(o.voluntary),
            involuntary: self.involuntary.saturating_sub(o.involuntary),
        }
    }
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, o: Counters) {
        self.cpu_ns += o.cpu_ns;
        self.voluntary += o.voluntary;
        self.involuntary += o.involuntary;
    }
}

/// Every thread of the process by id: (name, counters).
pub type Sample = BTreeMap<u32, (String, Counters)>;

pub fn sample() -> Sample {
    let mut out = Sample::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let p = e.path();
        let name = std::fs::read_to_string(p.join("comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let cpu_ns = std::fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let status = std::fs::read_to_string(p.join("status")).unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        out.insert(
            tid,
            (
                name,
                Counters {
                    cpu_ns,
                    voluntary: field("voluntary_ctxt_switches:"),
                    involuntary: field("nonvoluntary_ctxt_switches:"),
                },
            ),
        );
    }
    out
}

/// What each thread group (threads named alike: `rx-*` is one group) did
/// between two samples; threads born meanwhile count from zero.
pub fn delta(before: &Sample, after: &Sample) -> BTreeMap<String, Counters> {
    let mut out: BTreeMap<String, Counters> = BTreeMap::new();
    for (tid, (name, now)) in after {
        let was = before.get(tid).map(|(_, c)| *c).unwrap_or_default();
        *out.entry(group(name)).or_default() += *now - was;
    }
    out.retain(|_, c| c.cpu_ns > 0 || c.voluntary > 0 || c.involuntary > 0);
    out
}

/// The group a thread name belongs to: the name up to a per-instance
/// suffix (`rx-vol-r-1` → `rx`).
fn group(name: &str) -> String {
    if name.starts_with("rx-") {
        return "rx".to_string();
    }
    // io_uring's workers are `iou-wrk-PID`, `iou-sqp-PID`.
    match name.rsplit_once('-') {
        Some((head, tail)) if !tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit()) => {
            head.to_string()
        }
        _ => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_thread_is_sampled_and_its_work_shows_in_the_delta() {
        let before = sample();
        // 50 ms on the CPU, then a sleep (a voluntary switch, which also
        // brings the kernel's runtime account up to date).
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        let after = sample();
        let d = delta(&before, &after);
        assert!(d.values().any(|c| c.cpu_ns >= 10_000_000), "{d:?}");
        assert!(d.values().any(|c| c.voluntary >= 1), "{d:?}");
        assert_eq!(group("rx-vol-r-2"), "rx");
        assert_eq!(group("replica-conn"), "replica-conn");
        assert_eq!(group("iou-wrk-31280"), "iou-wrk");
    }
}
