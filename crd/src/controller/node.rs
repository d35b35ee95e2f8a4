//! This node in Kubernetes: its `Node` object (owned by the Kubernetes
//! `Node`, so it goes when the node is deleted) carries the replica
//! address and disks `cairnd` reports; and the local `cairnd`'s membership
//! follows the `Node` objects — a peer published there is added (`node
//! add`), a member whose object is gone is removed once it holds no
//! replicas (`cairnd` refuses before that; retried each pass). The
//! object's `spec` (scheduling of new replicas on the node and its disks)
//! is applied to `cairnd` each pass it differs; `status` shows the rule in
//! force and why a spec was refused.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cairn_api::pb;
use k8s_openapi::api::core::v1::Node as KubeNode;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::ResourceExt;
use serde_json::json;

use super::{manager_name, Context, Error};
use crate::resources::{DiskStatus, Node, NodeSpec, NodeState, NodeStatus};

pub const PASS: Duration = Duration::from_secs(10);

/// This node's status from `cairnd`.
pub fn status_from(
    local: &pb::Node,
    members: &[pb::ClusterNode],
    replica_addr: &str,
) -> NodeStatus {
    let me = members.iter().find(|m| m.local);
    let disks = match me {
        Some(m) => m
            .disks
            .iter()
            .map(|d| DiskStatus {
                path: d.path.clone(),
                size_bytes: d.size,
                available_bytes: d.available,
                allocated_bytes: d.allocated,
                replicas: d.replicas,
                schedulable: d.schedulable,
            })
            .collect(),
        None => local
            .disks
            .iter()
            .map(|d| DiskStatus {
                path: d.path.clone(),
                size_bytes: d.size,
                available_bytes: d.available,
                allocated_bytes: 0,
                replicas: d.replicas,
                schedulable: d.schedulable,
            })
            .collect(),
    };
    NodeStatus {
        state: NodeState::Up,
        replica_address: replica_addr.to_string(),
        kernel: local.kernel.clone(),
        ublk_status: local.ublk_status.clone(),
        online_expansion: local.online_expansion,
        allow_scheduling: local.allow_scheduling,
        disks,
        message: String::new(),
    }
}

/// The scheduling request that brings `cairnd`'s rule (in `local`) to what
/// `spec` asks, or `None` when they agree.
pub fn scheduling_change(
    spec: &NodeSpec,
    local: &pb::Node,
) -> Option<pb::SetNodeSchedulingRequest> {
    let norm = |v: &[String]| {
        v.iter()
            .map(|d| d.trim_end_matches('/').to_string())
            .collect::<BTreeSet<_>>()
    };
    let want = norm(&spec.unschedulable_disks);
    let allow = spec.allows_scheduling();
    (allow != local.allow_scheduling || want != norm(&local.unschedulable_disks)).then(|| {
        pb::SetNodeSchedulingRequest {
            allow_scheduling: allow,
            unschedulable_disks: want.into_iter().collect(),
        }
    })
}

/// What membership changes the `Node` objects ask of the local `cairnd`:
/// addresses to add, member names to remove.
pub fn membership_changes(
    me: &str,
    published: &[(String, String)],
    members: &[pb::ClusterNode],
) -> (Vec<String>, Vec<String>) {
    let known: BTreeSet<&str> = members.iter().map(|m| m.addr.as_str()).collect();
    let add = published
        .iter()
        .filter(|(name, addr)| name != me && !addr.is_empty() && !known.contains(addr.as_str()))
        .map(|(_, addr)| addr.clone())
        .collect();
    let names: BTreeSet<&str> = published.iter().map(|(n, _)| n.as_str()).collect();
    if !names.contains(me) {
        // A list without this node's own object (just published) is not
        // the cluster's: remove nothing on its word.
        return (add, Vec::new());
    }
    let remove = members
        .iter()
        .filter(|m| !m.local && !m.name.is_empty() && !names.contains(m.name.as_str()))
        .map(|m| m.name.clone())
        .collect();
    (add, remove)
}

/// One pass: publish this node, then bring `cairnd`'s membership in line.
pub async fn pass(ctx: &Context, replica_addr: &str) -> Result<(), Error> {
    let started = Instant::now();
    let result = pass_inner(ctx, replica_addr).await;
    ctx.metrics
        .reconciled("node", started.elapsed(), result.as_ref().err());
    result
}

