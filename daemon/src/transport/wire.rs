//! The frame codec: [`Header`]/[`Op`] types, [`encode_frame`] /
//! [`encode_frame_head`] into a caller's buffer, [`decode_frame`] returning a
//! borrowed payload, and [`FrameReader`] for a blocking byte stream.
//!
//! Nothing here allocates per frame on the data path: encoding appends to a
//! buffer the caller reuses; decoding borrows the payload from the input and
//! only the header (a few bytes for data ops) is materialised. A length read
//! from the wire is checked against [`MAX_HEADER`] / [`MAX_PAYLOAD`] before any
//! byte beyond the prefix is looked at, so a hostile peer cannot make us
//! allocate more than those bounds (and [`FrameReader`] grows its buffer only
//! as bytes actually arrive).

use std::io::{self, Read};

use bincode::{Decode, Encode};

use crate::disks::GrowStep;
use crate::replica::{ChainChange, Claim, LayerInfo};

/// The four bytes every frame starts with: ASCII `CRN2` (the `2` is the
/// protocol version; an incompatible change takes a new magic). Version 2
/// added owner sessions (fencing) to `Open`/`Opened`.
pub const MAGIC: [u8; 4] = *b"CRN2";

/// Bytes of the fixed prefix: magic, header_len, flags, payload_len, crc32c.
pub const PREFIX_LEN: usize = 16;

/// Largest encoded header: what the `u16` header_len field can say (64 KiB − 1).
pub const MAX_HEADER: usize = u16::MAX as usize;

/// Largest payload: 8 MiB, well above the largest ublk request (the data of
/// one request travels in one frame).
pub const MAX_PAYLOAD: usize = 8 << 20;

/// Bound on what decoding one header may allocate. bincode sizes a `Vec` or
/// `String` from a length read off the wire; without a limit a 10-byte header
/// claiming a 2^60-byte string would abort the process. bincode counts
/// in-memory bytes (8 per `u64` even when varint-encoded in 1 byte, a
/// container's `len × size_of::<T>()` up front), so the bound must sit above
/// what a legitimate header of [`MAX_HEADER`] bytes expands to: about 8× for
/// lists of integers, more for a long `Vec<LayerInfo>` of near-empty layers.
const HEADER_DECODE_LIMIT: usize = 4 << 20;

/// No flag is defined yet. Unknown flags are rejected rather than ignored so
/// that a future flag that changes the meaning of a frame (compression, say)
/// can never be silently misread by an old peer.
const KNOWN_FLAGS: u16 = 0;

/// bincode 2 standard config: little-endian, **varint** integers. Varint
/// because the only headers that approach [`MAX_HEADER`] are lists (extents,
/// layers) of mostly small numbers, which it packs 2–4× tighter; data-op
/// headers are ~10 bytes either way, and per-frame cost is dominated by the
/// CRC over the payload and the syscall, not by a few varint branches.
fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_variable_int_encoding()
        .with_limit::<HEADER_DECODE_LIMIT>()
}

/// Codec failures. All are fatal for the connection: after one, the stream
/// position of the next frame is unknown.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("bad frame magic (not a Cairn replica peer, or stream out of sync)")]
    BadMagic,
    #[error("frame header of {0} bytes exceeds the {MAX_HEADER}-byte limit")]
    HeaderTooLarge(usize),
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLarge(usize),
    #[error("frame checksum mismatch: frame says {expected:#010x}, data gives {found:#010x}")]
    Checksum { expected: u32, found: u32 },
    #[error("frame has unknown flags {0:#06x}")]
    UnknownFlags(u16),
    #[error("bad frame header: {0}")]
    Decode(String),
    #[error("cannot encode frame header: {0}")]
    Encode(String),
    #[error("replica connection: {0}")]
    Io(#[from] io::Error),
}

/// One frame's header. `request_id` pairs a response with its request; the
/// requester picks it (the engine will use tag and replica slot) and the
/// responder echoes it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Header {
    pub request_id: u64,
    pub op: Op,
}

