//! Cluster membership on bare hosts: the peers this node knows (from
//! `--peer` and `cairnctl node add`, kept in `<data-dir>/cluster.json`), what
//! each one reports about itself (name, disks) and whether it answers.
//!
//! Every peer is polled over the authenticated replica protocol
//! (`NodeStatus`) every [`POLL_INTERVAL`]. A peer that has not answered
//! within [`DOWN_AFTER`] is down: no new replicas go there.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::transport::{ClusterSecret, NodeReport, Op, PeerConn, PeerError};

pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
pub const DOWN_AFTER: Duration = Duration::from_secs(6);
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "this node runs without a cluster: start cairnd with --replica-listen and --cluster-secret"
    )]
    Standalone,
    #[error("bad peer address {addr:?}: {reason}; use HOST:PORT of a peer's --replica-listen")]
    BadAddr { addr: String, reason: String },
    #[error("no node or peer address {0:?}: see `cairnctl node list`")]
    UnknownNode(String),
    #[error("node {0} is not reachable now")]
    Unreachable(String),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("cluster file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ClusterFile {
    peers: Vec<String>,
}

#[derive(Debug, Clone)]
struct Peer {
    report: Option<NodeReport>,
    last_seen: Option<Instant>,
    error: String,
}

/// One node as `cairnctl node list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// Replica server address; empty for a standalone node.
    pub addr: String,
    pub local: bool,
    pub up: bool,
    pub message: String,
    pub report: Option<NodeReport>,
}

pub struct Cluster {
    node: String,
    listen: Option<String>,
    secret: Option<ClusterSecret>,
    file: PathBuf,
    peers: Mutex<BTreeMap<String, Peer>>,
}

