//! The replica server: serves this node's replicas to engines on other
//! nodes over TCP (`cairnd --replica-listen`).
//!
//! Threads: one accept thread; one thread per connection, which runs the
//! handshake and then executes requests in arrival order, answering each
//! (responses carry the request id, so the client may keep many requests in
//! flight — the connection is pipelined, not one-at-a-time). An engine opens
//! one connection per ublk queue per replica, so queues never share a
//! connection and the server runs them in parallel.
//!
//! A peer that fails the handshake, sends a malformed frame or a data op
//! before authenticating is logged and dropped; nothing it sends reaches a
//! replica, and other connections are unaffected.

use std::io::{self, IoSlice, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::auth::{ClusterSecret, ServerHandshake};
use super::wire::{
    encode_frame, encode_frame_head, FrameReader, Header, Op, WireError, FENCED_ERRNO,
};
use crate::disks::{disk_fits, disk_has_room, NodeDisks};
use crate::replica::{Replica, ReplicaError, Session};

/// How long a new connection may take to authenticate.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are refused (a flood must not exhaust
/// threads).
const MAX_CONNECTIONS: usize = 4096;

/// Buffered answers are written out at this size even mid-burst.
const FLUSH_AT: usize = 256 * 1024;

/// Counters a test or the metrics endpoint can read.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub accepted: AtomicU64,
    /// Connections dropped for failing the handshake or sending garbage.
    pub rejected: AtomicU64,
    pub requests: AtomicU64,
}

/// What a node's control plane answers for its peers: the volumes it owns
/// (reported with `NodeStatus`) and API calls forwarded to it, the owner
/// (`Op::Forward`). Installed once the control plane is up
/// ([`ReplicaServer::set_control`]); until then peers see no volumes and
/// forwarded calls are refused as unavailable.
pub trait PeerControl: Send + Sync {
    /// The volumes this node owns, with where their replicas are.
    fn placements(&self) -> Vec<super::wire::VolumePlacement>;
    /// Runs API method `method` (`cairn.v1.Cairn`'s RPC name) on the
    /// protobuf-encoded `request`: the gRPC code (0 = OK), the error
    /// message, and the encoded response.
    fn forward(&self, method: &str, request: &[u8]) -> (i32, String, Vec<u8>);
}

type ControlSlot = Arc<std::sync::OnceLock<Arc<dyn PeerControl>>>;

pub struct ReplicaServer {
    addr: SocketAddr,
    control: ControlSlot,
    stop: Arc<AtomicBool>,
    stats: Arc<ServerStats>,
    conns: Conns,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Open connections, so stopping the server closes them too.
type Conns = Arc<std::sync::Mutex<std::collections::HashMap<u64, TcpStream>>>;

impl ReplicaServer {
    /// Binds `listen` and starts serving `disks`' replicas, as this boot of
    /// this node (see [`boot_instance`]).
    pub fn start(
        listen: SocketAddr,
        secret: ClusterSecret,
        disks: Arc<NodeDisks>,
    ) -> io::Result<ReplicaServer> {
        Self::start_as(listen, secret, disks, boot_instance())
    }

    /// [`Self::start`] with an explicit instance name: tests stand a node's
    /// power loss in with a new one.
    pub fn start_as(
        listen: SocketAddr,
        secret: ClusterSecret,
        disks: Arc<NodeDisks>,
        instance: String,
    ) -> io::Result<ReplicaServer> {
        let instance: Arc<str> = instance.into();
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ServerStats::default());
        let conns: Conns = Arc::default();
        let control: ControlSlot = Arc::default();
        let (stop2, stats2, conns2) = (stop.clone(), stats.clone(), conns.clone());
        let served = Served {
            disks,
            instance,
            control: control.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("replica-accept".into())
            .spawn(move || accept_loop(listener, secret, served, stop2, stats2, conns2))?;
        tracing::info!(%addr, "replica server listening");
        Ok(ReplicaServer {
            addr,
            control,
            stop,
            stats,
            conns,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Installs the control plane's side of the peer protocol (once).
    pub fn set_control(&self, control: Arc<dyn PeerControl>) {
        let _ = self.control.set(control);
    }

    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept thread with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for (_, c) in self.conns.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// This node's boot: what a replica's unflushed writes live through. Read
/// from the kernel's boot id; a replica server started after a reboot (or a
/// power loss) has a new one, and an engine must not trust that replica's
/// dirty map alone (see `VolumeIo::start_rebuild`).
pub fn boot_instance() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// What every connection serves: this node's replicas, as this boot, and
/// its control plane.
#[derive(Clone)]
struct Served {
    disks: Arc<NodeDisks>,
    instance: Arc<str>,
    control: ControlSlot,
}

fn accept_loop(
    listener: TcpListener,
    secret: ClusterSecret,
    served: Served,
    stop: Arc<AtomicBool>,
    stats: Arc<ServerStats>,
    conns: Conns,
) {
    let live = Arc::new(AtomicUsize::new(0));
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a replica connection");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        if live.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            live.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%peer, "too many replica connections; refusing");
            continue;
        }
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        next_id += 1;
        let id = next_id;
        if let Ok(c) = stream.try_clone() {
            conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, c);
        }
        let (secret, served, stats, live, conns) = (
            secret.clone(),
            served.clone(),
            stats.clone(),
            live.clone(),
            conns.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("replica-conn".into())
            .spawn(move || {
                match serve(stream, &secret, &served, &stats) {
                    Ok(()) => tracing::debug!(%peer, "replica connection closed"),
                    Err(ConnError::Rejected(reason)) => {
                        stats.rejected.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%peer, %reason, "replica connection rejected");
                    }
                    Err(ConnError::Io(e)) => {
                        tracing::info!(%peer, error = %e, "replica connection ended")
                    }
                }
                conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                live.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a replica connection thread");
        }
    }
}

enum ConnError {
    /// The peer is not a Cairn node holding the secret, or broke the protocol.
    Rejected(String),
    /// The connection failed under a legitimate peer.
    Io(io::Error),
}

impl From<WireError> for ConnError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Io(e) => ConnError::Io(e),
            other => ConnError::Rejected(other.to_string()),
        }
    }
}

