//! Blocking I/O on a replica: what the replica server runs for a remote
//! engine, and what a rebuild reads and writes. The engine's local hot path
//! does not use these (it builds io_uring SQEs from the same layer maps).

use std::io;
use std::os::fd::RawFd;

use super::{Replica, BLOCK_SIZE};

/// Punch a hole but keep the file size.
const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

/// Zeros for write-zeroes over snapshot layers.
static ZEROES: [u8; 128 * 1024] = [0; 128 * 1024];

/// Runs a positional I/O call until `len` bytes are done, retrying on EINTR
/// and continuing after short transfers. `op(done)` transfers from byte
/// `done` on and returns the syscall's result.
fn full(len: usize, mut op: impl FnMut(usize) -> isize) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let n = op(done);
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "replica file ends early or takes no more data",
            ));
        }
        done += n as usize;
    }
    Ok(())
}

pub(super) fn pread_full(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let len = buf.len();
    let ptr = buf.as_mut_ptr();
    // SAFETY: `ptr + done .. ptr + len` lies inside `buf`.
    full(len, |done| unsafe {
        libc::pread(
            fd,
            ptr.add(done).cast(),
            len - done,
            (offset + done as u64) as libc::off_t,
        )
    })
}

pub(super) fn pwrite_full(fd: RawFd, buf: &[u8], offset: u64, flags: i32) -> io::Result<()> {
    full(buf.len(), |done| {
        let iov = libc::iovec {
            iov_base: buf[done..].as_ptr() as *mut _,
            iov_len: buf.len() - done,
        };
        // SAFETY: one iovec over a live readable buffer.
        unsafe { libc::pwritev2(fd, &iov, 1, (offset + done as u64) as libc::off_t, flags) }
    })
}

impl Replica {
    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.size()) || offset % BLOCK_SIZE != 0 || len % BLOCK_SIZE != 0
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` through the layer chain.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut result = Ok(());
        self.resolve_read(offset, buf.len() as u64, |seg| {
            if result.is_err() {
                return;
            }
            let dst = &mut buf[seg.buf_offset as usize..(seg.buf_offset + seg.len) as usize];
            match seg.fd {
                Some(fd) => result = pread_full(fd, dst, seg.file_offset),
                None => dst.fill(0),
            }
        });
        result
    }

    /// Writes `data` at `offset` into the head; with `fua`, durable on return.
    pub fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        pwrite_full(self.head_fd(), data, offset, flags)?;
        self.mark_written(offset, data.len() as u64);
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        // SAFETY: the head fd is owned by `self`.
        if unsafe { libc::fdatasync(self.head_fd()) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Discard: a hole on a head-only replica; dropped over snapshot layers
    /// (as the engine's local path does).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        if self.has_lower_layers() {
            return Ok(());
        }
        self.punch(offset, len)
    }

    /// Zeros: a hole on a head-only replica, real zeros over snapshot layers.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        if !self.has_lower_layers() {
            return self.punch(offset, len);
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROES.len() as u64);
            pwrite_full(self.head_fd(), &ZEROES[..n as usize], offset + done, 0)?;
            done += n;
        }
        self.mark_written(offset, len);
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on our own fd.
        let r = unsafe {
            libc::fallocate(
                self.head_fd(),
                PUNCH_HOLE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Byte ranges where any layer holds data, sorted and merged: what a full
    /// rebuild must copy (everything else reads as zeros).
    pub fn allocated_ranges(&self) -> Vec<(u64, u64)> {
        let c = self.chain_now();
        let mut blocks: Vec<(u64, u64)> = c.head_bits.ranges();
        blocks.extend(c.lower.extents().iter().map(|e| (e.start, e.end)));
        super::view::merge_bytes(blocks)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::replica::ReplicaSpec;

    #[test]
    fn write_read_zero_and_allocated() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = ReplicaSpec {
            volume: "v".into(),
            replica: "v-r-1".into(),
            size: 1 << 20,
        };
        let r = Replica::create(&tmp.path().join("r"), &spec).unwrap();
        r.write_at(8192, &[7u8; 8192], false).unwrap();
        r.write_at(65536, &[9u8; 4096], true).unwrap();
        let mut buf = vec![1u8; 16384];
        r.read_at(4096, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..12288].iter().all(|&b| b == 7));
        assert_eq!(r.allocated_ranges(), vec![(8192, 8192), (65536, 4096)]);
        r.write_zeroes(8192, 4096).unwrap();
        r.read_at(8192, &mut buf[..4096]).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        r.flush().unwrap();
        assert!(
            r.read_at(1 << 20, &mut buf[..4096]).is_err(),
            "past the end"
        );
        assert!(r.write_at(100, &[0u8; 4096], false).is_err(), "unaligned");
    }
}
