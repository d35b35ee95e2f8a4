//! The ublk frontend: one `/dev/ublkbN` per attached volume, made with
//! `libublk`.
//!
//! Threads: `UblkDevice::start` spawns a device thread that runs
//! `UblkCtrl::run_target`; libublk spawns one thread per queue, and each queue
//! thread owns one io_uring that carries both the ublk commands and the
//! replica I/O, plus its own [`QueueEngine`]. Completions of replica I/O land
//! on the same ring the queue thread sleeps on, so nothing needs waking.
//!
//! Devices are created with `UBLK_F_USER_RECOVERY_REISSUE`: if cairnd dies,
//! the kernel keeps `/dev/ublkbN` and parks its I/O; the next cairnd recovers
//! the same device (`recover_dev_id`) and the parked requests are reissued —
//! block writes are idempotent, so reissuing is safe.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkFlags, UblkIORes};

use crate::engine::{IoOp, IoRequest, QueueEngine, SqeSink, VolumeIo};

const UBLK_CONTROL: &str = "/dev/ublk-control";
/// Largest single I/O the kernel sends us.
const MAX_IO_BYTES: u32 = 512 * 1024;
/// Largest discard / write-zeroes request.
const MAX_DISCARD_BYTES: u32 = 8 << 20;
/// Device start can take seconds under emulation; give it room.
const START_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("ublk driver not available: load it with `modprobe ublk_drv`, kernel 6.0 or newer")]
    DriverMissing,
    #[error("ublk device for volume {volume}: {op} failed: {source}")]
    Ublk {
        volume: String,
        op: &'static str,
        source: libublk::UblkError,
    },
    #[error(
        "ublk device for volume {volume} did not start within {0:?}",
        START_TIMEOUT
    )]
    StartTimeout { volume: String },
    #[error("ublk device thread for volume {volume} failed: {reason}")]
    Thread { volume: String, reason: String },
    #[error("bad frontend options: {0}")]
    Options(String),
    /// The kernel's ublk driver cannot resize a live device.
    #[error("online resize needs Linux 6.16 or newer (this kernel: {release})")]
    NoOnlineResize { release: String },
}

/// Queue layout of a ublk device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontendOptions {
    /// Hardware queues (one thread and one io_uring each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub queue_depth: u16,
}

impl Default for FrontendOptions {
    /// One queue per CPU up to 4, 128 deep.
    fn default() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        FrontendOptions {
            queues: cpus.clamp(1, 4) as u16,
            queue_depth: 128,
        }
    }
}

impl FrontendOptions {
    pub fn validate(&self) -> Result<(), FrontendError> {
        if !(1..=32).contains(&self.queues) {
            return Err(FrontendError::Options(format!(
                "queues {} is out of range: use 1-32",
                self.queues
            )));
        }
        if !(1..=4096).contains(&self.queue_depth) {
            return Err(FrontendError::Options(format!(
                "queue depth {} is out of range: use 1-4096",
                self.queue_depth
            )));
        }
        Ok(())
    }
}

/// Checks that the kernel has the ublk driver loaded.
pub fn ublk_available() -> Result<(), FrontendError> {
    if Path::new(UBLK_CONTROL).exists() {
        Ok(())
    } else {
        Err(FrontendError::DriverMissing)
    }
}

/// What the running kernel offers the ublk frontend, read at run time (the
/// same binary runs on 6.12, which lacks `UBLK_F_UPDATE_SIZE`, and on 7.x).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFeatures {
    /// `uname -r`, e.g. `6.12.57+deb12-amd64`.
    pub release: String,
    /// The ublk driver's `UBLK_F_*` bits from `UBLK_U_CMD_GET_FEATURES`;
    /// `None` without the driver or on a kernel older than 6.5 (no command).
    pub ublk: Option<u64>,
}

impl KernelFeatures {
    /// Asks the kernel (uname, then the ublk driver). Blocks briefly: it opens
    /// `/dev/ublk-control` and sends one control command.
    pub fn detect() -> KernelFeatures {
        KernelFeatures {
            release: kernel_release(),
            ublk: ublk_driver_features(),
        }
    }