impl From<io::Error> for ConnError {
    fn from(e: io::Error) -> Self {
        ConnError::Io(e)
    }
}

/// Sends one frame: header and payload with one vectored write.
pub(crate) fn send_frame(
    w: &mut impl Write,
    buf: &mut Vec<u8>,
    header: &Header,
    payload: &[u8],
) -> Result<(), WireError> {
    buf.clear();
    encode_frame_head(buf, header, payload)?;
    let mut slices = [IoSlice::new(buf), IoSlice::new(payload)];
    let mut slices: &mut [IoSlice<'_>] = &mut slices;
    while !slices.is_empty() && slices.iter().any(|s| !s.is_empty()) {
        match w.write_vectored(slices) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sets TCP options both ends of a replica connection use: no Nagle delay
/// (requests are latency-bound), and keepalive so a peer that vanished
/// (power off, partition) does not pin a thread forever.
pub(crate) fn tune_socket(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let fd = std::os::fd::AsRawFd::as_raw_fd(s);
    let set = |level, name, val: libc::c_int| {
        // SAFETY: setsockopt with a pointer to a live c_int of the right size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as _,
            )
        };
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
}

fn serve(
    stream: TcpStream,
    secret: &ClusterSecret,
    served: &Served,
    stats: &ServerStats,
) -> Result<(), ConnError> {
    tune_socket(&stream);
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut w = stream.try_clone()?;
    let mut reader = FrameReader::new(stream);
    let mut out = Vec::with_capacity(256);

    // Handshake: nothing but Hello, then Proof, is accepted.
    let Some((hello, _)) = reader.next_frame()? else {
        return Ok(());
    };
    let (hs, challenge) = ServerHandshake::on_hello(secret, &hello.op)
        .map_err(|e| ConnError::Rejected(e.to_string()))?;
    send_frame(
        &mut w,
        &mut out,
        &Header {
            request_id: hello.request_id,
            op: challenge,
        },
        &[],
    )?;
    let Some((proof, _)) = reader.next_frame()? else {
        return Err(ConnError::Rejected(format!(
            "node {:?} closed the connection during the handshake (it rejected our proof: its cluster secret differs)",
            hs.node
        )));
    };
    if let Err(e) = hs.on_proof(secret, &proof.op) {
        // Tell an honest peer with the wrong secret why, then drop it.
        let _ = send_frame(
            &mut w,
            &mut out,
            &Header {
                request_id: proof.request_id,
                op: Op::Error {
                    errno: libc::EACCES,
                    message: e.to_string(),
                },
            },
            &[],
        );
        return Err(ConnError::Rejected(format!("node {:?}: {e}", hs.node)));
    }
    send_frame(
        &mut w,
        &mut out,
        &Header {
            request_id: proof.request_id,
            op: Op::Ok,
        },
        &[],
    )?;
    w.set_read_timeout(None)?;
    tracing::debug!(node = %hs.node, "replica peer authenticated");

    let mut conn = Conn {
        bound: None,
        stream: w.try_clone()?,
        instance: &served.instance,
        control: served.control.get(),
    };
    let mut data: Vec<u8> = Vec::new();
    out.clear();
    loop {
        let Some((header, payload)) = reader.next_frame()? else {
            return Ok(());
        };
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let (op, reply_data) = handle(&served.disks, &mut conn, header.op, payload, &mut data);
        let body: &[u8] = if reply_data { &data } else { &[] };
        encode_frame(
            &mut out,
            &Header {
                request_id: header.request_id,
                op,
            },
            body,
        )?;
        // Answers to a burst of pipelined requests go out in one write:
        // flush only when no further request is already buffered.
        if !reader.frame_buffered() || out.len() >= FLUSH_AT {
            w.write_all(&out)?;
            out.clear();
        }
    }
}

fn io_err(e: io::Error) -> Op {
    Op::Error {
        errno: e.raw_os_error().unwrap_or(libc::EIO),
        message: e.to_string(),
    }
}

fn fenced(session: &Session) -> Op {
    Op::Error {
        errno: FENCED_ERRNO,
        message: format!(
            "owner session {} was fenced: another engine claimed this replica",
            session.generation()
        ),
    }
}

fn replica_err(e: ReplicaError) -> Op {
    let errno = match &e {
        ReplicaError::Fence(_) => FENCED_ERRNO,
        ReplicaError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        _ => libc::EIO,
    };
    Op::Error {
        errno,
        message: e.to_string(),
    }
}

/// What one connection is bound to.
struct Conn<'a> {
    /// The replica and the owner session `Open` claimed or joined.
    bound: Option<(Arc<Replica>, Arc<Session>)>,
    /// This connection's socket, shut when its session is fenced.
    stream: TcpStream,
    instance: &'a str,
    control: Option<&'a Arc<dyn PeerControl>>,
}

fn not_bound() -> Op {
    Op::Error {
        errno: libc::EBADF,
        message: "no replica opened on this connection: send Open first".into(),
    }
}

/// Executes one request. Returns the response op, and whether `data` is its
/// payload.
fn handle(
    disks: &NodeDisks,
    conn: &mut Conn<'_>,
    op: Op,
    payload: &[u8],
    data: &mut Vec<u8>,
) -> (Op, bool) {
    let done = |r: io::Result<()>| (r.map_or_else(io_err, |()| Op::Ok), false);
    match op {
        Op::Ping => (Op::Pong, false),
        Op::NodeStatus => {
            let mut report = disks.report();
            if let Some(c) = conn.control {
                report.placements = c.placements();
            }
            (Op::Node { report }, false)
        }
        Op::Forward { method } => match conn.control {
            Some(c) => {
                let (code, message, response) = c.forward(&method, payload);
                *data = response;
                (Op::Forwarded { code, message }, true)
            }
            None => (
                Op::Forwarded {
                    // gRPC UNAVAILABLE: the peer's control plane is starting.
                    code: 14,
                    message: "the node's control plane is not up yet: try again".into(),
                },
                false,
            ),
        },
        Op::ListReplicas => (
            Op::Replicas {
                replicas: disks.list(),
            },
            false,
        ),
        Op::Open {
            volume,
            replica,
            claim,
        } => match disks.open(&volume, &replica) {
            Ok(r) => {
                // A connection binds once: a second Open ends its session.
                if let Some((_, old)) = conn.bound.take() {
                    old.release();
                }
                let observer = matches!(claim, crate::replica::Claim::Observe);
                let session = match r.claim(claim) {
                    Ok(s) => s,
                    Err(e) => return (replica_err(e), false),
                };
                // Fenced by a newer claim: close this connection at once,
                // so nothing it still has buffered or in the network is read.
                if let (false, Ok(sock)) = (observer, conn.stream.try_clone()) {
                    session.set_on_fence(Box::new(move || {
                        let _ = sock.shutdown(std::net::Shutdown::Both);
                    }));
                }
                let reply = Op::Opened {
                    size: r.size(),
                    revision: r.revision(),
                    generation: session.generation(),
                    instance: conn.instance.to_string(),
                };
                conn.bound = Some((r, session));
                (reply, false)
            }
            Err(e) => (
                Op::Error {
                    errno: e.errno(),
                    message: e.to_string(),
                },
                false,
            ),
        },
        Op::CreateReplica {
            volume,
            replica,
            size,
            over_provisioning,
            min_available,
            replaces,
        } => {
            let replaces = (!replaces.is_empty()).then_some(replaces.as_str());
            match disks.create(&volume, &replica, size, replaces, |d| {
                disk_fits(d, size, over_provisioning, min_available)
            }) {
                Ok((disk, dir)) => (
                    Op::Created {
                        disk: disk.display().to_string(),
                        dir: dir.display().to_string(),
                    },
                    false,
                ),
                Err(e) => (
                    Op::Error {
                        errno: e.errno(),
                        message: e.to_string(),
                    },
                    false,
                ),
            }
        }
        Op::ExpandReplica {
            replica,
            size,
            over_provisioning,
            min_available,
            step,
        } => match disks.expand(&replica, size, step, |d, by| {
            disk_has_room(d, by, over_provisioning, min_available)
        }) {
            Ok(()) => (Op::Ok, false),
            Err(e) => (
                Op::Error {
                    errno: e.errno(),
                    message: e.to_string(),
                },
                false,
            ),
        },
        Op::DeleteReplica { replica } => match disks.delete(&replica) {
            Ok(()) => (Op::Ok, false),
            Err(e) => (
                Op::Error {
                    errno: e.errno(),
                    message: e.to_string(),
                },
                false,
            ),
        },
        op => {
            let Some((r, session)) = conn.bound.as_ref() else {
                return (not_bound(), false);
            };
            // Everything that reads or changes the replica's data or
            // metadata runs admitted by the session, or not at all.
            let _admitted = match op {
                Op::Read { .. }
                | Op::Write { .. }
                | Op::Flush
                | Op::Discard { .. }
                | Op::WriteZeroes { .. }
                | Op::SetRevision { .. }
                | Op::ChangeChain { .. } => match session.enter() {
                    Some(a) => Some(a),
                    None => return (fenced(session), false),
                },
                _ => None,
            };
            match op {
                Op::Read { offset, len } => {
                    if len as usize > super::MAX_PAYLOAD {
                        return (
                            Op::Error {
                                errno: libc::EINVAL,
                                message: "read too large".into(),
                            },
                            false,
                        );
                    }
                    data.resize(len as usize, 0);
                    match r.read_at(offset, data) {
                        Ok(()) => (Op::Data, true),
                        Err(e) => (io_err(e), false),
                    }
                }
                Op::Write { offset, fua } => {
                    fail::fail_point!("server::write::before", |_| (
                        Op::Error {
                            errno: libc::EIO,
                            message: "failpoint server::write::before".into()
                        },
                        false
                    ));
                    let res = r.write_at(offset, payload, fua);
                    fail::fail_point!("server::write::after");
                    done(res)
                }
                Op::Flush => done(r.flush()),
                Op::Discard { offset, len } => done(r.discard(offset, len as u64)),
                Op::WriteZeroes { offset, len } => done(r.write_zeroes(offset, len as u64)),
                Op::GetRevision => (
                    Op::Revision {
                        revision: r.revision(),
                    },
                    false,
                ),
                Op::SetRevision { revision } => match r.set_revision(revision) {
                    Ok(()) => {
                        // Applied, but the answer is lost: the ambiguous case.
                        fail::fail_point!("server::set_revision::after_persist", |_| (
                            Op::Error {
                                errno: libc::EIO,
                                message: "failpoint server::set_revision::after_persist".into()
                            },
                            false
                        ));
                        (Op::Ok, false)
                    }
                    Err(e) => (
                        Op::Error {
                            errno: libc::EIO,
                            message: e.to_string(),
                        },
                        false,
                    ),
                },
                Op::ListLayers => (Op::Layers { layers: r.chain() }, false),
                Op::ChangeChain { change } => match r.change_chain(&change) {
                    Ok(o) => (
                        Op::ChainChanged {
                            names: o.names,
                            coalesced: o.coalesced,
                        },
                        false,
                    ),
                    Err(e) => (
                        Op::Error {
                            errno: libc::EIO,
                            message: e.to_string(),
                        },
                        false,
                    ),
                },
                Op::ListAllocated => (
                    Op::Extents {
                        extents: r.allocated_ranges(),
                    },
                    false,
                ),
                Op::ListExtents { layer } => match r.layer_data(&layer) {
                    Ok(extents) => (Op::Extents { extents }, false),
                    Err(e) => (
                        Op::Error {
                            errno: libc::ENOENT,
                            message: e.to_string(),
                        },
                        false,
                    ),
                },
                Op::ReadLayer { layer, offset, len } => {
                    if len as usize > super::MAX_PAYLOAD {
                        return (
                            Op::Error {
                                errno: libc::EINVAL,
                                message: "read too large".into(),
                            },
                            false,
                        );
                    }
                    data.resize(len as usize, 0);
                    match r.read_layer(&layer, offset, data) {
                        Ok(()) => (Op::Data, true),
                        Err(e) => (io_err(e), false),
                    }
                }
                other => (
                    Op::Error {
                        errno: libc::EPROTO,
                        message: format!("unexpected {other:?} from a client"),
                    },
                    false,
                ),
            }
        }
    }
}
