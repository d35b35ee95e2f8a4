//! A replica on another node, as the engine's I/O path reaches it.
//!
//! Each ublk queue gets its own TCP connection to the replica (a
//! [`QueueConn`]), so queues never share a socket or a lock. The queue thread
//! encodes each request's header into a per-replica [`SendBatch`] (write
//! data is referenced, not copied) and, at the end of the batch of
//! completions it is handling, sends the whole batch with one `writev`; many
//! requests are in flight per connection. A receiver thread per
//! connection reads the answers, copies read data straight into the tag's
//! ublk buffer, and posts `(tag, replica, result)` to the queue's
//! [`CompletionPort`]: a lock-free queue plus an eventfd that has a read
//! pending on the queue's io_uring. That read's completion wakes the queue
//! thread from `io_uring_enter` (a waker from another thread would not), and
//! one wake drains every answer that arrived meanwhile.
//!
//! Failure: an answer that does not come within the replica timeout, a
//! broken or garbled stream, or a failed send kills the connection: every
//! request in flight on it completes with an error at once, so the engine
//! fails the replica and I/O goes on with the others after at most the
//! timeout. Each in-flight request's slot moves PENDING→IDLE by exactly one
//! compare-and-swap (answer, timeout or kill), so it completes exactly once.

use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;

use crate::replica::{ChainChange, ChainOutcome, Claim, LayerInfo};
use crate::transport::client::{connect_stream, PeerConn, PeerError};
use crate::transport::server::send_frame;
use crate::transport::{ClusterSecret, FrameReader, Header, Op, WireError};

/// How a remote replica is reached.
#[derive(Clone)]
pub struct RemoteTarget {
    /// `host:port` of the peer's replica server.
    pub addr: String,
    pub volume: String,
    pub replica: String,
    pub secret: ClusterSecret,
    /// Our node id, sent in the handshake (for the peer's logs).
    pub node: String,
    /// An answer that takes longer fails the replica.
    pub timeout: Duration,
}

/// One finished remote request.
#[derive(Debug, Clone, Copy)]
pub struct RemoteCompletion {
    pub tag: u16,
    pub replica: u8,
    pub res: i32,
}

/// Where remote answers for one queue land; see the module docs.
pub struct CompletionPort {
    queue: ArrayQueue<RemoteCompletion>,
    efd: OwnedFd,
    signaled: AtomicBool,
}

impl CompletionPort {
    /// A port for a queue of `depth` tags.
    pub fn new(depth: u16) -> std::io::Result<CompletionPort> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        // At most one request per (tag, replica) is in flight.
        let cap = (depth as usize * super::MAX_REPLICAS).max(1);
        Ok(CompletionPort {
            queue: ArrayQueue::new(cap),
            efd,
            signaled: AtomicBool::new(false),
        })
    }

    /// The eventfd the queue keeps a read pending on.
    pub fn fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    fn post(&self, c: RemoteCompletion) {
        if self.queue.push(c).is_err() {
            // Cannot happen: capacity covers every (tag, replica) pair.
            tracing::error!(
                tag = c.tag,
                replica = c.replica,
                "remote completion queue full; completion lost"
            );
        }
        self.wake();
    }

    /// Wakes the queue thread (it then drains the port and looks at the
    /// volume's pause word).
    pub fn wake(&self) {
        if !self.signaled.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd.
            unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Takes every posted completion. Call after the eventfd read completed
    /// (and re-arm it): clearing the flag first means a completion posted
    /// during the drain signals again rather than being stranded.
    pub fn drain(&self, mut f: impl FnMut(RemoteCompletion)) {
        self.signaled.store(false, Ordering::SeqCst);
        while let Some(c) = self.queue.pop() {
            f(c);
        }
    }
}

/// Requests encoded but not yet sent on one connection: headers in `bytes`,
/// and the segments (header ranges and borrowed payloads) in send order.
/// Owned by the queue engine (one per replica slot), so no lock.
#[derive(Default)]
pub struct SendBatch {
    bytes: Vec<u8>,
    segs: Vec<Seg>,
    iov: Vec<libc::iovec>,
}

