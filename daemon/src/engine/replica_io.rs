//! The seam between the engine and one replica: how an I/O leg starts on
//! that replica. A local replica is files on a disk, reached with io_uring
//! SQEs on the queue's own ring; a remote replica is a request on the queue's
//! TCP connection to its node, answered through the queue's completion port.
//! Either way the leg counts as one pending completion in the queue engine.

use std::sync::Arc;

use io_uring::{opcode, squeue, types};

use super::remote::{RemoteReplica, SendBatch};
use crate::replica::{ChainChange, ChainOutcome, LayerInfo, Replica};
use crate::transport::Op;

/// Why persisting a revision failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SetRevisionError {
    /// The replica refused: our owner session is not its current one.
    Fenced(String),
    /// Anything else; the revision may or may not have been persisted.
    Failed(String),
}

impl std::fmt::Display for SetRevisionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetRevisionError::Fenced(m) | SetRevisionError::Failed(m) => f.write_str(m),
        }
    }
}

/// One replica as the engine reaches it.
pub enum ReplicaIo {
    /// A replica directory on one of this node's disks.
    Local(Arc<Replica>),
    /// A replica served by another node's cairnd.
    Remote(Arc<RemoteReplica>),
}

/// Which request a leg belongs to, for legs that are not SQEs.
pub(crate) struct Leg<'a> {
    pub qid: usize,
    pub tag: u16,
    /// This replica's unsent requests on this queue (reused; no allocation).
    pub batch: &'a mut SendBatch,
}

impl Leg<'_> {
    /// Sends `op` to a remote replica; returns the completions to wait for
    /// (1), or 0 with `failed` set when the replica has no connection for
    /// this queue.
    #[inline]
    fn remote(
        &mut self,
        r: &RemoteReplica,
        op: Op,
        payload: &[u8],
        buf: *mut u8,
        expect: u32,
        push: &mut impl FnMut(Pushed),
    ) {
        match r.queue(self.qid) {
            Some(conn) => {
                conn.send(self.batch, self.tag, op, payload, buf, expect);
                push(Pushed::Remote);
            }
            None => push(Pushed::Unreachable),
        }
    }
}

/// What starting a leg produced.
pub(crate) enum Pushed {
    /// An SQE for the queue's ring.
    Sqe(squeue::Entry),
    /// A request on a remote connection; its completion comes via the port.
    Remote,
    /// The leg could not start (no connection): it fails at once.
    Unreachable,
}

/// Zeros for WRITE_ZEROES on a head that shadows snapshot layers: the zeros
/// must be real data there, or the older layers would show through.
static ZEROES: [u8; ZERO_CHUNK as usize] = [0; ZERO_CHUNK as usize];
const ZERO_CHUNK: u32 = 128 * 1024;

/// Punch a hole but keep the file size (the image is always the volume size).
const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

impl ReplicaIo {
    pub fn size(&self) -> u64 {
        match self {
            ReplicaIo::Local(r) => r.size(),
            ReplicaIo::Remote(r) => r.size(),
        }
    }

    pub fn revision(&self) -> u64 {
        match self {
            ReplicaIo::Local(r) => r.revision(),
            ReplicaIo::Remote(r) => r.revision(),
        }
    }

    /// Persists the replica-set revision. `Err(Fenced)` when the replica
    /// refused because our owner session was fenced.
    pub(crate) fn set_revision(&self, rev: u64) -> Result<(), SetRevisionError> {
        fail::fail_point!("engine::set_revision", |_| Err(SetRevisionError::Failed(
            "failpoint engine::set_revision".into()
        )));
        match self {
            ReplicaIo::Local(r) => r.set_revision(rev).map_err(|e| match e {
                crate::replica::ReplicaError::Fence(f) => SetRevisionError::Fenced(f.to_string()),
                e => SetRevisionError::Failed(e.to_string()),
            }),
            ReplicaIo::Remote(r) => r.set_revision(rev).map_err(|e| {
                if e.is_fenced() {
                    SetRevisionError::Fenced(e.to_string())
                } else {
                    SetRevisionError::Failed(e.to_string())
                }
            }),
        }
    }