/// Every request and response. Offsets and lengths are bytes. Data travels in
/// the frame's payload, never in the header: `Write` carries the data to
/// write, `Data` the bytes read; every other op has an empty payload.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Op {
    // Handshake (see `transport::auth`).
    /// Client → server: who I am and my nonce.
    Hello {
        node: String,
        nonce: [u8; 32],
    },
    /// Server → client: my nonce and my proof over both nonces.
    Challenge {
        nonce: [u8; 32],
        proof: [u8; 32],
    },
    /// Client → server: my proof over both nonces.
    Proof {
        proof: [u8; 32],
    },

    // Requests.
    Read {
        offset: u64,
        len: u32,
    },
    /// The payload is the data; `fua` asks for it to be durable on completion.
    Write {
        offset: u64,
        fua: bool,
    },
    Flush,
    Discard {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
    },
    GetRevision,
    SetRevision {
        revision: u64,
    },
    ListLayers,
    /// Allocated ranges of one layer (file name as in [`LayerInfo::file`];
    /// empty = the head). Answered with `Extents`.
    ListExtents {
        layer: String,
    },
    Ping,

    // Responses.
    Ok,
    /// The payload is the data read.
    Data,
    Revision {
        revision: u64,
    },
    Layers {
        layers: Vec<LayerInfo>,
    },
    /// `(offset, len)` pairs in bytes, sorted by offset, not overlapping.
    Extents {
        extents: Vec<(u64, u64)>,
    },
    Pong,
    /// `errno` is positive (`libc::EIO`, …): the engine completes the ublk
    /// request with its negation, as for a local replica.
    Error {
        errno: i32,
        message: String,
    },

    // Node and replica management (the owner's control plane → a peer).
    /// Binds this connection to one replica and an owner session of it
    /// (`claim`, see `replica::fence`): every data op after it is on that
    /// replica, admitted only while the session is the current one. A
    /// refused claim or a fenced op is answered `Error { errno: ESTALE }`
    /// ([`FENCED_ERRNO`]). Answered with `Opened`.
    Open {
        volume: String,
        replica: String,
        claim: Claim,
    },
    /// `generation` is the session's owner generation; `instance` names the
    /// serving node's boot (its page cache): a replica whose instance
    /// changed may have lost writes it acknowledged but had not flushed.
    Opened {
        size: u64,
        revision: u64,
        generation: u64,
        instance: String,
    },
    /// The node's name and disks. Answered with `Node`.
    NodeStatus,
    Node {
        report: NodeReport,
    },
    /// Makes an empty replica on the least-loaded schedulable disk. Answered
    /// with `Created`.
    /// `over_provisioning` and `min_available` are the owner's placement
    /// settings (percent), applied to this node's disks.
    /// `replaces` names the replica this one replaces (it may share its
    /// disk); empty for a new volume.
    CreateReplica {
        volume: String,
        replica: String,
        size: u64,
        over_provisioning: u32,
        min_available: u32,
        replaces: String,
    },
    Created {
        disk: String,
        dir: String,
    },
    /// Removes a replica's directory (a replica open elsewhere is refused).
    DeleteReplica {
        replica: String,
    },
    /// Every replica on the node, for adoption. Answered with `Replicas`.
    ListReplicas,
    Replicas {
        replicas: Vec<ReplicaReport>,
    },
    /// Ranges where any layer of the bound replica holds data (what a full
    /// rebuild copies). Answered with `Extents`.
    ListAllocated,
    /// Changes the bound replica's layer chain (the owner has quiesced the
    /// volume's I/O). Answered with `ChainChanged`.
    ChangeChain {
        change: ChainChange,
    },
    /// Snapshot names the change dropped or merged away, and whether a
    /// removal merged the snapshot's data into its child.
    ChainChanged {
        names: Vec<String>,
        coalesced: bool,
    },
    /// Reads one layer file's own bytes (`layer` empty = the head): a
    /// rebuild copying the chain layer by layer. Answered with `Data`.
    ReadLayer {
        layer: String,
        offset: u64,
        len: u32,
    },
    /// Grows a replica (of a detached volume) to `size` bytes, if its disk
    /// takes the growth under the owner's placement rules (percent), or
    /// only checks that it would (`step`). Answered with `Ok`.
    ExpandReplica {
        replica: String,
        size: u64,
        over_provisioning: u32,
        min_available: u32,
        step: GrowStep,
    },
    /// An API call for a volume this node owns, from a node that does not:
    /// `method` is the `cairn.v1.Cairn` RPC name, the payload its encoded
    /// request. Answered with `Forwarded`.
    Forward {
        method: String,
    },
    /// `code` is the gRPC status code (0 = OK) and `message` its text; the
    /// payload is the encoded response when OK.
    Forwarded {
        code: i32,
        message: String,
    },
}

/// The errno of every fencing refusal: the request came from an owner
/// session that is no longer the replica's current one (or a claim lost).
/// Never produced by replica file I/O, so it is unambiguous.
pub const FENCED_ERRNO: i32 = libc::ESTALE;

/// One node as it describes itself.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct NodeReport {
    pub node: String,
    pub disks: Vec<DiskReport>,
    /// The volumes this node owns (their records are here): where each
    /// one's replicas are, and its owner term. What a peer needs to route
    /// a call to the owner, and to take a volume over if this node dies
    /// (its replicas here are then known, and rebuilt when it is back).
    pub placements: Vec<VolumePlacement>,
}

impl NodeReport {
    /// Whether this node owns volume `name`.
    pub fn owns(&self, name: &str) -> bool {
        self.placements.iter().any(|p| p.volume == name)
    }

    /// The names of the volumes this node owns.
    pub fn volume_names(&self) -> Vec<String> {
        self.placements.iter().map(|p| p.volume.clone()).collect()
    }
}

/// One owned volume's replicas, as its owner last described them.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct VolumePlacement {
    pub volume: String,
    pub owner_term: u64,
    pub size: u64,
    pub replicas: Vec<ReplicaPlace>,
}

/// A replica's name and the node that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ReplicaPlace {
    pub replica: String,
    pub node: String,
}

/// One disk of a node: filesystem size and free space, and the bytes of
/// volume size its replicas promise (Longhorn's Size / Used / Allocated).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DiskReport {
    pub path: String,
    pub size: u64,
    pub available: u64,
    pub allocated: u64,
    pub replicas: u32,
    /// New replicas may go here: neither the node nor this disk is marked
    /// unschedulable (`cairnctl node scheduling`).
    pub schedulable: bool,
}

