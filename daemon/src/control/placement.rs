//! Placement: which of this node's disks get a new volume's replicas.
//!
//! Rule: every replica of a volume on a different disk (two replicas on one
//! disk would die together), preferring the disks holding the fewest replicas
//! so space and I/O spread out; ties go to the disk listed first, so placement
//! is deterministic.

use std::path::PathBuf;

use super::ControlError;

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
