//! `QueueEngine`: the hot path of one frontend queue.
//!
//! A queue thread owns one `QueueEngine` and one io_uring. For each request
//! the engine pushes the SQEs of every replica leg into that ring (through
//! [`SqeSink`], which tags each SQE with the request's tag and the replica
//! index), and folds the completions back into one result per request. All
//! per-request state lives in a slab indexed by tag, allocated once: the hot
//! path neither allocates nor locks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use io_uring::squeue;

use super::remote::{CompletionPort, SendBatch};
use super::replica_io::{Leg, Pushed};
use super::volume::{healthy_of, rebuilding_of, tracking_of};
use super::ReplicaIo;
use super::{VolumeIo, MAX_REPLICAS};
use crate::replica::BLOCK_SIZE;

/// Where a queue's SQEs go: the ublk queue's ring in the daemon, a plain
/// `IoUring` in tests. The sink encodes `(tag, replica)` in the SQE's
/// user_data and hands both back with the completion.
pub trait SqeSink {
    fn push(&mut self, sqe: squeue::Entry, tag: u16, replica: u8);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoOp {
    #[default]
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// One block request as the frontend received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoRequest {
    pub op: IoOp,
    pub offset: u64,
    pub len: u32,
    /// Write with forced unit access: durable when acknowledged.
    pub fua: bool,
}

/// In-flight state of one tag.
#[derive(Clone, Copy)]
struct TagState {
    req: IoRequest,
    buf: *mut u8,
    /// SQEs not yet completed.
    pending: u32,
    /// Replicas this request was sent to, the readable ones among them
    /// (whose success acknowledges it), and those whose leg failed.
    targets: u32,
    readable: u32,
    failed: u32,
    /// Bytes each replica's completions must add up to, and did.
    expected: [u32; MAX_REPLICAS],
    done: [u32; MAX_REPLICAS],
    /// First negative result seen.
    error: i32,
    /// A leg was refused because our owner session was fenced.
    fenced: bool,
}

impl Default for TagState {
    fn default() -> Self {
        TagState {
            req: IoRequest::default(),
            buf: std::ptr::null_mut(),
            pending: 0,
            targets: 0,
            readable: 0,
            failed: 0,
            expected: [0; MAX_REPLICAS],
            done: [0; MAX_REPLICAS],
            error: 0,
            fenced: false,
        }
    }
}

/// Counters of one queue, written only by its thread (so the cache line is
/// never contended on the hot path) and summed when metrics are read.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct QueueStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub errors: AtomicU64,
    /// The volume's pause word this queue last acknowledged as quiet
    /// (nothing in flight, new requests held back).
    pub(crate) quiet_at: AtomicU64,
}

impl QueueStats {
    #[inline]
    fn count(&self, req: &IoRequest, result: i32) {
        let add = |c: &AtomicU64, n: u64| c.store(c.load(Ordering::Relaxed) + n, Ordering::Relaxed);
        if result < 0 {
            add(&self.errors, 1);
            return;
        }
        match req.op {
            IoOp::Read => {
                add(&self.reads, 1);
                add(&self.read_bytes, req.len as u64);
            }
            IoOp::Write => {
                add(&self.writes, 1);
                add(&self.write_bytes, req.len as u64);
            }
            IoOp::Flush => add(&self.flushes, 1),
            IoOp::Discard | IoOp::WriteZeroes => add(&self.discards, 1),
        }
    }
}

pub struct QueueEngine {
    volume: Arc<VolumeIo>,
    qid: usize,
    stats: Arc<QueueStats>,
    tags: Box<[TagState]>,
    /// Round-robin cursor for spreading reads over healthy replicas.
    next_read: u32,
    /// Where this queue's remote answers land.
    port: Option<Arc<CompletionPort>>,
    /// Unsent remote requests, per replica slot, and which slots have any.
    batches: [SendBatch; MAX_REPLICAS],
    unsent: u32,
    /// Requests that arrived while the volume was paused, started when it
    /// resumes. Capacity `depth`: pushing never allocates.
    deferred: Vec<(u16, IoRequest, *mut u8)>,
}

/// Requests that change data (and so are counted per region and fanned out
/// to rebuilding replicas).
#[inline]
fn is_write(op: IoOp) -> bool {
    matches!(op, IoOp::Write | IoOp::Discard | IoOp::WriteZeroes)
}

// SAFETY: the raw buffer pointers in `tags` are only dereferenced by the
// kernel through SQEs this engine submitted; the engine moves to its queue
// thread once, before any I/O.
unsafe impl Send for QueueEngine {}