    /// The driver resizes a live device (`UBLK_U_CMD_UPDATE_SIZE`, Linux 6.16+).
    pub fn online_resize(&self) -> bool {
        self.has(sys::UBLK_F_UPDATE_SIZE as u64)
    }

    /// Parked I/O of a dead server is reissued on recovery (Linux 6.0+).
    pub fn user_recovery_reissue(&self) -> bool {
        self.has(sys::UBLK_F_USER_RECOVERY_REISSUE as u64)
    }

    fn has(&self, bit: u64) -> bool {
        self.ublk.is_some_and(|f| f & bit == bit)
    }
}

/// The ublk driver's feature bits (`UBLK_F_*`), or `None` when the driver is
/// not loaded or does not answer `UBLK_U_CMD_GET_FEATURES` (before 6.5).
pub fn ublk_driver_features() -> Option<u64> {
    ublk_available().ok()?;
    UblkCtrl::get_features()
}

/// The running kernel's release (`uname -r`), or `unknown`.
pub fn kernel_release() -> String {
    // SAFETY: uname fills the zeroed struct; `release` is NUL-terminated.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".to_string();
    }
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    release.to_string_lossy().into_owned()
}

/// A running ublk device serving one volume.
/// Resizes live device `dev_id` of `volume` (see
/// [`UblkDevice::update_size`]); for callers that hold the device's id, not
/// the device.
pub fn resize_device(volume: &str, dev_id: u32, bytes: u64) -> Result<(), FrontendError> {
    let kernel = KernelFeatures::detect();
    if !kernel.online_resize() {
        return Err(FrontendError::NoOnlineResize {
            release: kernel.release,
        });
    }
    let ublk = |op, source| FrontendError::Ublk {
        volume: volume.to_string(),
        op,
        source,
    };
    let ctrl = UblkCtrl::new_simple(dev_id as i32).map_err(|e| ublk("open control", e))?;
    ctrl.update_size(bytes)
        .map_err(|e| ublk("update size", e))?;
    tracing::info!(volume, dev_id, bytes, "ublk device resized");
    Ok(())
}

pub struct UblkDevice {
    volume: String,
    dev_id: u32,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl UblkDevice {
    /// Makes `/dev/ublkbN` for `volume` and starts serving it. Blocks until the
    /// device is live. With `recover_dev_id`, takes over that device if a
    /// crashed cairnd left it quiesced, so the same device node comes back.
    pub fn start(
        volume: Arc<VolumeIo>,
        opts: &FrontendOptions,
        recover_dev_id: Option<u32>,
    ) -> Result<UblkDevice, FrontendError> {
        ublk_available()?;
        opts.validate()?;
        let name = volume.name().to_string();
        let recover = recover_dev_id.filter(|id| recoverable(*id));
        if let Some(id) = recover_dev_id.filter(|id| recover != Some(*id)) {
            remove_stale(&name, id);
        }
        let (tx, rx) = mpsc::channel::<Result<u32, String>>();
        let opts = *opts;
        let thread_volume = volume.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ublk-{name}"))
            .spawn(move || run_device(thread_volume, opts, recover, tx))
            .map_err(|e| FrontendError::Thread {
                volume: name.clone(),
                reason: e.to_string(),
            })?;
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(dev_id)) => {
                tracing::info!(volume = %name, dev_id, recovered = recover.is_some(), "ublk device started");
                Ok(UblkDevice {
                    volume: name,
                    dev_id,
                    thread: Some(thread),
                })
            }
            Ok(Err(reason)) => {
                let _ = thread.join();
                Err(FrontendError::Thread {
                    volume: name,
                    reason,
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(FrontendError::StartTimeout { volume: name })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let reason = match thread.join() {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => "device thread exited before the device started".to_string(),
                    Err(_) => "device thread panicked".to_string(),
                };
                Err(FrontendError::Thread {
                    volume: name,
                    reason,
                })
            }
        }
    }

    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.dev_id))
    }

    /// Changes the live device's capacity to `bytes` (a multiple of 4 KiB)
    /// with `UBLK_U_CMD_UPDATE_SIZE`: the kernel sees the new size at once,
    /// so a mounted filesystem can grow into it. Refused, changing nothing,
    /// when the driver lacks `UBLK_F_UPDATE_SIZE` (before Linux 6.16). The
    /// caller must have made the volume serve the new range first: this only
    /// tells the kernel.
    pub fn update_size(&self, bytes: u64) -> Result<(), FrontendError> {
        resize_device(&self.volume, self.dev_id, bytes)
    }

    /// Stops and deletes the device; returns when its threads are gone.
    pub fn stop(mut self) -> Result<(), FrontendError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), FrontendError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        // The device's own control lives on the device thread (libublk's
        // control ring is per thread), so use a fresh control here.
        let ctrl =
            UblkCtrl::new_simple(self.dev_id as i32).map_err(|source| FrontendError::Ublk {
                volume: self.volume.clone(),
                op: "open control",
                source,
            })?;
        if let Err(source) = ctrl.kill_dev() {
            tracing::warn!(volume = %self.volume, dev_id = self.dev_id, error = %source, "stopping ublk device");
        }
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => tracing::warn!(volume = %self.volume, %reason, "ublk device thread"),
            Err(_) => tracing::error!(volume = %self.volume, "ublk device thread panicked"),
        }
        // The device thread's control deletes the device when it drops; make
        // sure, since a stale device would pin its id.
        if let Ok(c) = UblkCtrl::new_simple(self.dev_id as i32) {
            let _ = c.del_dev();
        }
        tracing::info!(volume = %self.volume, dev_id = self.dev_id, "ublk device removed");
        Ok(())
    }
}