    /// The boot of the node serving this replica when it was opened.
    pub(crate) fn instance(&self) -> String {
        match self {
            ReplicaIo::Local(_) => crate::transport::server::boot_instance(),
            ReplicaIo::Remote(r) => r.instance().to_string(),
        }
    }

    /// Health check outside the I/O path: are the replica's files still the
    /// ones it opened; does the remote node still answer?
    pub(crate) fn check(&self) -> Result<(), String> {
        match self {
            ReplicaIo::Local(r) => r.check_files().map_err(|e| e.to_string()),
            ReplicaIo::Remote(r) => r.check(),
        }
    }

    /// Applies a layer-chain change (the volume's I/O must be quiesced).
    pub fn change_chain(&self, change: &ChainChange) -> Result<ChainOutcome, String> {
        match self {
            ReplicaIo::Local(r) => r.change_chain(change).map_err(|e| e.to_string()),
            ReplicaIo::Remote(r) => r.change_chain(change).map_err(|e| e.to_string()),
        }
    }

    /// The replica's layer chain, oldest first.
    pub fn chain(&self) -> Result<Vec<LayerInfo>, String> {
        match self {
            ReplicaIo::Local(r) => Ok(r.chain()),
            ReplicaIo::Remote(r) => r.chain().map_err(|e| e.to_string()),
        }
    }

    /// Where this replica lives, for logs and status.
    pub fn describe(&self) -> String {
        match self {
            ReplicaIo::Local(r) => r.dir().display().to_string(),
            ReplicaIo::Remote(r) => format!("{} at {}", r.target().replica, r.target().addr),
        }
    }

    /// Blocking data sync (detach and shutdown; the I/O path uses `prep_flush`).
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        match self {
            ReplicaIo::Local(r) => {
                // SAFETY: the fd is owned by `r`, which outlives this call.
                if unsafe { libc::fdatasync(r.head_fd()) } == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
            ReplicaIo::Remote(r) => r.sync().map_err(|e| std::io::Error::other(e.to_string())),
        }
    }

    /// Starts a write of `len` bytes from `buf`; returns the bytes its
    /// completions must add up to.
    ///
    /// `buf` must stay valid until every leg has completed: it is the ublk
    /// tag's I/O buffer, which the kernel does not reuse before the tag is
    /// completed.
    #[inline]
    pub(crate) fn prep_write(
        &self,
        leg: &mut Leg<'_>,
        offset: u64,
        len: u32,
        buf: *const u8,
        fua: bool,
        push: &mut impl FnMut(Pushed),
    ) -> u32 {
        match self {
            ReplicaIo::Local(r) => {
                r.mark_written(offset, len as u64);
                let flags = if fua { libc::RWF_DSYNC } else { 0 };
                push(Pushed::Sqe(
                    opcode::Write::new(types::Fd(r.head_fd()), buf, len)
                        .offset(offset)
                        .rw_flags(flags as _)
                        .build(),
                ));
                len
            }
            ReplicaIo::Remote(r) => {
                // SAFETY: `buf` holds `len` bytes for the life of the request.
                let data = unsafe { std::slice::from_raw_parts(buf, len as usize) };
                leg.remote(
                    r,
                    Op::Write { offset, fua },
                    data,
                    std::ptr::null_mut(),
                    len,
                    push,
                );
                len
            }
        }
    }