enum Seg {
    Own {
        start: usize,
        len: usize,
    },
    /// A payload that stays valid until the request completes (the ublk
    /// tag's buffer).
    Borrowed {
        ptr: *const u8,
        len: usize,
    },
}

// SAFETY: the raw payload pointers are only read by `writev` on the queue
// thread that owns both the batch and the buffers they point into.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    fn push(&mut self, header: &Header, payload: &[u8]) -> Result<(), WireError> {
        let start = self.bytes.len();
        crate::transport::encode_frame_head(&mut self.bytes, header, payload)?;
        self.segs.push(Seg::Own {
            start,
            len: self.bytes.len() - start,
        });
        if !payload.is_empty() {
            self.segs.push(Seg::Borrowed {
                ptr: payload.as_ptr(),
                len: payload.len(),
            });
        }
        Ok(())
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.segs.clear();
    }

    /// Writes everything with as few `writev` calls as the kernel allows.
    fn write_to(&mut self, fd: RawFd) -> std::io::Result<()> {
        self.iov.clear();
        for s in &self.segs {
            let (base, len) = match *s {
                Seg::Own { start, len } => (self.bytes[start..].as_ptr(), len),
                Seg::Borrowed { ptr, len } => (ptr, len),
            };
            self.iov.push(libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: len,
            });
        }
        let mut at = 0;
        while at < self.iov.len() {
            let n = (self.iov.len() - at).min(1024);
            // SAFETY: every iovec points at live memory: `bytes` (not
            // modified until clear) or a payload pinned by its pending request.
            let w = unsafe { libc::writev(fd, self.iov[at..].as_ptr(), n as libc::c_int) };
            if w < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // Skip the fully written iovecs, trim a partly written one.
            let mut left = w as usize;
            while left > 0 && at < self.iov.len() {
                let v = &mut self.iov[at];
                if left >= v.iov_len {
                    left -= v.iov_len;
                    at += 1;
                } else {
                    // SAFETY: stays inside the same buffer.
                    v.iov_base = unsafe { (v.iov_base as *mut u8).add(left) }.cast();
                    v.iov_len -= left;
                    left = 0;
                }
            }
            if w == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
        }
        self.clear();
        Ok(())
    }
}

const IDLE: u32 = 0;
const PENDING: u32 = 1;

/// One tag's request in flight on a connection.
struct TagSlot {
    state: AtomicU32,
    /// Read destination (the tag's ublk buffer) and the bytes expected.
    buf: AtomicPtr<u8>,
    expect: AtomicU32,
    sent_ms: AtomicU64,
}

struct ConnShared {
    slots: Box<[TagSlot]>,
    dead: AtomicBool,
    port: Arc<CompletionPort>,
    /// The replica's slot index in the volume (set when installed).
    index: AtomicU8,
    stream: TcpStream,
    timeout_ms: u64,
    label: String,
}