/// One replica as its node describes it (enough to re-adopt the volume).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ReplicaReport {
    pub volume: String,
    pub replica: String,
    pub size: u64,
    pub revision: u64,
    pub disk: String,
    pub dir: String,
    /// Why the replica cannot be opened; empty when it can.
    pub error: String,
    /// The owner term of the last takeover claim (`replica::OwnerTerm`).
    pub owner_term: u64,
}

/// Result of [`decode_frame`].
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// `bytes` holds no complete frame yet: it must grow to at least `need`
    /// bytes in total (counted from the start of `bytes`, not in addition)
    /// before decoding can make progress. `need` never exceeds
    /// `PREFIX_LEN + MAX_HEADER + MAX_PAYLOAD`.
    Incomplete { need: usize },
    /// One frame; `payload` borrows from the input; the next frame starts at
    /// `bytes[consumed..]`.
    Frame {
        header: Header,
        payload: &'a [u8],
        consumed: usize,
    },
}

/// Appends one complete frame (prefix, header, payload) to `buf`, reusing its
/// capacity. On error `buf` is left as it was.
pub fn encode_frame(buf: &mut Vec<u8>, header: &Header, payload: &[u8]) -> Result<(), WireError> {
    encode_frame_head(buf, header, payload)?;
    buf.extend_from_slice(payload);
    Ok(())
}

/// Appends the prefix and header of a frame carrying `payload`, but not the
/// payload itself: the caller sends `[buf, payload]` with one `writev` and
/// the write data is never copied. The checksum covers `payload`, so it must
/// not change before it is sent. On error `buf` is left as it was.
pub fn encode_frame_head(
    buf: &mut Vec<u8>,
    header: &Header,
    payload: &[u8],
) -> Result<(), WireError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(WireError::PayloadTooLarge(payload.len()));
    }
    let start = buf.len();
    buf.resize(start + PREFIX_LEN, 0);
    // Encoding straight into the Vec (io::Write appends) avoids a scratch buffer.
    let header_len = match bincode::encode_into_std_write(header, buf, config()) {
        Ok(n) => n,
        Err(e) => {
            buf.truncate(start);
            return Err(WireError::Encode(e.to_string()));
        }
    };
    let Ok(header_len16) = u16::try_from(header_len) else {
        buf.truncate(start);
        return Err(WireError::HeaderTooLarge(header_len));
    };
    let header_bytes = &buf[start + PREFIX_LEN..];
    let crc = crc32c::crc32c_append(crc32c::crc32c(header_bytes), payload);
    // Lossless: payload.len() <= MAX_PAYLOAD < u32::MAX, checked above.
    let payload_len = payload.len() as u32;
    let prefix = &mut buf[start..start + PREFIX_LEN];
    prefix[0..4].copy_from_slice(&MAGIC);
    prefix[4..6].copy_from_slice(&header_len16.to_le_bytes());
    prefix[6..8].copy_from_slice(&0u16.to_le_bytes());
    prefix[8..12].copy_from_slice(&payload_len.to_le_bytes());
    prefix[12..16].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The validated fixed prefix.
struct Prefix {
    header_len: usize,
    payload_len: usize,
    crc: u32,
}

impl Prefix {
    fn frame_len(&self) -> usize {
        PREFIX_LEN + self.header_len + self.payload_len
    }
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses and checks the prefix. `Ok(None)`: fewer than [`PREFIX_LEN`] bytes,
/// none of them wrong so far.
fn parse_prefix(bytes: &[u8]) -> Result<Option<Prefix>, WireError> {
    // Checking a partial magic makes a garbage stream fail on its first byte
    // instead of after we waited for a whole prefix.
    let m = bytes.len().min(MAGIC.len());
    if bytes[..m] != MAGIC[..m] {
        return Err(WireError::BadMagic);
    }
    if bytes.len() < PREFIX_LEN {
        return Ok(None);
    }
    let header_len = usize::from(le_u16(bytes, 4));
    let flags = le_u16(bytes, 6);
    let payload_len = le_u32(bytes, 8) as usize;
    let crc = le_u32(bytes, 12);
    if flags & !KNOWN_FLAGS != 0 {
        return Err(WireError::UnknownFlags(flags));
    }
    if header_len == 0 {
        // Every header holds at least a request id and an op tag.
        return Err(WireError::Decode("empty header".into()));
    }
    // header_len cannot exceed MAX_HEADER: the u16 field is the bound.
    if payload_len > MAX_PAYLOAD {
        return Err(WireError::PayloadTooLarge(payload_len));
    }
    Ok(Some(Prefix {
        header_len,
        payload_len,
        crc,
    }))
}

/// Decodes the frame at the start of `bytes`. Malformed input is an error,
/// never a panic; nothing is allocated beyond the decoded header.
pub fn decode_frame(bytes: &[u8]) -> Result<Decoded<'_>, WireError> {
    let Some(prefix) = parse_prefix(bytes)? else {
        return Ok(Decoded::Incomplete { need: PREFIX_LEN });
    };
    let total = prefix.frame_len();
    if bytes.len() < total {
        return Ok(Decoded::Incomplete { need: total });
    }
    let header_bytes = &bytes[PREFIX_LEN..PREFIX_LEN + prefix.header_len];
    let payload = &bytes[PREFIX_LEN + prefix.header_len..total];
    // The checksum is checked before the header is decoded: corrupt bytes
    // never reach bincode (and never size an allocation).
    let found = crc32c::crc32c_append(crc32c::crc32c(header_bytes), payload);
    if found != prefix.crc {
        return Err(WireError::Checksum {
            expected: prefix.crc,
            found,
        });
    }
    let (header, used): (Header, usize) = bincode::decode_from_slice(header_bytes, config())
        .map_err(|e| WireError::Decode(e.to_string()))?;
    if used != header_bytes.len() {
        // One encoding per header: trailing bytes mean a peer that disagrees
        // with us about the format.
        return Err(WireError::Decode(format!(
            "{} trailing bytes after the header",
            header_bytes.len() - used
        )));
    }
    Ok(Decoded::Frame {
        header,
        payload,
        consumed: total,
    })
}

