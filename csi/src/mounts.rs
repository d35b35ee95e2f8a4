//! Filesystems and mounts on this node: what is mounted where (from
//! `/proc/self/mountinfo`), and the tools that format, mount and grow
//! (`blkid`, `mkfs.*`, `mount`, `umount`, `resize2fs`, `xfs_growfs`).

use std::path::{Path, PathBuf};

use tonic::Status;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub target: PathBuf,
    pub fstype: String,
    pub source: String,
    /// The path inside the source filesystem (`/` for a whole device;
    /// a bind mount of a file shows the file).
    pub root: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                root: unescape(f.get(3)?),
                target: PathBuf::from(unescape(f.get(4)?)),
                fstype: r.first()?.to_string(),
                source: unescape(r.get(1)?),
            })
        })
        .collect()
}

/// Everything mounted now.
pub fn mounts() -> Result<Vec<Mount>, Status> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Status::internal(format!("reading /proc/self/mountinfo: {e}")))?;
    Ok(parse_mountinfo(&text))
}

/// The newest mount at `target`, if any.
pub fn mount_at(target: &Path) -> Result<Option<Mount>, Status> {
    Ok(mounts()?.into_iter().rev().find(|m| m.target == target))
}

/// Runs a tool; `Err` carries its stderr (tools print no secrets).
pub async fn run(tool: &str, args: &[&str]) -> Result<String, Status> {
    let out = tokio::process::Command::new(tool)
        .args(args)
        .output()
        .await
        .map_err(|e| {
            Status::internal(format!(
                "running {tool}: {e} (is it installed on the node?)"
            ))
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Status::internal(format!(
            "{tool} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The filesystem on `device`, or `None` when it holds none (blank).
pub async fn filesystem_on(device: &str) -> Result<Option<String>, Status> {
    let out = tokio::process::Command::new("blkid")
        .args(["-p", "-s", "TYPE", "-o", "value", device])
        .output()
        .await
        .map_err(|e| Status::internal(format!("running blkid: {e}")))?;
    match out.status.code() {
        Some(0) => Ok(
            Some(String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|t| !t.is_empty()),
        ),
        // 2: nothing recognised on the device.
        Some(2) => Ok(None),
        _ => Err(Status::internal(format!(
            "blkid -p {device} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// Formats blank `device` with `fs` (4 KiB blocks) plus `extra` options.
pub async fn format(device: &str, fs: &str, extra: &str) -> Result<(), Status> {
    let mut args: Vec<&str> = match fs {
        // A new volume reads as zeros already: no discard pass over it.
        "ext4" => vec!["-q", "-F", "-b", "4096", "-E", "nodiscard"],
        "xfs" => vec!["-q", "-f", "-K", "-b", "size=4096", "-s", "size=4096"],
        other => {
            return Err(Status::invalid_argument(format!(
                "fs_type {other:?} is not supported: use ext4 or xfs"
            )))
        }
    };
    args.extend(extra.split_whitespace());
    args.push(device);
    run(&format!("mkfs.{fs}"), &args).await.map(drop)
}

/// Grows the filesystem mounted at `target` (from `device`) to the device's
/// size; a no-op when it fills the device already.
pub async fn grow(fs: &str, device: &str, target: &Path) -> Result<(), Status> {
    match fs {
        "ext4" | "ext3" | "ext2" => run("resize2fs", &[device]).await.map(drop),
        "xfs" => run("xfs_growfs", &[&target.display().to_string()])
            .await
            .map(drop),
        _ => Ok(()),
    }
}

/// Bytes of the block device `path` (or the device a bind-mounted file
/// stands for), from sysfs.
pub fn block_size_of(path: &Path) -> Result<u64, Status> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(path)
        .map_err(|e| Status::not_found(format!("{}: {e}", path.display())))?;
    if !m.file_type().is_block_device() {
        return Err(Status::invalid_argument(format!(
            "{} is not a block device",
            path.display()
        )));
    }
    let (major, minor) = (libc::major(m.rdev()), libc::minor(m.rdev()));
    let sys = format!("/sys/dev/block/{major}:{minor}/size");
    let sectors = std::fs::read_to_string(&sys)
        .map_err(|e| Status::internal(format!("{sys}: {e}")))?
        .trim()
        .parse::<u64>()
        .map_err(|e| Status::internal(format!("{sys}: {e}")))?;
    Ok(sectors * 512)
}

/// Space and inodes of the filesystem at `path`.
pub fn fs_usage(path: &Path) -> Result<FsUsage, Status> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Status::invalid_argument("volume_path has a NUL byte"))?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is NUL-terminated and outlives the call; `s` is a buffer
    // of the right type that statvfs fills on success.
    if unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) } != 0 {
        return Err(Status::internal(format!(
            "statvfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: statvfs returned 0, so it initialized `s`.
    let s = unsafe { s.assume_init() };
    #[allow(clippy::unnecessary_cast)]
    let f = s.f_frsize as u64;
    #[allow(clippy::unnecessary_cast)]
    Ok(FsUsage {
        total: s.f_blocks as u64 * f,
        available: s.f_bavail as u64 * f,
        used: (s.f_blocks as u64).saturating_sub(s.f_bfree as u64) * f,
        inodes: s.f_files as u64,
        inodes_free: s.f_ffree as u64,
    })
}

/// What `statvfs` says of a mounted volume.
#[derive(Debug, Clone, Copy)]
pub struct FsUsage {
    pub total: u64,
    pub available: u64,
    pub used: u64,
    pub inodes: u64,
    pub inodes_free: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse() {
        let text =
            "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - ext4 /dev/ublkb0 rw,errors=continue\n\
                    37 35 0:5 /ublkb1 /var/lib/k/t rw shared:2 - devtmpfs udev rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].target, PathBuf::from("/mnt/a b"));
        assert_eq!(
            (m[0].fstype.as_str(), m[0].source.as_str()),
            ("ext4", "/dev/ublkb0")
        );
        assert_eq!(m[1].root, "/ublkb1");
    }
}