impl Drop for UblkDevice {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "removing ublk device on drop");
        }
    }
}

/// True when device `id` exists and waits for a new server (left behind by a
/// cairnd that died).
fn recoverable(id: u32) -> bool {
    match UblkCtrl::new_simple(id as i32) {
        Ok(ctrl) => {
            let info = ctrl.dev_info();
            let flags = info.flags;
            let state = info.state as u32;
            flags & sys::UBLK_F_USER_RECOVERY as u64 != 0
                && (state == sys::UBLK_S_DEV_QUIESCED || state == sys::UBLK_S_DEV_FAIL_IO)
        }
        Err(_) => false,
    }
}

/// Deletes device `id` if it still exists: a crashed run's device, parked
/// for a recovery that will not come (its volume was taken over elsewhere).
pub fn remove_leftover_device(volume: &str, id: u32) {
    remove_stale(volume, id);
}

/// Deletes device `id` if it still exists (a previous run's device that cannot
/// be recovered).
fn remove_stale(volume: &str, id: u32) {
    if let Ok(ctrl) = UblkCtrl::new_simple(id as i32) {
        tracing::info!(%volume, dev_id = id, "removing stale ublk device");
        let _ = ctrl.kill_dev();
        let _ = ctrl.del_dev();
    }
}

/// Device thread: creates (or recovers) the device and serves it until it is
/// stopped. Reports the device id, or why it could not start, on `started`.
fn run_device(
    volume: Arc<VolumeIo>,
    opts: FrontendOptions,
    recover: Option<u32>,
    started: mpsc::Sender<Result<u32, String>>,
) -> Result<(), String> {
    let name = volume.name().to_string();
    let fail = |op: &str, e: libublk::UblkError| {
        let msg = format!("{op}: {e}");
        let _ = started.send(Err(msg.clone()));
        msg
    };
    if let Some(id) = recover {
        let ctrl =
            UblkCtrl::new_simple(id as i32).map_err(|e| fail("open device for recovery", e))?;
        ctrl.start_user_recover()
            .map_err(|e| fail("start user recovery", e))?;
    }
    let dev_flags = if recover.is_some() {
        UblkFlags::UBLK_DEV_F_RECOVER_DEV
    } else {
        UblkFlags::UBLK_DEV_F_ADD_DEV
    };
    let ctrl = UblkCtrlBuilder::default()
        .name("cairn")
        .id(recover.map_or(-1, |id| id as i32))
        .nr_queues(opts.queues)
        .depth(opts.queue_depth)
        .io_buf_bytes(MAX_IO_BYTES)
        .ctrl_flags((sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64)
        .dev_flags(dev_flags)
        .build()
        .map_err(|e| fail("create device", e))?;

    let size = volume.size();
    let legs = volume.replica_count() as u32 + 1;
    let tgt_init = move |dev: &mut UblkDev| {
        set_params(dev, size);
        // Each request can put one SQE per replica (or more, for reads split
        // across layers) on the queue's ring besides its ublk command: size
        // the ring so the queue rarely flushes early or overflows its CQ.
        let depth = dev.dev_info.queue_depth as u32;
        dev.tgt.sq_depth = (depth * 2).clamp(32, 4096) as u16;
        dev.tgt.cq_depth = (depth * legs * 2).clamp(64, 16384) as u16;
        Ok(())
    };
    let q_volume = volume.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| serve_queue(qid, dev, q_volume.clone());
    let report = started.clone();
    let on_started = move |ctrl: &UblkCtrl| {
        let _ = report.send(Ok(ctrl.dev_info().dev_id));
    };
    let span = tracing::info_span!("volume", volume = %name);
    let _enter = span.enter();
    ctrl.run_target(tgt_init, q_fn, on_started)
        .map_err(|e| fail("run device", e))?;
    Ok(())
}

/// Block-layer parameters: 4 KiB blocks (the replica extent granularity), a
/// volatile cache (so the kernel sends FLUSH), FUA, discard and write-zeroes.
fn set_params(dev: &mut UblkDev, size: u64) {
    let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
    let tgt = &mut dev.tgt;
    tgt.dev_size = size;
    tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: 12,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 12,
            max_sectors,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_granularity: 4096,
            max_discard_sectors: MAX_DISCARD_BYTES >> 9,
            max_write_zeroes_sectors: MAX_DISCARD_BYTES >> 9,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    };
}