/// Total bytes the frame at the start of `bytes` needs, as far as can be told
/// yet: [`PREFIX_LEN`] until the prefix is in, then the whole frame's length.
fn frame_need(bytes: &[u8]) -> Result<usize, WireError> {
    Ok(match parse_prefix(bytes)? {
        None => PREFIX_LEN,
        Some(p) => p.frame_len(),
    })
}

/// Reads frames from a blocking byte stream with one reusable buffer.
///
/// The buffer starts at [`FrameReader::INITIAL_CAPACITY`] and grows (at most
/// doubling) only when it is full and a frame needs more, so its size stays
/// within about twice the bytes the peer actually sent, whatever length a
/// prefix announces. It never shrinks: a connection that carried one large
/// write keeps room for the next.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// `buf[start..end]` holds bytes read but not yet returned as frames.
    start: usize,
    end: usize,
}

impl<R: Read> FrameReader<R> {
    pub const INITIAL_CAPACITY: usize = 64 * 1024;

    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: vec![0; Self::INITIAL_CAPACITY],
            start: 0,
            end: 0,
        }
    }

    /// The next frame; `Ok(None)` at a clean end of stream (between frames).
    /// The payload borrows the reader's buffer until the next call.
    pub fn next_frame(&mut self) -> Result<Option<(Header, &[u8])>, WireError> {
        loop {
            let need = frame_need(&self.buf[self.start..self.end])?;
            if self.end - self.start >= need {
                break;
            }
            if self.start > 0 && self.start + need > self.buf.len() {
                // Move the partial frame to the front to make room behind it.
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                // Full and the frame needs more: grow, at most doubling, so
                // the buffer tracks bytes received rather than the length a
                // prefix claims. `need` is bounded by parse_prefix's limits.
                let grown = need.min(self.buf.len().saturating_mul(2));
                self.buf.resize(grown, 0);
            }
            let n = match self.inner.read(&mut self.buf[self.end..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                if self.start == self.end {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-frame",
                )
                .into());
            }
            self.end += n;
        }
        let at = self.start;
        let Decoded::Frame {
            header,
            payload,
            consumed,
        } = decode_frame(&self.buf[at..self.end])?
        else {
            // Unreachable: frame_need said the whole frame is buffered.
            return Err(WireError::Decode("frame incomplete after buffering".into()));
        };
        // The payload is the frame's tail; recompute its range so the borrow
        // of `buf` can be handed out after `start` moves.
        let payload_range = at + consumed - payload.len()..at + consumed;
        self.start += consumed;
        if self.start == self.end {
            // Buffer drained: the next frame starts at the front (no copy).
            self.start = 0;
            self.end = 0;
        }
        Ok(Some((header, &self.buf[payload_range])))
    }

    /// True when a whole frame (or a malformed prefix, which the next call
    /// reports) is already buffered: `next_frame` will not block. Lets a
    /// server answer a burst of pipelined requests with one write.
    pub fn frame_buffered(&self) -> bool {
        match frame_need(&self.buf[self.start..self.end]) {
            Ok(need) => self.end - self.start >= need,
            Err(_) => true,
        }
    }

    /// Bytes currently allocated for the read buffer (tests check the growth bound).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.len()
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// One value of every `Op` variant. The match below fails to compile when
    /// a variant is added and not listed here.
    fn every_op() -> Vec<Op> {
        let mut labels = BTreeMap::new();
        labels.insert("k".to_owned(), "v".to_owned());
        let ops = vec![
            Op::Hello {
                node: "node-a".into(),
                nonce: [1; 32],
            },
            Op::Challenge {
                nonce: [2; 32],
                proof: [3; 32],
            },
            Op::Proof { proof: [4; 32] },
            Op::Read {
                offset: 4096,
                len: 131072,
            },
            Op::Write {
                offset: u64::MAX - 4095,
                fua: true,
            },
            Op::Flush,
            Op::Discard {
                offset: 1 << 40,
                len: u32::MAX,
            },
            Op::WriteZeroes {
                offset: 0,
                len: 4096,
            },
            Op::GetRevision,
            Op::SetRevision { revision: 7 },
            Op::ListLayers,
            Op::ListExtents {
                layer: "volume-head-002.img".into(),
            },
            Op::Ping,
            Op::Ok,
            Op::Data,
            Op::Revision { revision: u64::MAX },
            Op::Layers {
                layers: vec![LayerInfo {
                    file: "volume-snap-a.img".into(),
                    name: "volume-snap-a.img".into(),
                    snapshot: Some("a".into()),
                    parent: String::new(),
                    created: "2026-01-01T00:00:00Z".into(),
                    user_created: true,
                    removed: false,
                    labels,
                    allocated: 8192,
                    is_head: false,
                }],
            },
            Op::Extents {
                extents: vec![(0, 4096), (1 << 30, 1 << 20)],
            },
            Op::Pong,
            Op::Error {
                errno: libc::EIO,
                message: "disk gone".into(),
            },
            Op::Open {
                volume: "v".into(),
                replica: "v-r-0000abcd".into(),
                claim: Claim::Renew { expect: 4 },
            },
            Op::Opened {
                size: 1 << 30,
                revision: 9,
                generation: 5,
                instance: "8a1f".into(),
            },
            Op::NodeStatus,
            Op::Node {
                report: NodeReport {
                    node: "n1".into(),
                    disks: vec![DiskReport {
                        path: "/d".into(),
                        size: 10,
                        available: 5,
                        allocated: 4,
                        replicas: 1,
                        schedulable: true,
                    }],
                    placements: vec![VolumePlacement {
                        volume: "db".into(),
                        owner_term: 3,
                        size: 4096,
                        replicas: vec![ReplicaPlace {
                            replica: "db-r-1".into(),
                            node: "n2".into(),
                        }],
                    }],
                },
            },
            Op::Forward {
                method: "GetVolume".into(),
            },
            Op::ExpandReplica {
                replica: "v-r-1".into(),
                size: 1 << 30,
                over_provisioning: 100,
                min_available: 25,
                step: GrowStep::CheckLive,
            },
            Op::Forwarded {
                code: 5,
                message: "volume \"db\" not found".into(),
            },
            Op::CreateReplica {
                volume: "v".into(),
                replica: "v-r-1".into(),
                size: 4096,
                over_provisioning: 100,
                min_available: 25,
                replaces: "v-r-0".into(),
            },
            Op::Created {
                disk: "/d".into(),
                dir: "/d/replicas/v-r-1".into(),
            },
            Op::DeleteReplica {
                replica: "v-r-1".into(),
            },
            Op::ListReplicas,
            Op::Replicas {
                replicas: vec![ReplicaReport {
                    volume: "v".into(),
                    replica: "v-r-1".into(),
                    size: 4096,
                    revision: 3,
                    disk: "/d".into(),
                    dir: "/d/replicas/v-r-1".into(),
                    error: String::new(),
                    owner_term: 2,
                }],
            },
            Op::ListAllocated,
            Op::ChangeChain {
                change: ChainChange::Snapshot {
                    name: "s1".into(),
                    created: "2026-01-01T00:00:00Z".into(),
                    user_created: true,
                    labels: [("k".to_string(), "v".to_string())].into(),
                },
            },
            Op::ChangeChain {
                change: ChainChange::Remove { name: "s1".into() },
            },
            Op::ChangeChain {
                change: ChainChange::Purge,
            },
            Op::ChangeChain {
                change: ChainChange::Revert { name: "s1".into() },
            },
            Op::ChangeChain {
                change: ChainChange::Grow { size: 1 << 30 },
            },
            Op::ChainChanged {
                names: vec!["s0".into()],
                coalesced: true,
            },
            Op::ReadLayer {
                layer: "volume-snap-s1.img".into(),
                offset: 4096,
                len: 8192,
            },
        ];
        for op in &ops {
            match op {
                Op::Hello { .. }
                | Op::Challenge { .. }
                | Op::Proof { .. }
                | Op::Read { .. }
                | Op::Write { .. }
                | Op::Flush
                | Op::Discard { .. }
                | Op::WriteZeroes { .. }
                | Op::GetRevision
                | Op::SetRevision { .. }
                | Op::ListLayers
                | Op::ListExtents { .. }
                | Op::Ping
                | Op::Ok
                | Op::Data
                | Op::Revision { .. }
                | Op::Layers { .. }
                | Op::Extents { .. }
                | Op::Pong
                | Op::Error { .. }
                | Op::Open { .. }
                | Op::Opened { .. }
                | Op::NodeStatus
                | Op::Node { .. }
                | Op::CreateReplica { .. }
                | Op::Created { .. }
                | Op::DeleteReplica { .. }
                | Op::ListReplicas
                | Op::Replicas { .. }
                | Op::ListAllocated
                | Op::ChangeChain { .. }
                | Op::ChainChanged { .. }
                | Op::ReadLayer { .. }
                | Op::Forward { .. }
                | Op::Forwarded { .. }
                | Op::ExpandReplica { .. } => {}
            }
        }
        ops
    }

    fn frame(request_id: u64, op: Op, payload: &[u8]) -> (Header, Vec<u8>) {
        let header = Header { request_id, op };
        let mut buf = Vec::new();
        encode_frame(&mut buf, &header, payload).unwrap();
        (header, buf)
    }

    fn prefix(header_len: u16, flags: u16, payload_len: u32, crc: u32) -> Vec<u8> {
        let mut p = MAGIC.to_vec();
        p.extend_from_slice(&header_len.to_le_bytes());
        p.extend_from_slice(&flags.to_le_bytes());
        p.extend_from_slice(&payload_len.to_le_bytes());
        p.extend_from_slice(&crc.to_le_bytes());
        p
    }

    #[test]
    fn every_op_roundtrips_with_and_without_payload() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        for (i, op) in every_op().into_iter().enumerate() {
            for payload in [&[][..], &data[..]] {
                let (header, buf) = frame(i as u64 * 1_000_003, op.clone(), payload);
                let Decoded::Frame {
                    header: got,
                    payload: got_payload,
                    consumed,
                } = decode_frame(&buf).unwrap()
                else {
                    panic!("{op:?}: incomplete");
                };
                assert_eq!(got, header);
                assert_eq!(got_payload, payload);
                assert_eq!(consumed, buf.len());
            }
        }
    }

    #[test]
    fn every_truncation_is_incomplete_with_a_truthful_need() {
        for op in every_op() {
            let (_, buf) = frame(42, op, b"some payload bytes");
            for cut in 0..buf.len() {
                match decode_frame(&buf[..cut]) {
                    Ok(Decoded::Incomplete { need }) => {
                        assert!(need > cut, "cut {cut}: need {need} is no progress");
                        assert!(need <= buf.len(), "cut {cut}: need {need} beyond the frame");
                        if cut >= PREFIX_LEN {
                            assert_eq!(need, buf.len());
                        }
                    }
                    other => panic!("cut {cut}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn flipped_bytes_fail_the_checksum() {
        let (_, buf) = frame(
            1,
            Op::Write {
                offset: 0,
                fua: false,
            },
            &[0xAB; 4096],
        );
        // Every payload byte and every header byte.
        for i in PREFIX_LEN..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x01;
            assert!(
                matches!(decode_frame(&bad), Err(WireError::Checksum { .. })),
                "byte {i}"
            );
        }
    }

    #[test]
    fn bad_magic_fails_early() {
        let (_, mut buf) = frame(1, Op::Ping, &[]);
        buf[0] = b'X';
        assert!(matches!(decode_frame(&buf), Err(WireError::BadMagic)));
        // On the first wrong byte, not after a whole prefix.
        assert!(matches!(decode_frame(b"CRX"), Err(WireError::BadMagic)));
        assert!(matches!(
            decode_frame(b"GET / HTTP/1.1\r\n"),
            Err(WireError::BadMagic)
        ));
    }

    #[test]
    fn oversize_lengths_are_rejected_from_the_prefix_alone() {
        // Only the 16 prefix bytes exist: the decoder must not ask for (or
        // look at) the 8 MiB + 1 it announces.
        let p = prefix(10, 0, (MAX_PAYLOAD + 1) as u32, 0);
        assert!(
            matches!(decode_frame(&p), Err(WireError::PayloadTooLarge(n)) if n == MAX_PAYLOAD + 1)
        );
        let p = prefix(10, 0, u32::MAX, 0);
        assert!(matches!(
            decode_frame(&p),
            Err(WireError::PayloadTooLarge(_))
        ));
        // Largest legal lengths: just incomplete, nothing allocated by a borrowed decode.
        let p = prefix(u16::MAX, 0, MAX_PAYLOAD as u32, 0);
        assert_eq!(
            decode_frame(&p).unwrap(),
            Decoded::Incomplete {
                need: PREFIX_LEN + MAX_HEADER + MAX_PAYLOAD
            }
        );
        // Unknown flags and an empty header.
        assert!(matches!(
            decode_frame(&prefix(10, 1, 0, 0)),
            Err(WireError::UnknownFlags(1))
        ));
        assert!(matches!(
            decode_frame(&prefix(0, 0, 0, 0)),
            Err(WireError::Decode(_))
        ));
    }

    #[test]
    fn reader_does_not_allocate_what_a_prefix_claims() {
        let p = prefix(10, 0, (MAX_PAYLOAD + 1) as u32, 0);
        let mut r = FrameReader::new(io::Cursor::new(p));
        assert!(matches!(r.next_frame(), Err(WireError::PayloadTooLarge(_))));
        assert_eq!(
            r.buffer_capacity(),
            FrameReader::<io::Cursor<Vec<u8>>>::INITIAL_CAPACITY
        );
        // A legal but huge announced frame, then the peer stops: the buffer
        // grows with what arrived (here: 100 KiB), not to 8 MiB.
        let mut bytes = prefix(u16::MAX, 0, MAX_PAYLOAD as u32, 0);
        bytes.resize(100 * 1024, 0);
        let mut r = FrameReader::new(io::Cursor::new(bytes));
        assert!(
            matches!(r.next_frame(), Err(WireError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof)
        );
        assert!(
            r.buffer_capacity() <= 2 * 100 * 1024,
            "{}",
            r.buffer_capacity()
        );
    }

    #[test]
    fn encoder_rejects_oversize_and_leaves_the_buffer_alone() {
        let mut buf = b"earlier".to_vec();
        let big = vec![0; MAX_PAYLOAD + 1];
        let h = Header {
            request_id: 1,
            op: Op::Write {
                offset: 0,
                fua: false,
            },
        };
        assert!(matches!(
            encode_frame(&mut buf, &h, &big),
            Err(WireError::PayloadTooLarge(_))
        ));
        let h = Header {
            request_id: 1,
            op: Op::ListExtents {
                layer: "x".repeat(MAX_HEADER),
            },
        };
        assert!(matches!(
            encode_frame(&mut buf, &h, &[]),
            Err(WireError::HeaderTooLarge(_))
        ));
        assert_eq!(buf, b"earlier");
        // The largest payload is fine.
        let h = Header {
            request_id: 1,
            op: Op::Data,
        };
        let mut frame = Vec::new();
        encode_frame(&mut frame, &h, &big[..MAX_PAYLOAD]).unwrap();
        assert!(
            matches!(decode_frame(&frame).unwrap(), Decoded::Frame { payload, .. } if payload.len() == MAX_PAYLOAD)
        );
    }

    #[test]
    fn a_header_claiming_a_huge_string_is_an_error_not_an_allocation() {
        // Hand-made header: request_id 0, op Hello (variant 0), node length
        // u64::MAX / 2 in bincode varint (0xFD + 8 bytes), no string bytes.
        let mut hdr = vec![0u8, 0u8, 0xFD];
        hdr.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
        let mut buf = prefix(hdr.len() as u16, 0, 0, crc32c::crc32c(&hdr));
        buf.extend_from_slice(&hdr);
        assert!(matches!(decode_frame(&buf), Err(WireError::Decode(_))));
    }

    #[test]
    fn trailing_header_bytes_are_rejected() {
        let mut hdr = Vec::new();
        bincode::encode_into_std_write(
            Header {
                request_id: 3,
                op: Op::Ping,
            },
            &mut hdr,
            config(),
        )
        .unwrap();
        hdr.push(0);
        let mut buf = prefix(hdr.len() as u16, 0, 0, crc32c::crc32c(&hdr));
        buf.extend_from_slice(&hdr);
        assert!(matches!(decode_frame(&buf), Err(WireError::Decode(m)) if m.contains("trailing")));
    }

    #[test]
    fn frames_back_to_back_decode_in_order() {
        let mut buf = Vec::new();
        let ops = every_op();
        for (i, op) in ops.iter().enumerate() {
            let payload = vec![i as u8; i * 100];
            encode_frame(
                &mut buf,
                &Header {
                    request_id: i as u64,
                    op: op.clone(),
                },
                &payload,
            )
            .unwrap();
        }
        let mut at = 0;
        for (i, op) in ops.iter().enumerate() {
            let Decoded::Frame {
                header,
                payload,
                consumed,
            } = decode_frame(&buf[at..]).unwrap()
            else {
                panic!("frame {i} incomplete");
            };
            assert_eq!((header.request_id, &header.op), (i as u64, op));
            assert_eq!(payload, vec![i as u8; i * 100]);
            at += consumed;
        }
        assert_eq!(at, buf.len());

        // The same stream through FrameReader, fed a few bytes per read.
        struct Trickle(Vec<u8>, usize);
        impl Read for Trickle {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                let n = out.len().min(7).min(self.0.len() - self.1);
                out[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
                self.1 += n;
                Ok(n)
            }
        }
        for mut r in [
            FrameReader::new(Box::new(Trickle(buf.clone(), 0)) as Box<dyn Read>),
            FrameReader::new(Box::new(io::Cursor::new(buf.clone())) as Box<dyn Read>),
        ] {
            for (i, op) in ops.iter().enumerate() {
                let (header, payload) = r.next_frame().unwrap().unwrap();
                assert_eq!((header.request_id, &header.op), (i as u64, op));
                assert_eq!(payload, vec![i as u8; i * 100]);
            }
            assert!(r.next_frame().unwrap().is_none());
        }
    }

    #[test]
    fn encode_frame_head_plus_payload_equals_encode_frame() {
        let h = Header {
            request_id: 9,
            op: Op::Write {
                offset: 8192,
                fua: true,
            },
        };
        let data = [5u8; 3000];
        let mut whole = Vec::new();
        encode_frame(&mut whole, &h, &data).unwrap();
        let mut head = Vec::new();
        encode_frame_head(&mut head, &h, &data).unwrap();
        head.extend_from_slice(&data);
        assert_eq!(head, whole);
    }

    fn arb_bytes32() -> impl Strategy<Value = [u8; 32]> {
        proptest::array::uniform32(any::<u8>())
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        let layer = (
            ".{0,20}",
            ".{0,20}",
            proptest::option::of(".{0,10}"),
            ".{0,10}",
            ".{0,10}",
            any::<bool>(),
            any::<bool>(),
            proptest::collection::btree_map(".{0,5}", ".{0,5}", 0..3),
            any::<u64>(),
            any::<bool>(),
        )
            .prop_map(
                |(
                    file,
                    name,
                    snapshot,
                    parent,
                    created,
                    user_created,
                    removed,
                    labels,
                    allocated,
                    is_head,
                )| {
                    LayerInfo {
                        file,
                        name,
                        snapshot,
                        parent,
                        created,
                        user_created,
                        removed,
                        labels,
                        allocated,
                        is_head,
                    }
                },
            );
        prop_oneof![
            (".{0,40}", arb_bytes32()).prop_map(|(node, nonce)| Op::Hello { node, nonce }),
            (arb_bytes32(), arb_bytes32())
                .prop_map(|(nonce, proof)| Op::Challenge { nonce, proof }),
            arb_bytes32().prop_map(|proof| Op::Proof { proof }),
            (any::<u64>(), any::<u32>()).prop_map(|(offset, len)| Op::Read { offset, len }),
            (any::<u64>(), any::<bool>()).prop_map(|(offset, fua)| Op::Write { offset, fua }),
            Just(Op::Flush),
            (any::<u64>(), any::<u32>()).prop_map(|(offset, len)| Op::Discard { offset, len }),
            (any::<u64>(), any::<u32>()).prop_map(|(offset, len)| Op::WriteZeroes { offset, len }),
            Just(Op::GetRevision),
            any::<u64>().prop_map(|revision| Op::SetRevision { revision }),
            Just(Op::ListLayers),
            ".{0,40}".prop_map(|layer| Op::ListExtents { layer }),
            Just(Op::Ping),
            Just(Op::Ok),
            Just(Op::Data),
            any::<u64>().prop_map(|revision| Op::Revision { revision }),
            proptest::collection::vec(layer, 0..4).prop_map(|layers| Op::Layers { layers }),
            proptest::collection::vec((any::<u64>(), any::<u64>()), 0..50)
                .prop_map(|extents| Op::Extents { extents }),
            Just(Op::Pong),
            (any::<i32>(), ".{0,40}").prop_map(|(errno, message)| Op::Error { errno, message }),
            (".{0,20}", ".{0,20}", any::<u64>()).prop_map(|(volume, replica, g)| Op::Open {
                volume,
                replica,
                claim: Claim::Join { generation: g }
            }),
            (any::<u64>(), any::<u64>(), any::<u64>(), ".{0,8}").prop_map(
                |(size, revision, generation, instance)| Op::Opened {
                    size,
                    revision,
                    generation,
                    instance
                }
            ),
            Just(Op::NodeStatus),
            (
                ".{0,20}",
                proptest::collection::vec(
                    (
                        ".{0,20}",
                        any::<u64>(),
                        any::<u64>(),
                        any::<u64>(),
                        any::<u32>()
                    ),
                    0..4
                )
            )
                .prop_map(|(node, d)| Op::Node {
                    report: NodeReport {
                        node,
                        disks: d
                            .into_iter()
                            .map(|(path, size, available, allocated, replicas)| DiskReport {
                                path,
                                size,
                                available,
                                allocated,
                                replicas,
                                schedulable: replicas % 2 == 0,
                            })
                            .collect(),
                        placements: Vec::new(),
                    },
                }),
            (".{0,20}", ".{0,20}", any::<u64>(), any::<u32>()).prop_map(
                |(volume, replica, size, p)| Op::CreateReplica {
                    volume,
                    replica,
                    size,
                    over_provisioning: p,
                    min_available: p / 2,
                    replaces: String::new(),
                }
            ),
            Just(Op::ListReplicas),
            Just(Op::ListAllocated),
            (
                ".{0,20}",
                ".{0,20}",
                any::<bool>(),
                proptest::collection::btree_map(".{0,5}", ".{0,5}", 0..3)
            )
                .prop_map(|(name, created, user_created, labels)| Op::ChangeChain {
                    change: ChainChange::Snapshot {
                        name,
                        created,
                        user_created,
                        labels
                    }
                }),
            ".{0,20}".prop_map(|name| Op::ChangeChain {
                change: ChainChange::Remove { name }
            }),
            Just(Op::ChangeChain {
                change: ChainChange::Purge
            }),
            ".{0,20}".prop_map(|name| Op::ChangeChain {
                change: ChainChange::Revert { name }
            }),
            any::<u64>().prop_map(|size| Op::ChangeChain {
                change: ChainChange::Grow { size }
            }),
            (proptest::collection::vec(".{0,10}", 0..3), any::<bool>())
                .prop_map(|(names, coalesced)| Op::ChainChanged { names, coalesced }),
            (".{0,20}", any::<u64>(), any::<u32>())
                .prop_map(|(layer, offset, len)| Op::ReadLayer { layer, offset, len }),
        ]
    }

    proptest! {
        #[test]
        fn random_headers_roundtrip(request_id in any::<u64>(), op in arb_op(), payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let header = Header { request_id, op };
            let mut buf = vec![0xEE; 3]; // appends after existing bytes
            encode_frame(&mut buf, &header, &payload).unwrap();
            let Decoded::Frame { header: got, payload: got_payload, consumed } = decode_frame(&buf[3..]).unwrap() else {
                panic!("incomplete");
            };
            prop_assert_eq!(got, header);
            prop_assert_eq!(got_payload, &payload[..]);
            prop_assert_eq!(consumed, buf.len() - 3);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&bytes);
            let _ = FrameReader::new(&bytes[..]).next_frame();
        }

        /// Random bytes behind a valid prefix and checksum, so they reach bincode.
        #[test]
        fn random_headers_with_valid_checksum_never_panic(hdr in proptest::collection::vec(any::<u8>(), 1..128), payload in proptest::collection::vec(any::<u8>(), 0..16)) {
            let crc = crc32c::crc32c_append(crc32c::crc32c(&hdr), &payload);
            let mut buf = prefix(hdr.len() as u16, 0, payload.len() as u32, crc);
            buf.extend_from_slice(&hdr);
            buf.extend_from_slice(&payload);
            if let Ok(Decoded::Frame { header, payload: p, .. }) = decode_frame(&buf) {
                // Whatever is accepted survives a re-encode unchanged. (Not
                // byte-identical: bincode accepts non-minimal varints.)
                let mut again = Vec::new();
                encode_frame(&mut again, &header, p).unwrap();
                let Decoded::Frame { header: h2, payload: p2, .. } = decode_frame(&again).unwrap() else {
                    panic!("re-encoded frame incomplete");
                };
                prop_assert_eq!(h2, header);
                prop_assert_eq!(p2, p);
            }
        }
    }
}