impl ConnShared {
    fn finish(&self, tag: usize, res: i32) -> bool {
        let Some(slot) = self.slots.get(tag) else {
            return false;
        };
        if slot
            .state
            .compare_exchange(PENDING, IDLE, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        self.port.post(RemoteCompletion {
            tag: tag as u16,
            replica: self.index.load(Ordering::Relaxed),
            res,
        });
        true
    }

    /// Marks the connection dead and fails everything in flight on it.
    fn kill(&self, errno: i32, reason: &str) {
        if self.dead.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::warn!(replica = %self.label, %reason, "remote replica connection lost");
        let _ = self.stream.shutdown(Shutdown::Both);
        for tag in 0..self.slots.len() {
            self.finish(tag, -errno);
        }
    }
}

/// A queue's connection to the replica.
pub struct QueueConn {
    shared: Arc<ConnShared>,
    writer: TcpStream,
    receiver: Option<std::thread::JoinHandle<()>>,
}

/// Coarse monotonic milliseconds (vDSO, no syscall).
fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: fills a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

impl QueueConn {
    fn connect(
        t: &RemoteTarget,
        generation: u64,
        port: Arc<CompletionPort>,
        depth: u16,
        index: u8,
    ) -> Result<QueueConn, PeerError> {
        let (writer, mut reader) = connect_stream(&t.addr, &t.secret, &t.node, t.timeout)?;
        // Bind the connection to the replica and our session before any I/O.
        let mut buf = Vec::new();
        let open = Op::Open {
            volume: t.volume.clone(),
            replica: t.replica.clone(),
            claim: Claim::Join { generation },
        };
        let wire = |source| PeerError::Wire {
            addr: t.addr.clone(),
            source,
        };
        send_frame(
            &mut &writer,
            &mut buf,
            &Header {
                request_id: u64::MAX,
                op: open,
            },
            &[],
        )
        .map_err(wire)?;
        match reader.next_frame() {
            Ok(Some((h, _))) => match h.op {
                Op::Opened { .. } => {}
                Op::Error { errno, message } => {
                    return Err(PeerError::Remote {
                        addr: t.addr.clone(),
                        errno,
                        message,
                    })
                }
                other => {
                    return Err(PeerError::Unexpected {
                        addr: t.addr.clone(),
                        sent: "Open".into(),
                        got: format!("{other:?}"),
                    })
                }
            },
            Ok(None) => {
                return Err(PeerError::Closed {
                    addr: t.addr.clone(),
                })
            }
            Err(source) => {
                return Err(PeerError::Wire {
                    addr: t.addr.clone(),
                    source,
                })
            }
        }
        // Short reads let the receiver check timeouts while waiting.
        let _ = writer.set_read_timeout(Some(Duration::from_millis(100)));
        let slots = (0..depth)
            .map(|_| TagSlot {
                state: AtomicU32::new(IDLE),
                buf: AtomicPtr::new(std::ptr::null_mut()),
                expect: AtomicU32::new(0),
                sent_ms: AtomicU64::new(0),
            })
            .collect();
        let shared = Arc::new(ConnShared {
            slots,
            dead: AtomicBool::new(false),
            port,
            index: AtomicU8::new(index),
            stream: writer.try_clone().map_err(|source| PeerError::Connect {
                addr: t.addr.clone(),
                source,
            })?,
            timeout_ms: t.timeout.as_millis() as u64,
            label: format!("{} at {}", t.replica, t.addr),
        });
        let s2 = shared.clone();
        let receiver = std::thread::Builder::new()
            .name(format!("rx-{}", t.replica))
            .spawn(move || receive(s2, reader))
            .map_err(|source| PeerError::Connect {
                addr: t.addr.clone(),
                source,
            })?;
        Ok(QueueConn {
            shared,
            writer,
            receiver: Some(receiver),
        })
    }

    /// Queues one request for `tag` in `batch` (sent by [`Self::flush`]).
    /// Its result arrives on the port; for a read, `expect` bytes are copied
    /// into `buf` first.
    #[inline]
    pub(crate) fn send(
        &self,
        batch: &mut SendBatch,
        tag: u16,
        op: Op,
        payload: &[u8],
        buf: *mut u8,
        expect: u32,
    ) {
        let sh = &*self.shared;
        let Some(slot) = sh.slots.get(tag as usize) else {
            return;
        };
        slot.buf.store(buf, Ordering::Relaxed);
        slot.expect.store(expect, Ordering::Relaxed);
        slot.sent_ms.store(now_ms(), Ordering::Relaxed);
        slot.state.store(PENDING, Ordering::SeqCst);
        if sh.dead.load(Ordering::SeqCst) {
            sh.finish(tag as usize, -libc::EIO);
            return;
        }
        let header = Header {
            request_id: tag as u64,
            op,
        };
        if let Err(e) = batch.push(&header, payload) {
            sh.kill(libc::EIO, &format!("cannot encode a request: {e}"));
        }
    }

    /// Sends what `send` queued; never blocks longer than the socket's send
    /// timeout. A failure kills the connection (every request on it fails).
    pub(crate) fn flush(&self, batch: &mut SendBatch) {
        if batch.is_empty() {
            return;
        }
        if self.shared.dead.load(Ordering::SeqCst) {
            batch.clear();
            return;
        }
        if let Err(e) = batch.write_to(self.writer.as_raw_fd()) {
            batch.clear();
            self.shared.kill(libc::EIO, &format!("send failed: {e}"));
        }
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::Relaxed)
    }
}