impl QueueEngine {
    /// The engine of queue `qid`, `depth` tags deep.
    pub fn new(volume: Arc<VolumeIo>, qid: u16, depth: u16) -> QueueEngine {
        let stats = volume.register_queue();
        let port = volume.port(qid as usize).cloned();
        QueueEngine {
            volume,
            qid: qid as usize,
            stats,
            tags: vec![TagState::default(); depth as usize].into_boxed_slice(),
            next_read: 0,
            port,
            batches: Default::default(),
            unsent: 0,
            deferred: Vec::with_capacity(depth as usize),
        }
    }

    /// The pause handshake (see `VolumeIo::quiesce`); call at the end of
    /// every completion batch and after the completion port woke the queue.
    /// While the volume is paused, acknowledges once nothing is in flight;
    /// once it resumes, starts the requests held back meanwhile.
    pub fn poll_pause(&mut self, sink: &mut impl SqeSink, mut done: impl FnMut(u16, i32)) {
        let word = self.volume.pause_word();
        if word & 1 != 0 {
            if self.stats.quiet_at.load(Ordering::Relaxed) != word && !self.in_flight() {
                self.stats.quiet_at.store(word, Ordering::Release);
            }
            return;
        }
        let n = self.deferred.len();
        if n == 0 {
            return;
        }
        for i in 0..n {
            let (tag, req, buf) = self.deferred[i];
            if let Some(res) = self.submit(tag, req, buf, sink) {
                done(tag, res);
            }
        }
        // A pause that began meanwhile pushed its own entries after `n`.
        self.deferred.drain(..n);
    }

    /// Sends the remote requests started since the last flush, one `writev`
    /// per connection. Call before the queue thread waits for completions
    /// (the frontend does at the last completion of each batch).
    pub fn flush_remote(&mut self) {
        for r in Mask(self.unsent) {
            let batch = &mut self.batches[r];
            match self.volume.replica_io(r).as_deref() {
                Some(ReplicaIo::Remote(rem)) => match rem.queue(self.qid) {
                    Some(conn) => conn.flush(batch),
                    None => batch.clear(),
                },
                // The slot's replica was replaced: its old connection fails
                // what was queued on it when it closes.
                _ => batch.clear(),
            }
        }
        self.unsent = 0;
    }

    /// The eventfd to keep a read pending on (remote answers), if any.
    pub fn port_fd(&self) -> Option<std::os::fd::RawFd> {
        self.port.as_ref().map(|p| p.fd())
    }

    /// After the port's eventfd read completed: folds in every remote answer
    /// and reports each request that finished (`done(tag, result)`).
    pub fn drain_remote(&mut self, sink: &mut impl SqeSink, mut done: impl FnMut(u16, i32)) {
        let Some(port) = self.port.clone() else {
            return;
        };
        port.drain(|c| {
            if let Some(res) = self.complete(c.tag, c.replica, c.res, sink) {
                done(c.tag, res);
            }
        });
    }

    /// True while any request has SQEs the kernel has not completed.
    pub fn in_flight(&self) -> bool {
        self.tags.iter().any(|t| t.pending > 0)
    }

