//! Placement: where a new volume's (or a replacement) replicas go.
//!
//! Standalone node ([`place`]): every replica of a volume on a different
//! disk (two replicas on one disk would die together), preferring the disks
//! holding the fewest replicas so space and I/O spread out; ties go to the
//! disk listed first, so placement is deterministic.
//!
//! Cluster ([`place_nodes`]): hard anti-affinity by default — each replica
//! on a different node that is up and has a disk passing the scheduling rule
//! (over-provisioning and minimal-available percentages, `disks::disk_fits`).
//! With soft anti-affinity, replicas that find no free node share a node,
//! at most one per fitting disk there. This node comes first (a local
//! replica serves reads without a network hop), then the least allocated.

use std::path::PathBuf;

use super::ControlError;
use crate::disks::disk_fits;
use crate::transport::DiskReport;

/// A node as cluster placement sees it.
#[derive(Debug, Clone)]
pub struct NodeCandidate {
    pub name: String,
    pub local: bool,
    pub up: bool,
    pub disks: Vec<DiskReport>,
}

/// The placement settings.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub soft_anti_affinity: bool,
    pub over_provisioning: u32,
    pub min_available: u32,
}

/// Picks nodes for `count` new replicas of `size` bytes. `taken` names nodes
/// that already hold a replica of the volume. Errors without side effects.
pub fn place_nodes(
    volume: &str,
    count: u32,
    size: u64,
    nodes: &[NodeCandidate],
    taken: &[String],
    rules: Rules,
) -> Result<Vec<String>, ControlError> {
    let fitting = |n: &NodeCandidate| {
        if !n.up {
            return 0;
        }
        n.disks
            .iter()
            .filter(|d| disk_fits(d, size, rules.over_provisioning, rules.min_available))
            .count()
    };
    let mut order: Vec<&NodeCandidate> = nodes.iter().filter(|n| fitting(n) > 0).collect();
    order.sort_by_key(|n| (!n.local, n.disks.iter().map(|d| d.allocated).sum::<u64>()));
    let mut chosen: Vec<String> = Vec::new();
    for n in &order {
        if chosen.len() == count as usize {
            break;
        }
        if !taken.contains(&n.name) {
            chosen.push(n.name.clone());
        }
    }
    if chosen.len() < count as usize && rules.soft_anti_affinity {
        // Share nodes, one replica per fitting disk.
        'outer: loop {
            let before = chosen.len();
            for n in &order {
                if chosen.len() == count as usize {
                    break 'outer;
                }
                let used = chosen.iter().chain(taken).filter(|c| **c == n.name).count();
                if used < fitting(n) {
                    chosen.push(n.name.clone());
                }
            }
            if chosen.len() == before {
                break;
            }
        }
    }
    if chosen.len() < count as usize {
        let free = || nodes.iter().filter(|n| !taken.contains(&n.name));
        return Err(ControlError::NotEnoughNodes {
            volume: volume.to_string(),
            wanted: count,
            eligible: order.iter().filter(|n| !taken.contains(&n.name)).count(),
            soft: rules.soft_anti_affinity,
            size,
            no_room: free().filter(|n| n.up && fitting(n) == 0).count(),
            down: free().filter(|n| !n.up).count(),
        });
    }
    Ok(chosen)
}

/// A disk as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLoad {
    pub path: PathBuf,
    /// Replicas of any volume already on the disk.
    pub replicas: usize,
}

