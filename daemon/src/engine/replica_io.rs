//! The seam between the engine and one replica: how an I/O becomes io_uring
//! submissions for that replica. A local replica is files on a disk; a remote
//! replica (reached over TCP) becomes another variant here, and the queue loop
//! does not change.

use std::sync::Arc;

use io_uring::{opcode, squeue, types};

use crate::replica::Replica;

/// One replica as the engine reaches it.
pub enum ReplicaIo {
    /// A replica directory on one of this node's disks.
    Local(Arc<Replica>),
}

/// Zeros for WRITE_ZEROES on a head that shadows snapshot layers: the zeros
/// must be real data there, or the older layers would show through.
static ZEROES: [u8; ZERO_CHUNK as usize] = [0; ZERO_CHUNK as usize];
const ZERO_CHUNK: u32 = 128 * 1024;

/// Punch a hole but keep the file size (the image is always the volume size).
const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

impl ReplicaIo {
    pub(crate) fn size(&self) -> u64 {
        match self {
            ReplicaIo::Local(r) => r.size(),
        }
    }

    pub(crate) fn revision(&self) -> u64 {
        match self {
            ReplicaIo::Local(r) => r.revision(),
        }
    }

    pub(crate) fn set_revision(&self, rev: u64) -> Result<(), String> {
        match self {
            ReplicaIo::Local(r) => r.set_revision(rev).map_err(|e| e.to_string()),
        }
    }

    /// Health check outside the I/O path: are the replica's files still the
    /// ones it opened?
    pub(crate) fn check(&self) -> Result<(), String> {
        match self {
            ReplicaIo::Local(r) => r.check_files().map_err(|e| e.to_string()),
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
        }
    }

    /// Pushes the SQEs of a write of `len` bytes from `buf`; returns the bytes
    /// their completions must add up to.
    ///
    /// `buf` must stay valid until every pushed SQE has completed: it is the
    /// ublk tag's I/O buffer, which the kernel does not reuse before the tag
    /// is completed.
    #[inline]
    pub(crate) fn prep_write(
        &self,
        offset: u64,
        len: u32,
        buf: *const u8,
        fua: bool,
        push: &mut impl FnMut(squeue::Entry),
    ) -> u32 {
        match self {
            ReplicaIo::Local(r) => {
                r.mark_written(offset, len as u64);
                let flags = if fua { libc::RWF_DSYNC } else { 0 };
                push(
                    opcode::Write::new(types::Fd(r.head_fd()), buf, len)
                        .offset(offset)
                        .rw_flags(flags as _)
                        .build(),
                );
                len
            }
        }
    }

    /// Pushes the SQEs that read `len` bytes at `offset` into `buf`, resolving
    /// each block through the layer chain; ranges no layer holds are zeroed
    /// here. Returns the bytes the completions must add up to.
    #[inline]
    pub(crate) fn prep_read(
        &self,
        offset: u64,
        len: u32,
        buf: *mut u8,
        push: &mut impl FnMut(squeue::Entry),
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
                            push(
                                opcode::Read::new(types::Fd(fd), dst, seg.len as u32)
                                    .offset(seg.file_offset)
                                    .build(),
                            );
                            expected += seg.len as u32;
                        }
                        // SAFETY: as above, `dst..dst+len` is inside `buf`.
                        None => unsafe { std::ptr::write_bytes(dst, 0, seg.len as usize) },
                    }
                });
                expected
            }
        }
    }

    /// Pushes a data sync of the writable layer.
    #[inline]
    pub(crate) fn prep_flush(&self, push: &mut impl FnMut(squeue::Entry)) -> u32 {
        match self {
            ReplicaIo::Local(r) => {
                push(
                    opcode::Fsync::new(types::Fd(r.head_fd()))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build(),
                );
                0
            }
        }
    }

    /// Pushes a discard. With snapshot layers under the head a hole would let
    /// older data show through, which is allowed after a discard but wastes
    /// nothing to skip, so the discard is dropped there (as Longhorn does).
    #[inline]
    pub(crate) fn prep_discard(&self, offset: u64, len: u32, push: &mut impl FnMut(squeue::Entry)) -> u32 {
        match self {
            ReplicaIo::Local(r) => {
                if !r.has_lower_layers() {
                    push(
                        opcode::Fallocate::new(types::Fd(r.head_fd()), len as u64)
                            .offset(offset)
                            .mode(PUNCH_HOLE)
                            .build(),
                    );
                }
                0
            }
        }
    }

    /// Pushes a write-zeroes: a hole when the head is the only layer (holes
    /// read as zeros), real zeros when older layers would show through.
    #[inline]
    pub(crate) fn prep_write_zeroes(
        &self,
        offset: u64,
        len: u32,
        push: &mut impl FnMut(squeue::Entry),
    ) -> u32 {
        match self {
            ReplicaIo::Local(r) => {
                let fd = types::Fd(r.head_fd());
                if !r.has_lower_layers() {
                    push(opcode::Fallocate::new(fd, len as u64).offset(offset).mode(PUNCH_HOLE).build());
                    return 0;
                }
                r.mark_written(offset, len as u64);
                let mut done = 0u32;
                while done < len {
                    let n = (len - done).min(ZERO_CHUNK);
                    push(
                        opcode::Write::new(fd, ZEROES.as_ptr(), n)
                            .offset(offset + done as u64)
                            .build(),
                    );
                    done += n;
                }
                len
            }
        }
    }
}