/// Pushes SQEs into this queue thread's ublk ring, tagged for libublk's
/// dispatch: target I/O, the request's tag, the replica index.
struct QueueSink<'a, 'q> {
    queue: &'a UblkQueue<'q>,
}

impl SqeSink for QueueSink<'_, '_> {
    #[inline]
    fn push(&mut self, sqe: io_uring::squeue::Entry, tag: u16, replica: u8) {
        let data = UblkIOCtx::build_user_data(tag, 0, replica as u32, true);
        if let Err(e) = self.queue.ublk_submit_sqe_sync(sqe.user_data(data)) {
            // Only fails if the ring itself is broken; the queue is going down.
            tracing::error!(tag, error = %e, "submitting replica I/O");
        }
    }
}

/// Translates a ublk descriptor into an engine request.
#[inline]
fn request_of(iod: &sys::ublksrv_io_desc) -> Result<IoRequest, i32> {
    let op = match iod.op_flags & 0xff {
        sys::UBLK_IO_OP_READ => IoOp::Read,
        sys::UBLK_IO_OP_WRITE => IoOp::Write,
        // FLUSH carries no range (start sector u64::MAX): no bounds check.
        sys::UBLK_IO_OP_FLUSH => {
            return Ok(IoRequest {
                op: IoOp::Flush,
                ..IoRequest::default()
            })
        }
        sys::UBLK_IO_OP_DISCARD => IoOp::Discard,
        sys::UBLK_IO_OP_WRITE_ZEROES => IoOp::WriteZeroes,
        _ => return Err(-libc::EOPNOTSUPP),
    };
    Ok(IoRequest {
        op,
        offset: iod.start_sector << 9,
        len: iod.nr_sectors << 9,
        fua: iod.op_flags & sys::UBLK_IO_F_FUA != 0,
    })
}

