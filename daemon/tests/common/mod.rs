//! Shared by the engine integration tests: a plain io_uring that plays the
//! ublk queue ring's part, including the remote completion port.
#![allow(dead_code)]

pub mod cluster;

use cairn::engine::{IoRequest, QueueEngine, SqeSink};
use io_uring::{opcode, squeue, types, IoUring};

/// user_data of the completion-port eventfd read.
const PORT: u64 = u64::MAX;

/// A ring that plays the ublk queue ring's part.
pub struct TestRing {
    pub ring: IoUring,
    armed: bool,
    port_buf: Box<u64>,
}

impl SqeSink for TestRing {
    fn push(&mut self, sqe: squeue::Entry, tag: u16, replica: u8) {
        let sqe = sqe.user_data(tag as u64 | (replica as u64) << 16);
        self.push_raw(sqe);
    }
}

impl TestRing {
    pub fn new() -> TestRing {
        TestRing {
            ring: IoUring::new(256).expect("io_uring"),
            armed: false,
            port_buf: Box::new(0),
        }
    }

    fn push_raw(&mut self, sqe: squeue::Entry) {
        // SAFETY: buffers referenced by the SQE outlive its completion (the
        // tests wait for every request before touching its buffer; the port
        // buffer lives as long as the ring).
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            self.ring.submit().expect("submit");
        }
    }

    fn arm(&mut self, engine: &QueueEngine) {
        if self.armed {
            return;
        }
        if let Some(fd) = engine.port_fd() {
            let buf: *mut u64 = &mut *self.port_buf;
            self.push_raw(
                opcode::Read::new(types::Fd(fd), buf.cast(), 8)
                    .build()
                    .user_data(PORT),
            );
            self.armed = true;
        }
    }

    /// Runs requests concurrently (one tag each) to completion; returns
    /// their results in order.
    pub fn run(&mut self, engine: &mut QueueEngine, reqs: &[(IoRequest, *mut u8)]) -> Vec<i32> {
        self.arm(engine);
        let mut results = vec![None; reqs.len()];
        for (tag, (req, buf)) in reqs.iter().enumerate() {
            results[tag] = engine.submit(tag as u16, *req, *buf, self);
        }
        while results.iter().any(|r| r.is_none()) {
            // As the frontend does before it waits: send queued remote requests.
            engine.flush_remote();
            self.ring.submit_and_wait(1).expect("submit_and_wait");
            let cqes: Vec<_> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (data, res) in cqes {
                if data == PORT {
                    self.armed = false;
                    let mut done = Vec::new();
                    engine.drain_remote(self, |tag, r| done.push((tag, r)));
                    for (tag, r) in done {
                        assert!(results[tag as usize].is_none(), "tag {tag} completed twice");
                        results[tag as usize] = Some(r);
                    }
                    self.arm(engine);
                    continue;
                }
                let tag = (data & 0xffff) as u16;
                if let Some(r) = engine.complete(tag, (data >> 16) as u8, res, self) {
                    assert!(results[tag as usize].is_none(), "tag {tag} completed twice");
                    results[tag as usize] = Some(r);
                }
            }
        }
        results.into_iter().map(|r| r.unwrap_or(i32::MIN)).collect()
    }

    pub fn one(&mut self, engine: &mut QueueEngine, req: IoRequest, buf: &mut [u8]) -> i32 {
        self.run(engine, &[(req, buf.as_mut_ptr())])[0]
    }
}