async fn pass_inner(ctx: &Context, replica_addr: &str) -> Result<(), Error> {
    let mut c = ctx.cairnd.client().await?;
    let api: Api<Node> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let kube_nodes: Api<KubeNode> = Api::all(ctx.client.clone());
    let owner = kube_nodes.get_opt(&ctx.node).await?.and_then(|n| {
        n.metadata.uid.map(|uid| OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: ctx.node.clone(),
            uid,
            ..Default::default()
        })
    });
    let pp = PatchParams::apply(&manager_name(&ctx.node)).force();
    let mut meta = json!({ "name": ctx.node });
    if let Some(o) = owner {
        meta["ownerReferences"] = json!([o]);
    }
    // The apply claims no spec field: `spec` is the operator's.
    let published = api
        .patch(
            &ctx.node,
            &pp,
            &Patch::Apply(&json!({
                "apiVersion": "cairn.io/v1alpha1",
                "kind": "Node",
                "metadata": meta,
                "spec": {},
            })),
        )
        .await?;
    let mut local = c
        .get_node(pb::GetNodeRequest {})
        .await
        .map_err(Error::cairnd("node get"))?
        .into_inner();
    let mut refused = String::new();
    if let Some(req) = scheduling_change(&published.spec, &local) {
        let allow = req.allow_scheduling;
        match c.set_node_scheduling(req).await {
            Ok(n) => {
                local = n.into_inner();
                tracing::info!(allow, disks = ?local.unschedulable_disks, "node scheduling applied from the Node object");
            }
            Err(s) => {
                tracing::warn!(error = %s.message(), "the Node object's scheduling spec was refused");
                refused = format!("spec refused: {}", s.message());
            }
        }
    }
    let members = c
        .list_nodes(pb::ListNodesRequest {})
        .await
        .map_err(Error::cairnd("node list"))?
        .into_inner()
        .nodes;
    let mut status = status_from(&local, &members, replica_addr);
    status.message = refused;
    api.patch_status(
        &ctx.node,
        &pp,
        &Patch::Apply(&json!({
            "apiVersion": "cairn.io/v1alpha1",
            "kind": "Node",
            "status": status,
        })),
    )
    .await?;

    let published: Vec<(String, String)> = api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|n| {
            (
                n.name_any(),
                n.status
                    .as_ref()
                    .map(|s| s.replica_address.clone())
                    .unwrap_or_default(),
            )
        })
        .collect();
    let (add, remove) = membership_changes(&ctx.node, &published, &members);
    for addr in add {
        match c.add_node(pb::AddNodeRequest { addr: addr.clone() }).await {
            Ok(_) => tracing::info!(%addr, "peer added to cairnd's membership"),
            Err(s) => tracing::warn!(%addr, error = %s.message(), "cannot add the peer yet"),
        }
    }
    for node in remove {
        match c
            .remove_node(pb::RemoveNodeRequest { node: node.clone() })
            .await
        {
            Ok(_) => {
                tracing::info!(%node, "node gone from Kubernetes: removed from cairnd's membership")
            }
            Err(s) => {
                tracing::info!(%node, reason = %s.message(), "node gone from Kubernetes: kept while it holds replicas")
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn member(name: &str, addr: &str, local: bool) -> pb::ClusterNode {
        pb::ClusterNode {
            name: name.into(),
            addr: addr.into(),
            local,
            ..Default::default()
        }
    }

    #[test]
    fn membership_follows_the_published_nodes() {
        let members = [
            member("n1", "10.0.0.1:9500", true),
            member("n2", "10.0.0.2:9500", false),
            member("gone", "10.0.0.9:9500", false),
        ];
        let published = [
            ("n1".to_string(), "10.0.0.1:9500".to_string()),
            ("n2".to_string(), "10.0.0.2:9500".to_string()),
            ("n3".to_string(), "10.0.0.3:9500".to_string()),
            ("n4".to_string(), String::new()),
        ];
        let (add, remove) = membership_changes("n1", &published, &members);
        assert_eq!(add, ["10.0.0.3:9500"]);
        assert_eq!(remove, ["gone"]);
        // A list that lacks this node removes nothing.
        let (_, remove) = membership_changes("n1", &published[1..], &members);
        assert!(remove.is_empty());
    }

    #[test]
    fn the_scheduling_spec_is_applied_only_when_it_differs() {
        let local = |allow: bool, disks: &[&str]| pb::Node {
            allow_scheduling: allow,
            unschedulable_disks: disks.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        };
        let spec = |allow: Option<bool>, disks: &[&str]| NodeSpec {
            allow_scheduling: allow,
            unschedulable_disks: disks.iter().map(|d| d.to_string()).collect(),
        };
        // An empty spec is "schedulable": nothing to do on a default node.
        assert_eq!(scheduling_change(&spec(None, &[]), &local(true, &[])), None);
        // ... but it lifts a rule set earlier.
        let r = scheduling_change(&spec(None, &[]), &local(false, &["/d1"])).unwrap();
        assert!(r.allow_scheduling && r.unschedulable_disks.is_empty());
        let r = scheduling_change(&spec(Some(false), &[]), &local(true, &[])).unwrap();
        assert!(!r.allow_scheduling);
        // Disk lists compare as sets of paths, trailing '/' aside.
        assert_eq!(
            scheduling_change(&spec(None, &["/d2/", "/d1"]), &local(true, &["/d1", "/d2"])),
            None
        );
        let r = scheduling_change(&spec(None, &["/d2", "/d2/"]), &local(true, &[])).unwrap();
        assert_eq!(r.unschedulable_disks, ["/d2"]);
    }
}