/// Queue thread body: fetch requests, run them through the engine, commit
/// results, on one ring, until the device stops.
fn serve_queue(qid: u16, dev: &UblkDev, volume: Arc<VolumeIo>) {
    let _span = tracing::info_span!("volume", volume = %volume.name(), qid).entered();
    let bufs = dev.alloc_queue_io_bufs();
    let queue = match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(qid, error = %e, "ublk queue setup failed");
            return;
        }
    };
    let mut engine = QueueEngine::new(volume, qid, dev.dev_info.queue_depth);
    let commit = |q: &UblkQueue, tag: u16, res: i32| {
        let buf = bufs[tag as usize].as_slice();
        if let Err(e) =
            q.complete_io_cmd_unified(tag, BufDesc::Slice(buf), Ok(UblkIORes::Result(res)))
        {
            tracing::error!(qid, tag, error = %e, "committing ublk result");
        }
    };
    // Remote replicas answer on other threads; they post to the queue's
    // completion port and bump its eventfd. A read of that eventfd is kept
    // pending on this ring, so its completion wakes the queue thread out of
    // io_uring_enter. The 8-byte target must outlive the ring (leaked below).
    let port_buf: *mut u64 = Box::into_raw(Box::new(0u64));
    let port_fd = engine.port_fd();
    let arm_port = |q: &UblkQueue| {
        if let Some(fd) = port_fd {
            let sqe = io_uring::opcode::Read::new(io_uring::types::Fd(fd), port_buf.cast(), 8)
                .build()
                .user_data(UblkIOCtx::build_user_data(0, PORT_OP, 0, true));
            if let Err(e) = q.ublk_submit_sqe_sync(sqe) {
                tracing::error!(qid, error = %e, "arming the remote completion port");
            }
        }
    };
    arm_port(&queue);
    queue.wait_and_handle_io(|q, tag, ctx| {
        let mut sink = QueueSink { queue: q };
        let done = if ctx.is_tgt_io() {
            if UblkIOCtx::user_data_to_op(ctx.user_data()) == PORT_OP {
                engine.drain_remote(&mut sink, |tag, res| commit(q, tag, res));
                arm_port(q);
                if ctx.is_last_cqe() {
                    engine.poll_pause(&mut sink, |tag, res| commit(q, tag, res));
                    engine.flush_remote();
                }
                return;
            }
            let replica = ((ctx.user_data() >> 24) & 0xffff) as u8;
            engine.complete(tag, replica, ctx.result(), &mut sink)
        } else {
            match request_of(q.get_iod(tag)) {
                Ok(req) => engine.submit(tag, req, bufs[tag as usize].as_mut_ptr(), &mut sink),
                Err(errno) => Some(errno),
            }
        };
        if let Some(res) = done {
            commit(q, tag, res);
        }
        // Remote requests started while handling this batch of completions
        // go out together, before the queue thread waits again.
        if ctx.is_last_cqe() {
            engine.poll_pause(&mut sink, |tag, res| commit(q, tag, res));
            engine.flush_remote();
        }
    });
    if engine.in_flight() {
        // The queue stopped with replica I/O still owned by the kernel (or a
        // remote receiver); it may yet write into these buffers, so they
        // must outlive the ring.
        tracing::warn!(
            qid,
            "queue stopped with replica I/O in flight; leaking its buffers"
        );
        std::mem::forget(bufs);
    }
}

/// Op code (in the SQE user_data) of the completion-port eventfd read; data
/// legs use op 0.
const PORT_OP: u32 = 0x7f;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_features_bits() {
        let k = |ublk| KernelFeatures {
            release: "6.12.0".into(),
            ublk,
        };
        assert!(!k(None).online_resize());
        // 6.12: recovery + reissue + user copy, no UPDATE_SIZE.
        let f612 = (sys::UBLK_F_USER_RECOVERY
            | sys::UBLK_F_USER_RECOVERY_REISSUE
            | sys::UBLK_F_USER_COPY) as u64;
        assert!(!k(Some(f612)).online_resize());
        assert!(k(Some(f612)).user_recovery_reissue());
        assert!(k(Some(f612 | sys::UBLK_F_UPDATE_SIZE as u64)).online_resize());
        assert_eq!(sys::UBLK_F_UPDATE_SIZE, 1 << 10);
    }

    #[test]
    fn kernel_release_is_uname() {
        let r = kernel_release();
        assert!(!r.is_empty() && r != "unknown");
        assert_eq!(
            r,
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .expect("/proc/sys/kernel/osrelease")
                .trim()
        );
    }
}
