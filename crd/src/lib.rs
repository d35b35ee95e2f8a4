//! Cairn on Kubernetes: the custom resources of group `cairn.io`
//! ([`resources`]) and the per-node controller that mirrors them onto the
//! local `cairnd` through its Unix socket ([`controller`]).
//!
//! The controller is thin: `cairnd` stays the source of truth for storage;
//! Kubernetes (its API server, etcd behind it) is what the nodes share —
//! membership, settings, the backup target. This crate links no storage
//! code (no engine, `libublk`, `io-uring` or `object_store`).

pub mod controller;
pub mod resources;