/// Checks a `HOST:PORT` peer address.
pub fn check_addr(addr: &str) -> Result<(), ClusterError> {
    let bad = |reason: &str| ClusterError::BadAddr {
        addr: addr.to_string(),
        reason: reason.to_string(),
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    if host.is_empty() {
        return Err(bad("no host"));
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("port is not 1-65535"))?;
    Ok(())
}

impl Cluster {
    /// Membership from `--peer` plus the persisted list. `listen` is our own
    /// replica address (a peer list may name it; it is skipped).
    pub fn open(
        node: &str,
        listen: Option<String>,
        secret: Option<ClusterSecret>,
        data_dir: &std::path::Path,
        cli_peers: &[String],
    ) -> Result<Cluster, ClusterError> {
        let file = data_dir.join("cluster.json");
        let saved: ClusterFile = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| ClusterError::File {
                path: file.clone(),
                reason: format!("not valid JSON: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ClusterFile::default(),
            Err(e) => {
                return Err(ClusterError::File {
                    path: file.clone(),
                    reason: e.to_string(),
                })
            }
        };
        let mut peers = BTreeMap::new();
        for addr in cli_peers.iter().chain(&saved.peers) {
            check_addr(addr)?;
            if Some(addr) != listen.as_ref() {
                peers.insert(
                    addr.clone(),
                    Peer {
                        report: None,
                        last_seen: None,
                        error: String::new(),
                    },
                );
            }
        }
        if !peers.is_empty() && (listen.is_none() || secret.is_none()) {
            return Err(ClusterError::Standalone);
        }
        Ok(Cluster {
            node: node.to_string(),
            listen,
            secret,
            file,
            peers: Mutex::new(peers),
        })
    }

    /// True when this node takes part in a cluster (serves replicas).
    pub fn enabled(&self) -> bool {
        self.listen.is_some() && self.secret.is_some()
    }

    pub fn secret(&self) -> Option<&ClusterSecret> {
        self.secret.as_ref()
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Peer>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, peers: &BTreeMap<String, Peer>) -> Result<(), ClusterError> {
        let f = ClusterFile {
            peers: peers.keys().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&f).map_err(|e| ClusterError::File {
            path: self.file.clone(),
            reason: e.to_string(),
        })?;
        fsutil::atomic_write(&self.file, &bytes).map_err(|e| ClusterError::File {
            path: self.file.clone(),
            reason: e.to_string(),
        })
    }

    /// Adds a peer by address and polls it once (blocking).
    pub fn add(&self, addr: &str) -> Result<NodeView, ClusterError> {
        if !self.enabled() {
            return Err(ClusterError::Standalone);
        }
        check_addr(addr)?;
        if Some(addr) != self.listen.as_deref() {
            let mut peers = self.lock();
            peers.entry(addr.to_string()).or_insert(Peer {
                report: None,
                last_seen: None,
                error: String::new(),
            });
            self.save(&peers)?;
        }
        self.poll_one(addr);
        self.nodes()
            .into_iter()
            .find(|n| n.addr == addr)
            .ok_or_else(|| ClusterError::UnknownNode(addr.to_string()))
    }

    /// Removes a peer, by node name or address.
    pub fn remove(&self, which: &str) -> Result<(), ClusterError> {
        let mut peers = self.lock();
        let addr = peers
            .iter()
            .find(|(a, p)| {
                a.as_str() == which || p.report.as_ref().is_some_and(|r| r.node == which)
            })
            .map(|(a, _)| a.clone())
            .ok_or_else(|| ClusterError::UnknownNode(which.to_string()))?;
        let mut next = peers.clone();
        next.remove(&addr);
        self.save(&next)?;
        *peers = next;
        tracing::info!(peer = %addr, "peer removed");
        Ok(())
    }

    /// Calls one peer (a fresh authenticated connection; the rare path).
    pub fn call(&self, addr: &str, op: Op) -> Result<Op, ClusterError> {
        let secret = self.secret.as_ref().ok_or(ClusterError::Standalone)?;
        let mut c = PeerConn::connect(addr, secret, &self.node, CALL_TIMEOUT)?;
        Ok(c.call(op)?)
    }

    /// [`Self::call`] with a request payload and the answer's, on a
    /// connection whose calls may take up to `timeout` (a forwarded API call
    /// can attach a volume or upload a backup).
    pub fn call_data(
        &self,
        addr: &str,
        op: Op,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<(Op, Vec<u8>), ClusterError> {
        let secret = self.secret.as_ref().ok_or(ClusterError::Standalone)?;
        let mut c = PeerConn::connect(addr, secret, &self.node, timeout)?;
        let mut data = Vec::new();
        let op = c.call_data(op, payload, &mut data)?;
        Ok((op, data))
    }

    /// Asks peer `addr` for its status now (not the last poll's) and
    /// records the answer.
    pub fn refresh(&self, addr: &str) {
        self.poll_one(addr);
    }

    fn poll_one(&self, addr: &str) {
        let result = self.call(addr, Op::NodeStatus);
        let mut peers = self.lock();
        let Some(p) = peers.get_mut(addr) else { return };
        match result {
            Ok(Op::Node { report }) => {
                if p.last_seen.is_none_or(|t| t.elapsed() > DOWN_AFTER) {
                    tracing::info!(peer = %addr, node = %report.node, "peer is up");
                }
                p.report = Some(report);
                p.last_seen = Some(Instant::now());
                p.error.clear();
            }
            Ok(other) => p.error = format!("answered {other:?} to NodeStatus"),
            Err(e) => {
                let e = e.to_string();
                if p.error != e {
                    // Once per change, not every poll.
                    tracing::warn!(peer = %addr, error = %e, "peer not answering");
                }
                p.error = e;
            }
        }
    }

    /// Polls every peer once (blocking; the poll task calls this).
    pub fn poll(&self) {
        let addrs: Vec<String> = self.lock().keys().cloned().collect();
        for a in addrs {
            self.poll_one(&a);
        }
    }

    /// This node (with `local_report`) and every peer.
    pub fn nodes_with(&self, local_report: NodeReport) -> Vec<NodeView> {
        let mut out = vec![NodeView {
            name: self.node.clone(),
            addr: self.listen.clone().unwrap_or_default(),
            local: true,
            up: true,
            message: String::new(),
            report: Some(local_report),
        }];
        out.extend(self.nodes());
        out
    }

    /// Every peer.
    pub fn nodes(&self) -> Vec<NodeView> {
        self.lock()
            .iter()
            .map(|(addr, p)| {
                let up = p.last_seen.is_some_and(|t| t.elapsed() <= DOWN_AFTER);
                NodeView {
                    name: p
                        .report
                        .as_ref()
                        .map(|r| r.node.clone())
                        .unwrap_or_else(|| format!("({addr})")),
                    addr: addr.clone(),
                    local: false,
                    up,
                    message: if up {
                        String::new()
                    } else if p.error.is_empty() {
                        "not polled yet".to_string()
                    } else {
                        p.error.clone()
                    },
                    report: p.report.clone(),
                }
            })
            .collect()
    }

    /// The replica address of node `name` (as last reported).
    pub fn addr_of(&self, name: &str) -> Option<String> {
        self.lock()
            .iter()
            .find(|(_, p)| p.report.as_ref().is_some_and(|r| r.node == name))
            .map(|(a, _)| a.clone())
    }

    /// Whether node `name` answered recently.
    pub fn is_up(&self, name: &str) -> bool {
        name == self.node
            || self.lock().values().any(|p| {
                p.report.as_ref().is_some_and(|r| r.node == name)
                    && p.last_seen.is_some_and(|t| t.elapsed() <= DOWN_AFTER)
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn peer_addresses_are_checked() {
        assert!(check_addr("10.0.0.1:9500").is_ok());
        assert!(check_addr("node-b:9500").is_ok());
        for bad in ["10.0.0.1", ":9500", "h:0", "h:99999", "h:x"] {
            let e = check_addr(bad).unwrap_err().to_string();
            assert!(e.contains("bad peer address"), "{bad}: {e}");
        }
    }
}