impl Drop for QueueConn {
    fn drop(&mut self) {
        self.shared.kill(libc::EIO, "connection closed");
        if let Some(t) = self.receiver.take() {
            let _ = t.join();
        }
    }
}

/// Receiver thread: answers → completions; enforces the timeout.
fn receive(sh: Arc<ConnShared>, mut reader: FrameReader<TcpStream>) {
    let mut last_check = now_ms();
    while !sh.dead.load(Ordering::Relaxed) {
        match reader.next_frame() {
            Ok(Some((h, payload))) => {
                let tag = h.request_id as usize;
                let Some(slot) = sh.slots.get(tag) else {
                    sh.kill(
                        libc::EIO,
                        &format!("answer to unknown request {}", h.request_id),
                    );
                    return;
                };
                if slot.state.load(Ordering::Acquire) != PENDING {
                    sh.kill(
                        libc::EIO,
                        &format!("answer to request {tag}, which is not in flight"),
                    );
                    return;
                }
                let expect = slot.expect.load(Ordering::Relaxed);
                let res = match h.op {
                    Op::Ok => expect as i32,
                    Op::Data if payload.len() == expect as usize => {
                        // SAFETY: the tag is PENDING, so its buffer (at least
                        // `expect` bytes, the ublk tag buffer) is ours until
                        // the completion is posted below.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                payload.as_ptr(),
                                slot.buf.load(Ordering::Relaxed),
                                payload.len(),
                            )
                        };
                        expect as i32
                    }
                    Op::Data => {
                        sh.kill(
                            libc::EIO,
                            &format!("read answer of {} bytes, expected {expect}", payload.len()),
                        );
                        return;
                    }
                    Op::Error { errno, message } => {
                        tracing::warn!(replica = %sh.label, errno, %message, "remote replica I/O error");
                        -(errno.clamp(1, 4095))
                    }
                    other => {
                        sh.kill(libc::EPROTO, &format!("unexpected answer {other:?}"));
                        return;
                    }
                };
                sh.finish(tag, res);
            }
            Ok(None) => {
                sh.kill(libc::EIO, "peer closed the connection");
                return;
            }
            Err(WireError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                sh.kill(libc::EIO, &e.to_string());
                return;
            }
        }
        let now = now_ms();
        if now.saturating_sub(last_check) >= 50 {
            last_check = now;
            let late = sh.slots.iter().any(|s| {
                s.state.load(Ordering::Acquire) == PENDING
                    && now.saturating_sub(s.sent_ms.load(Ordering::Relaxed)) > sh.timeout_ms
            });
            if late {
                sh.kill(
                    libc::ETIMEDOUT,
                    &format!("no answer within {} ms", sh.timeout_ms),
                );
                return;
            }
        }
    }
}

/// A replica on another node: a control connection for the rare path and,
/// once installed in a volume, one [`QueueConn`] per queue.
pub struct RemoteReplica {
    target: RemoteTarget,
    /// The replica's size as it answered `Open`, or grew since.
    size: AtomicU64,
    revision: AtomicU64,
    /// The owner session this replica was claimed with; every connection
    /// of ours to it joins this generation.
    generation: u64,
    /// The serving node's boot when we claimed it.
    instance: String,
    control: Mutex<PeerConn>,
    queues: OnceLock<Box<[QueueConn]>>,
}

impl RemoteReplica {
    /// Connects, authenticates, opens the replica and claims an owner
    /// session of it (`claim`, see `replica::fence`) on the control
    /// connection.
    pub fn connect(target: RemoteTarget, claim: Claim) -> Result<RemoteReplica, PeerError> {
        let mut c = PeerConn::connect(&target.addr, &target.secret, &target.node, target.timeout)?;
        let open = Op::Open {
            volume: target.volume.clone(),
            replica: target.replica.clone(),
            claim,
        };
        let (size, revision, generation, instance) = match c.call(open)? {
            Op::Opened {
                size,
                revision,
                generation,
                instance,
            } => (size, revision, generation, instance),
            other => return Err(c.unexpected("Open".into(), other)),
        };
        Ok(RemoteReplica {
            target,
            size: AtomicU64::new(size),
            revision: AtomicU64::new(revision),
            generation,
            instance,
            control: Mutex::new(c),
            queues: OnceLock::new(),
        })
    }