    /// Starts a read of `len` bytes at `offset` into `buf`. Locally each
    /// block is resolved through the layer chain and ranges no layer holds
    /// are zeroed here; a remote replica resolves its own chain. Returns the
    /// bytes the completions must add up to.
    #[inline]
    pub(crate) fn prep_read(
        &self,
        leg: &mut Leg<'_>,
        offset: u64,
        len: u32,
        buf: *mut u8,
        push: &mut impl FnMut(Pushed),
    ) -> u32 {
        match self {
            ReplicaIo::Local(r) => {
                let mut expected = 0u32;
                r.resolve_read(offset, len as u64, |seg| {
                    // SAFETY: segments lie within [0, len) of the request, and
                    // `buf` holds at least `len` bytes (the tag's I/O buffer).
                    let dst = unsafe { buf.add(seg.buf_offset as usize) };
                    match seg.fd {
                        Some(fd) => {
                            push(Pushed::Sqe(
                                opcode::Read::new(types::Fd(fd), dst, seg.len as u32)
                                    .offset(seg.file_offset)
                                    .build(),
                            ));
                            expected += seg.len as u32;
                        }
                        // SAFETY: as above, `dst..dst+len` is inside `buf`.
                        None => unsafe { std::ptr::write_bytes(dst, 0, seg.len as usize) },
                    }
                });
                expected
            }
            ReplicaIo::Remote(r) => {
                leg.remote(r, Op::Read { offset, len }, &[], buf, len, push);
                len
            }
        }
    }

    /// Starts a data sync of the writable layer.
    #[inline]
    pub(crate) fn prep_flush(&self, leg: &mut Leg<'_>, push: &mut impl FnMut(Pushed)) -> u32 {
        match self {
            ReplicaIo::Local(r) => {
                push(Pushed::Sqe(
                    opcode::Fsync::new(types::Fd(r.head_fd()))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build(),
                ));
                0
            }
            ReplicaIo::Remote(r) => {
                leg.remote(r, Op::Flush, &[], std::ptr::null_mut(), 0, push);
                0
            }
        }
    }

    /// Starts a discard. With snapshot layers under the head a hole would let
    /// older data show through, which is allowed after a discard but wastes
    /// nothing to skip, so the discard is dropped there (as Longhorn does).
    #[inline]
    pub(crate) fn prep_discard(
        &self,
        leg: &mut Leg<'_>,
        offset: u64,
        len: u32,
        push: &mut impl FnMut(Pushed),
    ) -> u32 {
        match self {
            ReplicaIo::Local(r) => {
                if !r.has_lower_layers() {
                    push(Pushed::Sqe(
                        opcode::Fallocate::new(types::Fd(r.head_fd()), len as u64)
                            .offset(offset)
                            .mode(PUNCH_HOLE)
                            .build(),
                    ));
                }
                0
            }
            ReplicaIo::Remote(r) => {
                leg.remote(
                    r,
                    Op::Discard { offset, len },
                    &[],
                    std::ptr::null_mut(),
                    0,
                    push,
                );
                0
            }
        }
    }

    /// Starts a write-zeroes: a hole when the head is the only layer (holes
    /// read as zeros), real zeros when older layers would show through.
    #[inline]
    pub(crate) fn prep_write_zeroes(
        &self,
        leg: &mut Leg<'_>,
        offset: u64,
        len: u32,
        push: &mut impl FnMut(Pushed),
    ) -> u32 {
        match self {
            ReplicaIo::Local(r) => {
                let fd = types::Fd(r.head_fd());
                if !r.has_lower_layers() {
                    push(Pushed::Sqe(
                        opcode::Fallocate::new(fd, len as u64)
                            .offset(offset)
                            .mode(PUNCH_HOLE)
                            .build(),
                    ));
                    return 0;
                }
                r.mark_written(offset, len as u64);
                let mut done = 0u32;
                while done < len {
                    let n = (len - done).min(ZERO_CHUNK);
                    push(Pushed::Sqe(
                        opcode::Write::new(fd, ZEROES.as_ptr(), n)
                            .offset(offset + done as u64)
                            .build(),
                    ));
                    done += n;
                }
                len
            }
            ReplicaIo::Remote(r) => {
                leg.remote(
                    r,
                    Op::WriteZeroes { offset, len },
                    &[],
                    std::ptr::null_mut(),
                    0,
                    push,
                );
                0
            }
        }
    }
}