/// Picks `count` distinct disks for `volume`; errors without side effects when
/// the node has fewer disks than that.
pub fn place(volume: &str, count: u32, disks: &[DiskLoad]) -> Result<Vec<PathBuf>, ControlError> {
    if count as usize > disks.len() {
        return Err(ControlError::NotEnoughDisks {
            volume: volume.to_string(),
            wanted: count,
            disks: disks.len(),
        });
    }
    let mut order: Vec<&DiskLoad> = disks.iter().collect();
    // Stable sort: equal loads keep the configured order.
    order.sort_by_key(|d| d.replicas);
    Ok(order
        .into_iter()
        .take(count as usize)
        .map(|d| d.path.clone())
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn disks(loads: &[usize]) -> Vec<DiskLoad> {
        loads
            .iter()
            .enumerate()
            .map(|(i, &n)| DiskLoad {
                path: format!("/d{i}").into(),
                replicas: n,
            })
            .collect()
    }

    #[test]
    fn distinct_disks_least_loaded_first() {
        let d = disks(&[2, 0, 1]);
        assert_eq!(
            place("v", 2, &d).unwrap(),
            vec![PathBuf::from("/d1"), PathBuf::from("/d2")]
        );
        assert_eq!(place("v", 3, &d).unwrap().len(), 3);
        let all = place("v", 3, &d).unwrap();
        let mut dedup = all.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), all.len(), "replicas share a disk: {all:?}");
    }

    #[test]
    fn ties_keep_configured_order() {
        assert_eq!(
            place("v", 1, &disks(&[0, 0])).unwrap(),
            vec![PathBuf::from("/d0")]
        );
    }

    fn node(name: &str, local: bool, up: bool, disks: &[(u64, u64, u64)]) -> NodeCandidate {
        NodeCandidate {
            name: name.into(),
            local,
            up,
            disks: disks
                .iter()
                .map(|&(size, available, allocated)| DiskReport {
                    path: "/d".into(),
                    size,
                    available,
                    allocated,
                    replicas: 0,
                    schedulable: true,
                })
                .collect(),
        }
    }

    const G: u64 = 1 << 30;
    const HARD: Rules = Rules {
        soft_anti_affinity: false,
        over_provisioning: 100,
        min_available: 25,
    };

    #[test]
    fn hard_anti_affinity_distinct_nodes_local_first() {
        let nodes = vec![
            node("b", false, true, &[(100 * G, 90 * G, 10 * G)]),
            node("a", true, true, &[(100 * G, 90 * G, 50 * G)]),
            node("c", false, true, &[(100 * G, 90 * G, 0)]),
            node("down", false, false, &[(100 * G, 90 * G, 0)]),
        ];
        assert_eq!(
            place_nodes("v", 3, G, &nodes, &[], HARD).unwrap(),
            vec!["a", "c", "b"]
        );
        let e = place_nodes("v", 4, G, &nodes, &[], HARD)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("wants 4 replicas but only 3 nodes can take one")
                && e.ends_with("; 1 node(s) are down"),
            "{e}"
        );
        // A replacement avoids nodes that hold the volume already.
        assert_eq!(
            place_nodes("v", 1, G, &nodes, &["a".into(), "c".into()], HARD).unwrap(),
            vec!["b"]
        );
    }

    #[test]
    fn scheduling_rules_exclude_full_disks() {
        let nodes = vec![
            node("a", true, true, &[(100 * G, 10 * G, 0)]), // below 25 % free
            node("b", false, true, &[(100 * G, 90 * G, 95 * G)]), // promised too much
            node("c", false, true, &[(100 * G, 90 * G, 0)]),
        ];
        assert_eq!(
            place_nodes("v", 1, 10 * G, &nodes, &[], HARD).unwrap(),
            vec!["c"]
        );
        let e = place_nodes("v", 2, 10 * G, &nodes, &[], HARD)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("only 1 nodes can take one")
                && e.contains("2 up node(s) have no disk with room for 10737418240 more bytes")
                && !e.contains("down"),
            "{e}"
        );
        let lax = Rules {
            over_provisioning: 200,
            min_available: 5,
            ..HARD
        };
        assert_eq!(
            place_nodes("v", 3, 10 * G, &nodes, &[], lax).unwrap().len(),
            3
        );
    }

    #[test]
    fn soft_anti_affinity_shares_nodes_per_disk() {
        let nodes = vec![
            node(
                "a",
                true,
                true,
                &[(100 * G, 90 * G, 0), (100 * G, 90 * G, 0)],
            ),
            node("b", false, true, &[(100 * G, 90 * G, 0)]),
        ];
        let soft = Rules {
            soft_anti_affinity: true,
            ..HARD
        };
        assert_eq!(
            place_nodes("v", 3, G, &nodes, &[], soft).unwrap(),
            vec!["a", "b", "a"]
        );
        let e = place_nodes("v", 4, G, &nodes, &[], soft)
            .unwrap_err()
            .to_string();
        assert!(e.contains("soft anti-affinity"), "{e}");
        assert!(place_nodes("v", 3, G, &nodes, &[], HARD).is_err());
    }

    #[test]
    fn more_replicas_than_disks_is_an_error() {
        let e = place("db", 3, &disks(&[0, 0])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "volume \"db\" wants 3 replicas but this node has 2 disks: lower --replicas or start cairnd with more --disk"
        );
        let e = place("db", 2, &disks(&[0])).unwrap_err();
        assert!(e.to_string().contains("has 1 disk:"), "{e}");
    }
}