    /// Starts request `req` on `tag` with I/O buffer `buf` (at least `req.len`
    /// bytes, valid until the request completes). Returns `Some(result)` when
    /// the request finished without I/O (bad request, all-zero read, dropped
    /// discard), else `None` and the result comes from [`Self::complete`].
    ///
    /// The result is bytes for reads and writes, 0 for other operations, or a
    /// negative errno.
    pub fn submit(
        &mut self,
        tag: u16,
        req: IoRequest,
        buf: *mut u8,
        sink: &mut impl SqeSink,
    ) -> Option<i32> {
        if self.volume.pause_word() & 1 != 0 {
            // Held back until the pause ends (`poll_pause`); the tag's
            // buffer stays with us meanwhile.
            self.deferred.push((tag, req, buf));
            return None;
        }
        if req.op != IoOp::Flush {
            let end = req.offset.checked_add(req.len as u64);
            if end.is_none_or(|e| e > self.volume.size())
                || req.offset % BLOCK_SIZE != 0
                || req.len as u64 % BLOCK_SIZE != 0
            {
                return Some(-libc::EINVAL);
            }
        }
        if tag as usize >= self.tags.len() {
            return Some(-libc::EINVAL);
        }
        let write = is_write(req.op);
        if write {
            // Counted before the masks are loaded and before any leg starts
            // or dirty map is marked: a rebuild that sees a region idle
            // knows every write that loaded older masks there is done, and
            // a fence that sees every region idle knows no write that
            // passed the fence check below is in flight.
            self.volume.write_started(req.offset, req.len);
            fail::fail_point!("queue::submit::after_count");
        }
        let masks = self.volume.masks();
        let healthy = healthy_of(masks);
        if healthy == 0 || self.volume.is_fenced() {
            if write {
                self.volume.write_finished(req.offset, req.len);
            }
            return Some(-libc::EIO);
        }
        let st = &mut self.tags[tag as usize];
        *st = TagState {
            req,
            buf,
            ..TagState::default()
        };
        match req.op {
            IoOp::Read => {
                let r = pick_replica(
                    read_pool(healthy, self.volume.local_mask()),
                    &mut self.next_read,
                );
                self.issue_read(tag, r, sink);
            }
            _ => {
                let volume = &*self.volume;
                let targets = healthy | rebuilding_of(masks);
                if write {
                    let missed = tracking_of(masks) & !targets;
                    for r in Mask(missed) {
                        volume.mark_dirty(r, req.offset, req.len);
                    }
                }
                for r in Mask(targets) {
                    let mut leg = Leg {
                        qid: self.qid,
                        tag,
                        batch: &mut self.batches[r],
                    };
                    let mut start = LegStart::default();
                    let mut push = start.collector(sink, tag, r);
                    self.unsent |= 1 << r;
                    let io = volume.replica_io(r);
                    let Some(io) = io.as_ref() else {
                        st.failed |= 1 << r;
                        st.targets |= 1 << r;
                        continue;
                    };
                    let expected = match req.op {
                        IoOp::Write => {
                            io.prep_write(&mut leg, req.offset, req.len, buf, req.fua, &mut push)
                        }
                        IoOp::Flush => io.prep_flush(&mut leg, &mut push),
                        IoOp::Discard => io.prep_discard(&mut leg, req.offset, req.len, &mut push),
                        IoOp::WriteZeroes => {
                            io.prep_write_zeroes(&mut leg, req.offset, req.len, &mut push)
                        }
                        IoOp::Read => 0,
                    };
                    drop(push);
                    if start.unreachable {
                        st.failed |= 1 << r;
                        if st.error == 0 {
                            st.error = -libc::ENOTCONN;
                        }
                    }
                    st.expected[r] = expected;
                    st.pending += start.pending;
                    st.targets |= 1 << r;
                }
                st.readable = st.targets & healthy;
            }
        }
        if self.tags[tag as usize].pending == 0 {
            return self.finish(tag, sink);
        }
        None
    }

    /// Folds in the completion of one SQE that `submit` pushed for
    /// `(tag, replica)`. Returns `Some(result)` when the request is done.
    pub fn complete(
        &mut self,
        tag: u16,
        replica: u8,
        res: i32,
        sink: &mut impl SqeSink,
    ) -> Option<i32> {
        let st = self.tags.get_mut(tag as usize)?;
        let r = replica as usize;
        if st.pending == 0 || r >= MAX_REPLICAS {
            // Not ours: a completion for a tag with nothing in flight.
            tracing::error!(tag, replica, res, "completion for an idle tag ignored");
            return None;
        }
        st.pending -= 1;
        if res == -crate::transport::FENCED_ERRNO {
            st.fenced = true;
        }
        if res < 0 {
            st.failed |= 1 << r;
            if st.error == 0 {
                st.error = res;
            }
        } else {
            st.done[r] += res as u32;
        }
        if st.pending > 0 {
            return None;
        }
        self.finish(tag, sink)
    }

    /// All legs of `tag` are in: decide the result, failing replicas whose
    /// leg failed or came up short.
    fn finish(&mut self, tag: u16, sink: &mut impl SqeSink) -> Option<i32> {
        let result = self.decide(tag, sink);
        if let Some(res) = result {
            let req = self.tags[tag as usize].req;
            if is_write(req.op) {
                self.volume.write_finished(req.offset, req.len);
            }
            self.stats.count(&req, res);
        }
        result
    }

