//! Cluster-wide volume operations: which node owns a volume, and carrying
//! an API call to it over the authenticated peer protocol.
//!
//! A volume's record lives on one node, its owner. Every node learns the
//! names each peer owns from the peers' `NodeStatus` answers (polled every
//! 2 s, asked again on a miss). The API layer (`api/server.rs`) routes a
//! call for a volume owned elsewhere through [`VolumeManager::forward`]:
//! the owner runs it as if it had been asked directly and answers with the
//! same gRPC code and message. Names are unique across the nodes that
//! answer: there is no consensus behind this (see
//! `docs/design/0006-cluster-wide-volumes.md`).

use std::sync::Arc;
use std::time::Duration;

use super::cluster::NodeView;
use super::VolumeManager;
use crate::transport::{Op, PeerControl};

/// How long a forwarded call may take (an attach waits for its replicas,
/// a backup without `no_wait` for its upload).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(600);

/// A peer node, as the API layer addresses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRef {
    pub node: String,
    pub addr: String,
}

/// Where a volume's record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Here.
    Local,
    /// On a peer that answered recently.
    Peer(PeerRef),
    /// On a peer that does not answer now (as last reported by it).
    Away { node: String, reason: String },
    /// Nowhere this node can see.
    Unknown,
}

/// A forwarded call that did not produce a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// The owner could not be reached: nothing was changed there (or, for
    /// a connection lost mid-call, it may have been; the owner's state
    /// tells).
    #[error("owner {node} unreachable: {reason}")]
    Unreachable { node: String, reason: String },
    /// The owner answered with an error: its gRPC code and message.
    #[error("{message}")]
    Refused { code: i32, message: String },
}

fn owns(view: &NodeView, name: &str) -> bool {
    view.report.as_ref().is_some_and(|r| r.owns(name))
}

impl VolumeManager {
    /// Names of the volumes this node owns.
    pub fn owned_volumes(&self) -> Vec<String> {
        self.inner.owned_names()
    }

    /// Where the replicas of the volumes this node owns are.
    pub fn placements(&self) -> Vec<crate::transport::VolumePlacement> {
        self.inner.placements()
    }

    /// Installs what this node answers to its peers' `NodeStatus` and
    /// forwarded calls (the API service; cairnd does this at start).
    pub fn set_peer_control(&self, control: Arc<dyn PeerControl>) {
        if let Some(s) = &self.server {
            s.set_control(control);
        }
    }

    /// Which node owns volume `name`. Asks every peer again when none is
    /// known to own it (a volume created a moment ago elsewhere).
    pub async fn owner(&self, name: &str) -> Owner {
        // A record here counts even when its engine was fenced: calls made
        // on this node act on this node's (stale) copy until it is detached
        // and dropped; peers are not told about it.
        if self.inner.has_record(name) {
            return Owner::Local;
        }
        let cluster = self.inner.cluster.clone();
        if !cluster.enabled() {
            return Owner::Unknown;
        }
        let found = |nodes: Vec<NodeView>| {
            nodes.into_iter().find(|n| owns(n, name)).map(|n| {
                if n.up {
                    Owner::Peer(PeerRef {
                        node: n.name,
                        addr: n.addr,
                    })
                } else {
                    Owner::Away {
                        node: n.name,
                        reason: n.message,
                    }
                }
            })
        };
        if let Some(o) = found(cluster.nodes()) {
            return o;
        }
        let c = cluster.clone();
        let nodes = tokio::task::spawn_blocking(move || {
            for n in c.nodes().into_iter().filter(|n| n.up) {
                c.refresh(&n.addr);
            }
            c.nodes()
        })
        .await
        .unwrap_or_default();
        found(nodes).unwrap_or(Owner::Unknown)
    }

    /// Peer node `name`, to carry a call to it: unknown and unreachable
    /// nodes are errors.
    pub fn peer_named(&self, name: &str) -> Result<PeerRef, super::ControlError> {
        let found = self
            .inner
            .cluster
            .nodes()
            .into_iter()
            .find(|n| n.report.as_ref().is_some_and(|r| r.node == name));
        match found {
            Some(n) if n.up => Ok(PeerRef {
                node: n.name,
                addr: n.addr,
            }),
            Some(n) => Err(super::ControlError::NodeUnreachable {
                node: n.name,
                reason: n.message,
            }),
            None => Err(super::ControlError::Cluster(
                super::cluster::ClusterError::UnknownNode(name.to_string()),
            )),
        }
    }

    /// [`VolumeManager::owner`] from the peers' answers now, not the last
    /// poll's: for the calls that change who owns the volume (a peer that
    /// restarted without its record still shows it in its last report).
    pub async fn owner_now(&self, name: &str) -> Owner {
        let cluster = self.inner.cluster.clone();
        if cluster.enabled() && !self.inner.has_record(name) {
            let _ = tokio::task::spawn_blocking(move || {
                for n in cluster.nodes().into_iter().filter(|n| n.up) {
                    cluster.refresh(&n.addr);
                }
            })
            .await;
        }
        self.owner(name).await
    }

    /// Peers that answer now.
    pub fn peers_up(&self) -> Vec<PeerRef> {
        self.inner
            .cluster
            .nodes()
            .into_iter()
            .filter(|n| n.up && n.report.is_some())
            .map(|n| PeerRef {
                node: n.name,
                addr: n.addr,
            })
            .collect()
    }

    /// Peers that do not answer, with the volumes they last said they own
    /// and why they are away.
    pub fn peers_away(&self) -> Vec<(String, Vec<String>, String)> {
        self.inner
            .cluster
            .nodes()
            .into_iter()
            .filter(|n| !n.up)
            .filter_map(|n| {
                let r = n.report?;
                Some((n.name, r.volume_names(), n.message))
            })
            .collect()
    }

    /// Runs API method `method` with the encoded `request` on peer `to`;
    /// returns the encoded response.
    pub async fn forward(
        &self,
        to: &PeerRef,
        method: &str,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, ForwardError> {
        let cluster = self.inner.cluster.clone();
        let (addr, method) = (to.addr.clone(), method.to_string());
        let unreachable = |reason: String| ForwardError::Unreachable {
            node: to.node.clone(),
            reason,
        };
        let answer = tokio::task::spawn_blocking(move || {
            cluster.call_data(&addr, Op::Forward { method }, &request, FORWARD_TIMEOUT)
        })
        .await
        .map_err(|e| unreachable(e.to_string()))?;
        match answer {
            Ok((Op::Forwarded { code: 0, .. }, body)) => Ok(body),
            Ok((Op::Forwarded { code, message }, _)) => {
                Err(ForwardError::Refused { code, message })
            }
            Ok((other, _)) => Err(unreachable(format!(
                "answered {other:?} to a forwarded call"
            ))),
            Err(e) => Err(unreachable(e.to_string())),
        }
    }
}
