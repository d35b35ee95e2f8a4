//! The I/O loop: one io_uring plays the ublk queue ring's part (as the
//! frontend does: local replica SQEs on it, a read kept pending on the
//! engine's completion-port eventfd for remote answers, `flush_remote`
//! before each wait), keeping `qd` requests in flight until the limit.
//! The same loop drives a plain file for the raw baseline.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use cairn::engine::{IoOp, IoRequest, QueueEngine, SqeSink};
use io_uring::{opcode, squeue, types, IoUring};

/// user_data of the completion-port eventfd read.
const PORT: u64 = u64::MAX;

/// What one run does.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub op: IoOp,
    pub bs: u32,
    pub qd: u16,
    pub order: Order,
    pub limit: Limit,
    /// Record each request's latency.
    pub latency: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Random,
    /// From offset 0 up, each block once (the fill).
    Sequential,
}

#[derive(Debug, Clone, Copy)]
pub enum Limit {
    Time(Duration),
    /// Every block of the target once (with [`Order::Sequential`]).
    Whole,
}

/// What one run measured.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ios: u64,
    pub elapsed: Duration,
    /// Per-request latencies in ns, sorted (empty unless asked for).
    pub latencies: Vec<u64>,
}

impl Outcome {
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q`-quantile latency in µs (0 when not recorded).
    pub fn latency_us(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
        self.latencies[i.min(self.latencies.len() - 1)] as f64 / 1000.0
    }
}

/// What the loop drives.
pub enum Target<'a> {
    /// A plain file through io_uring (the baseline).
    Raw(&'a File),
    Engine(&'a mut QueueEngine),
}

/// The ring and the completion-port read buffer.
pub struct Ring {
    ring: IoUring,
    port_armed: bool,
    port_buf: Box<u64>,
}

impl SqeSink for Ring {
    fn push(&mut self, sqe: squeue::Entry, tag: u16, replica: u8) {
        let sqe = sqe.user_data(tag as u64 | (replica as u64) << 16);
        self.push_raw(sqe);
    }
}

impl Ring {
    pub fn new(entries: u32) -> anyhow::Result<Ring> {
        Ok(Ring {
            ring: IoUring::new(entries).context("io_uring_setup")?,
            port_armed: false,
            port_buf: Box::new(0),
        })
    }

    fn push_raw(&mut self, sqe: squeue::Entry) {
        // SAFETY: every buffer an SQE names (the request buffers, the port
        // buffer) lives until the loop has reaped its completion.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            // A full submission queue: hand it to the kernel and retry.
            let _ = self.ring.submit();
        }
    }

    fn arm_port(&mut self, engine: &QueueEngine) {
        if self.port_armed {
            return;
        }
        if let Some(fd) = engine.port_fd() {
            let buf: *mut u64 = &mut *self.port_buf;
            self.push_raw(
                opcode::Read::new(types::Fd(fd), buf.cast(), 8)
                    .build()
                    .user_data(PORT),
            );
            self.port_armed = true;
        }
    }
}

/// A small deterministic generator for offsets (xorshift64*).
struct Offsets {
    state: u64,
    blocks: u64,
    next_seq: u64,
    order: Order,
}

impl Offsets {
    /// The next block index, or `None` when a sequential pass is done.
    fn next(&mut self) -> Option<u64> {
        match self.order {
            Order::Sequential => {
                let b = self.next_seq;
                self.next_seq += 1;
                (b < self.blocks).then_some(b)
            }
            Order::Random => {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                Some(self.state.wrapping_mul(0x2545_f491_4f6c_dd1d) % self.blocks)
            }
        }
    }
}

/// The requests of one run: a buffer, a start time and (once finished)
/// a result per tag.
struct Requests {
    w: Workload,
    offsets: Offsets,
    bufs: Vec<Vec<u8>>,
    started: Vec<Instant>,
    deadline: Option<Instant>,
    in_flight: usize,
    /// Finished requests not yet counted: (tag, result).
    ready: Vec<(u16, i32)>,
}

impl Requests {
    /// Starts a request on `tag` unless the run is over.
    fn issue(&mut self, tag: u16, ring: &mut Ring, target: &mut Target, now: Instant) {
        if self.deadline.is_some_and(|d| now >= d) {
            return;
        }
        let Some(block) = self.offsets.next() else {
            return;
        };
        let (bs, offset) = (self.w.bs, block * self.w.bs as u64);
        let buf = self.bufs[tag as usize].as_mut_ptr();
        self.started[tag as usize] = now;
        self.in_flight += 1;
        match target {
            Target::Raw(f) => {
                let fd = types::Fd(f.as_raw_fd());
                let sqe = match self.w.op {
                    IoOp::Write => opcode::Write::new(fd, buf, bs).offset(offset).build(),
                    _ => opcode::Read::new(fd, buf, bs).offset(offset).build(),
                };
                ring.push_raw(sqe.user_data(tag as u64));
            }
            Target::Engine(e) => {
                let req = IoRequest {
                    op: self.w.op,
                    offset,
                    len: bs,
                    fua: false,
                };
                if let Some(r) = e.submit(tag, req, buf, ring) {
                    self.ready.push((tag, r));
                }
            }
        }
    }
}

/// Runs `w` on `target` (`size` bytes) to its limit; every request must
/// succeed with its full length.
pub fn run(
    ring: &mut Ring,
    target: &mut Target,
    size: u64,
    w: Workload,
) -> anyhow::Result<Outcome> {
    let qd = w.qd as usize;
    let blocks = size / w.bs as u64;
    if blocks == 0 || qd == 0 {
        bail!(
            "nothing to do: size {size}, block {} bytes, depth {qd}",
            w.bs
        );
    }
    let begin = Instant::now();
    let mut reqs = Requests {
        w,
        offsets: Offsets {
            state: 0x9e37_79b9_7f4a_7c15,
            blocks,
            next_seq: 0,
            order: w.order,
        },
        bufs: (0..qd)
            .map(|t| {
                (0..w.bs as usize)
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(t as u8 | 1))
                    .collect()
            })
            .collect(),
        started: vec![begin; qd],
        deadline: match w.limit {
            Limit::Time(d) => Some(begin + d),
            Limit::Whole => None,
        },
        in_flight: 0,
        ready: Vec::with_capacity(qd),
    };
    let mut latencies = Vec::with_capacity(if w.latency { 1 << 20 } else { 0 });
    let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(4 * qd + 8);
    let mut ios = 0u64;
    for tag in 0..w.qd {
        reqs.issue(tag, ring, target, begin);
    }
    loop {
        while let Some((tag, res)) = reqs.ready.pop() {
            if res != w.bs as i32 {
                bail!("{:?} of {} bytes on tag {tag} answered {res}", w.op, w.bs);
            }
            let now = Instant::now();
            reqs.in_flight -= 1;
            ios += 1;
            if w.latency {
                latencies.push((now - reqs.started[tag as usize]).as_nanos() as u64);
            }
            reqs.issue(tag, ring, target, now);
        }
        if reqs.in_flight == 0 {
            break;
        }
        if let Target::Engine(e) = target {
            e.flush_remote();
            ring.arm_port(e);
        }
        ring.ring.submit_and_wait(1).context("io_uring_enter")?;
        cqes.clear();
        cqes.extend(ring.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(data, res) in &cqes {
            match target {
                Target::Raw(_) => reqs.ready.push((data as u16, res)),
                Target::Engine(e) if data == PORT => {
                    ring.port_armed = false;
                    e.drain_remote(ring, |tag, r| reqs.ready.push((tag, r)));
                }
                Target::Engine(e) => {
                    let tag = (data & 0xffff) as u16;
                    if let Some(r) = e.complete(tag, (data >> 16) as u8, res, ring) {
                        reqs.ready.push((tag, r));
                    }
                }
            }
        }
    }
    let elapsed = begin.elapsed();
    latencies.sort_unstable();
    Ok(Outcome {
        ios,
        elapsed,
        latencies,
    })
}
