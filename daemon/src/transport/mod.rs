//! The replica transport: how the engine reaches a replica on another node.
//!
//! This module owns the replica wire protocol — the frame format both the
//! replica server and the engine's remote-replica leg speak — the
//! cluster-secret handshake that opens every connection, the replica server
//! ([`server`]) and the blocking peer client ([`client`]) the control plane
//! and rebuilds use. [`wire`] is a pure codec over byte slices and
//! `io::Read`, [`auth`] the handshake primitives. The engine's pipelined
//! client lives in `engine::remote`. See
//! `docs/design/0002-replica-wire-protocol.md` for the decisions behind the
//! format.
//!
//! One frame (integers little-endian):
//!
//! ```text
//!  0       4          6        8            12        16
//!  ┌───────┬──────────┬────────┬────────────┬─────────┬──────────────┬─────────────────┐
//!  │ "CRN2"│header_len│ flags  │payload_len │ crc32c  │ header       │ payload         │
//!  │ magic │   u16    │  u16   │    u32     │   u32   │ bincode 2,   │ raw bytes:      │
//!  │       │ 1..=65535│ 0 only │ ≤ 8 MiB    │ of hdr  │ varint       │ write data or   │
//!  │       │          │        │            │ +payload│ Header{id,op}│ read data       │
//!  └───────┴──────────┴────────┴────────────┴─────────┴──────────────┴─────────────────┘
//!  ◀────────────── fixed prefix, PREFIX_LEN = 16 ──────▶
//! ```
//!
//! Buffer ownership: an encoder appends to a `Vec` its caller owns and reuses
//! (or, with [`wire::encode_frame_head`], leaves the payload in the caller's
//! buffer for a `writev`); a decoded frame's payload borrows the input bytes,
//! so the caller decides when that memory is reused. Codec functions keep no
//! state and may be called from any thread.

pub mod auth;
pub mod client;
pub mod server;
pub mod wire;

pub use auth::{AuthError, ClientHandshake, ClusterSecret, ServerHandshake};
pub use client::{PeerConn, PeerError};
pub use server::{PeerControl, ReplicaServer, ServerStats};
pub use wire::{
    decode_frame, encode_frame, encode_frame_head, Decoded, DiskReport, FrameReader, Header,
    NodeReport, Op, ReplicaPlace, ReplicaReport, VolumePlacement, WireError, FENCED_ERRNO, MAGIC,
    MAX_HEADER, MAX_PAYLOAD, PREFIX_LEN,
};