    /// The owner generation of our session on this replica.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The serving node's boot when the replica was claimed.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn target(&self) -> &RemoteTarget {
        &self.target
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Opens the per-queue connections (once; the volume calls this when the
    /// replica joins it).
    pub(crate) fn start_queues(
        &self,
        ports: &[Arc<CompletionPort>],
        depth: u16,
        index: u8,
    ) -> Result<(), PeerError> {
        if self.queues.get().is_some() {
            return Ok(());
        }
        let conns = ports
            .iter()
            .map(|p| QueueConn::connect(&self.target, self.generation, p.clone(), depth, index))
            .collect::<Result<Vec<_>, _>>()?;
        let _ = self.queues.set(conns.into_boxed_slice());
        Ok(())
    }

    #[inline]
    pub(crate) fn queue(&self, qid: usize) -> Option<&QueueConn> {
        self.queues.get().and_then(|q| q.get(qid))
    }

    /// The control connection; one that an earlier call broke (a timeout
    /// leaves a late answer in the stream) is replaced by a new connection
    /// joining our session first.
    fn control(&self) -> Result<std::sync::MutexGuard<'_, PeerConn>, PeerError> {
        let mut c = self.control.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_broken() {
            // Fails with the fencing refusal when a newer owner holds it.
            *c = self.open_stream()?;
        }
        Ok(c)
    }

    pub(crate) fn set_revision(&self, revision: u64) -> Result<(), PeerError> {
        let first = self.control()?.call_ok(Op::SetRevision { revision });
        if let Err(PeerError::Closed { .. } | PeerError::Wire { .. }) = first {
            // The control stream died under us (the server closes a fenced
            // session's connections): ask once more on a fresh one, which
            // tells a fenced session from a failed node. Idempotent.
            self.control()?.call_ok(Op::SetRevision { revision })?;
        } else {
            first?;
        }
        self.revision.store(revision, Ordering::Release);
        Ok(())
    }

    /// Health check: the peer answers, and no queue connection died.
    pub(crate) fn check(&self) -> Result<(), String> {
        if let Some(q) = self.queues.get() {
            if q.iter().any(QueueConn::is_dead) {
                return Err(format!("connection to {} lost", self.target.addr));
            }
        }
        let mut c = self.control().map_err(|e| e.to_string())?;
        match c.call(Op::Ping) {
            Ok(Op::Pong) => Ok(()),
            Ok(other) => Err(format!("{}: answered {other:?} to Ping", self.target.addr)),
            Err(e) => Err(e.to_string()),
        }
    }

    pub(crate) fn sync(&self) -> Result<(), PeerError> {
        self.control()?.call_ok(Op::Flush)
    }

    /// Applies a chain change on the peer's replica.
    pub(crate) fn change_chain(&self, change: &ChainChange) -> Result<ChainOutcome, PeerError> {
        let mut c = self.control()?;
        match c.call(Op::ChangeChain {
            change: change.clone(),
        })? {
            Op::ChainChanged { names, coalesced } => {
                if let ChainChange::Grow { size } = change {
                    self.size.store(*size, Ordering::Release);
                }
                Ok(ChainOutcome { names, coalesced })
            }
            other => Err(c.unexpected("ChangeChain".into(), other)),
        }
    }

    /// The peer replica's layer chain.
    pub(crate) fn chain(&self) -> Result<Vec<LayerInfo>, PeerError> {
        let mut c = self.control()?;
        match c.call(Op::ListLayers)? {
            Op::Layers { layers } => Ok(layers),
            other => Err(c.unexpected("ListLayers".into(), other)),
        }
    }

    /// A separate blocking connection to this replica (a rebuild's stream).
    pub fn open_stream(&self) -> Result<PeerConn, PeerError> {
        let t = &self.target;
        let mut c = PeerConn::connect(&t.addr, &t.secret, &t.node, t.timeout)?;
        match c.call(Op::Open {
            volume: t.volume.clone(),
            replica: t.replica.clone(),
            claim: Claim::Join {
                generation: self.generation,
            },
        })? {
            Op::Opened { .. } => Ok(c),
            other => Err(c.unexpected("Open".into(), other)),
        }
    }
}