    fn decide(&mut self, tag: u16, sink: &mut impl SqeSink) -> Option<i32> {
        fail::fail_point!("queue::decide::before");
        let st = &mut self.tags[tag as usize];
        if st.fenced {
            // Not a replica failure: another engine owns the volume now.
            self.volume.mark_fenced(&format!(
                "a replica refused our {:?}: owner session fenced",
                st.req.op
            ));
            return Some(-libc::EIO);
        }
        for r in Mask(st.targets) {
            if st.done[r] != st.expected[r] {
                st.failed |= 1 << r;
            }
        }
        let st = *st;
        for r in Mask(st.failed) {
            let reason = if st.error < 0 {
                format!(
                    "{:?} failed: {}",
                    st.req.op,
                    std::io::Error::from_raw_os_error(-st.error)
                )
            } else {
                format!(
                    "{:?} came up short: {} of {} bytes",
                    st.req.op, st.done[r], st.expected[r]
                )
            };
            self.volume.fail_index(r, &reason);
            if is_write(st.req.op) {
                // The replica may or may not hold this write: recopy it.
                self.volume.mark_dirty(r, st.req.offset, st.req.len);
            }
        }
        let ok = st.readable & !st.failed;
        if st.req.op != IoOp::Read {
            // Acknowledged only if every replica in the healthy set *now*
            // (after the failures above left it) has it: a replica that
            // succeeded but left the set meanwhile does not count, and one
            // still in the set whose leg failed has already left it.
            let healthy_now = self.volume.healthy_mask();
            let succeeded = st.targets & !st.failed;
            if self.volume.is_fenced() {
                return Some(-libc::EIO);
            }
            if healthy_now == 0 || healthy_now & !succeeded != 0 || ok & healthy_now == 0 {
                return Some(if st.error < 0 { st.error } else { -libc::EIO });
            }
            return Some(match st.req.op {
                IoOp::Write => st.req.len as i32,
                _ => 0,
            });
        }
        // A read.
        if ok != 0 {
            return Some(st.req.len as i32);
        }
        // The replica we read from failed: read again from another one.
        let healthy = self.volume.healthy_mask();
        if healthy == 0 {
            return Some(-libc::EIO);
        }
        let r = pick_replica(
            read_pool(healthy, self.volume.local_mask()),
            &mut self.next_read,
        );
        let t = &mut self.tags[tag as usize];
        *t = TagState {
            req: st.req,
            buf: st.buf,
            ..TagState::default()
        };
        // A retry that cannot start (no connection) fails that replica
        // and tries the next, until none is left.
        self.issue_read(tag, r, sink);
        if self.tags[tag as usize].pending == 0 {
            // Done without I/O (all zeros) or could not start: decide
            // again (a failed start fails that replica, so this ends).
            return self.decide(tag, sink);
        }
        None
    }

    fn issue_read(&mut self, tag: u16, r: usize, sink: &mut impl SqeSink) {
        let volume = &*self.volume;
        let st = &mut self.tags[tag as usize];
        let mut leg = Leg {
            qid: self.qid,
            tag,
            batch: &mut self.batches[r],
        };
        self.unsent |= 1 << r;
        let mut start = LegStart::default();
        let mut push = start.collector(sink, tag, r);
        let io = volume.replica_io(r);
        let expected = match io.as_ref() {
            Some(io) => io.prep_read(&mut leg, st.req.offset, st.req.len, st.buf, &mut push),
            None => 0,
        };
        drop(push);
        let unreachable = start.unreachable || io.is_none();
        st.expected[r] = expected;
        st.pending = start.pending;
        st.targets = 1 << r;
        st.readable = 1 << r;
        if unreachable {
            st.failed |= 1 << r;
            st.error = -libc::ENOTCONN;
        }
    }
}

/// What starting one leg produced: SQEs on the ring and a remote request
/// each count as a pending completion; an unreachable replica fails the leg.
#[derive(Default)]
struct LegStart {
    pending: u32,
    unreachable: bool,
}

impl LegStart {
    /// The `push` callback the replica seam calls for each part of the leg.
    #[inline]
    fn collector<'a, S: SqeSink>(
        &'a mut self,
        sink: &'a mut S,
        tag: u16,
        r: usize,
    ) -> impl FnMut(Pushed) + 'a {
        move |p| match p {
            Pushed::Sqe(sqe) => {
                sink.push(sqe, tag, r as u8);
                self.pending += 1;
            }
            Pushed::Remote => self.pending += 1,
            Pushed::Unreachable => self.unreachable = true,
        }
    }
}

/// Replicas a read may go to: the healthy local ones when there are any (no
/// network hop, and they complete fastest), else every healthy one.
#[inline]
fn read_pool(healthy: u32, local: u32) -> u32 {
    if healthy & local != 0 {
        healthy & local
    } else {
        healthy
    }
}

/// Picks the next healthy replica after the cursor.
#[inline]
fn pick_replica(healthy: u32, cursor: &mut u32) -> usize {
    let n = healthy.count_ones();
    let k = *cursor % n;
    *cursor = cursor.wrapping_add(1);
    Mask(healthy).nth(k as usize).unwrap_or(0)
}

/// Iterates the set bit positions of a replica mask.
#[derive(Clone, Copy)]
struct Mask(u32);

impl Iterator for Mask {
    type Item = usize;
    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let i = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_iterates_bits() {
        assert_eq!(Mask(0b1011).collect::<Vec<_>>(), vec![0, 1, 3]);
        assert_eq!(Mask(0).count(), 0);
    }

    #[test]
    fn reads_prefer_local_replicas() {
        assert_eq!(read_pool(0b111, 0b001), 0b001);
        assert_eq!(read_pool(0b110, 0b001), 0b110, "local failed: any healthy");
        assert_eq!(read_pool(0b111, 0b101), 0b101);
    }

    #[test]
    fn reads_spread_round_robin() {
        let mut c = 0;
        let picks: Vec<_> = (0..4).map(|_| pick_replica(0b101, &mut c)).collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
    }
}
