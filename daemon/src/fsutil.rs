//! Small filesystem helpers shared by the replica format and the control plane.
//!
//! Owns the one way Cairn replaces a metadata file: [`atomic_write`]. Every
//! metadata update goes through it so that a crash at any instant leaves
//! either the complete old file or the complete new one, never a torn mix.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Suffix of the temporary file [`atomic_write`] stages new content in.
/// Readers treat `*.tmp` files as crash leftovers and may delete them.
pub const TMP_SUFFIX: &str = ".tmp";

/// The staging path for `path`: `path` with [`TMP_SUFFIX`] appended.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(TMP_SUFFIX);
    PathBuf::from(s)
}

/// Replaces the contents of `path` with `bytes` atomically and durably.
///
/// Steps: write `path.tmp` (truncating any leftover from an earlier crash),
/// fsync it so the data is on disk before the name points at it, rename it
/// over `path` (atomic on POSIX filesystems), then fsync the parent directory
/// so the rename itself survives a power loss.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    fsync_dir(parent_dir(path))
}

/// Fsyncs a directory so that entries created, renamed or removed in it are
/// durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory holding `path`; `.` for a bare file name.
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_tmp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.meta");
        atomic_write(&p, b"one").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        // A crash leftover must not disturb the next write.
        std::fs::write(tmp_path(&p), b"garbage-garbage-garbage").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!tmp_path(&p).exists());
    }

    #[test]
    fn tmp_path_appends_suffix() {
        assert_eq!(
            tmp_path(Path::new("/a/b.meta")),
            PathBuf::from("/a/b.meta.tmp")
        );
    }

    #[test]
    fn parent_of_bare_name_is_dot() {
        assert_eq!(parent_dir(Path::new("x")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/a/x")), Path::new("/a"));
    }
}
