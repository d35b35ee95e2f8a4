//! Volumes made from another volume's data: `volume create NAME
//! --from-snapshot VOLUME/SNAPSHOT` and `--from-volume VOLUME` (a clone: a
//! snapshot of the source is taken first).
//!
//! The new volume is created (its replicas placed as for any volume), then
//! the snapshot's data is copied onto every one of its replicas from a
//! healthy replica of the source: a local one read through its open files,
//! else one on another node read layer by layer over the peer protocol (the
//! readers backups use). The new volume's lock is held from its creation to
//! the end of the copy, and the copy shows as restore progress in `volume
//! get`: it cannot be attached before the copy is complete. A copy that
//! fails deletes the new volume. The source snapshot cannot be deleted
//! while it is copied (`SnapshotBusy`).

use std::sync::Arc;

use super::{ControlError, VolumeInfo, VolumeManager};
use crate::backupstore::Progress;

/// Bytes read from the source and written to the new replicas at a time.
const COPY_CHUNK: usize = 1 << 20;

/// Where a new volume's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloneSource {
    /// A snapshot of a volume of this node.
    Snapshot { volume: String, snapshot: String },
    /// A volume of this node: a snapshot of it is taken first.
    Volume { volume: String },
}

impl CloneSource {
    /// `--from-snapshot VOLUME/SNAPSHOT` or `--from-volume VOLUME` (at most
    /// one of the two non-empty); `None` when both are empty.
    pub fn parse(from_snapshot: &str, from_volume: &str) -> Result<Option<Self>, ControlError> {
        match (from_snapshot.is_empty(), from_volume.is_empty()) {
            (true, true) => Ok(None),
            (false, false) => Err(ControlError::BadCloneSource(
                "give --from-snapshot or --from-volume, not both".into(),
            )),
            (true, false) => {
                crate::name::validate_volume_name(from_volume)?;
                Ok(Some(CloneSource::Volume {
                    volume: from_volume.to_string(),
                }))
            }
            (false, true) => {
                let split = from_snapshot
                    .split_once('/')
                    .filter(|(_, s)| !s.is_empty() && !s.contains('/'));
                let Some((volume, snapshot)) = split else {
                    return Err(ControlError::BadCloneSource(format!(
                        "--from-snapshot {from_snapshot:?}: give VOLUME/SNAPSHOT, e.g. db/nightly"
                    )));
                };
                crate::name::validate_volume_name(volume)?;
                Ok(Some(CloneSource::Snapshot {
                    volume: volume.to_string(),
                    snapshot: snapshot.to_string(),
                }))
            }
        }
    }

    /// The source volume.
    pub fn volume(&self) -> &str {
        match self {
            CloneSource::Snapshot { volume, .. } | CloneSource::Volume { volume } => volume,
        }
    }
}

impl VolumeManager {
    /// Creates volume `name` holding the data of `from` (see the module
    /// docs). `size` 0 means the source's size; a smaller one is refused.
    pub async fn create_clone(
        &self,
        name: &str,
        size: u64,
        replicas: Option<u32>,
        from: &CloneSource,
    ) -> Result<VolumeInfo, ControlError> {
        crate::name::validate_volume_name(name)?;
        let inner = &self.inner;
        let source = from.volume().to_string();
        let source_size = {
            let st = inner.state.lock().await;
            let v = st.volume(&source)?;
            if v.record.standby {
                return Err(ControlError::Standby {
                    name: source.clone(),
                    what: "be cloned (activate it first)",
                });
            }
            v.record.size
        };
        let size = if size == 0 { source_size } else { size };
        if size < source_size {
            return Err(ControlError::CloneTooSmall {
                size,
                from: source.clone(),
                from_size: source_size,
            });
        }
        if inner.state.lock().await.volumes.contains_key(name) {
            return Err(ControlError::AlreadyExists {
                name: name.to_string(),
            });
        }
        let snapshot = match from {
            CloneSource::Snapshot { snapshot, .. } => {
                self.check_snapshot(&source, snapshot).await?;
                snapshot.clone()
            }
            CloneSource::Volume { .. } => {
                let mut labels = std::collections::BTreeMap::new();
                labels.insert("cairn.io/clone".to_string(), name.to_string());
                self.snapshot_create(&source, None, labels).await?.name
            }
        };
        let key = (source.clone(), snapshot.clone());
        inner.copying().push(key.clone());
        let result = self
            .create_and_copy(name, size, replicas, &source, &snapshot)
            .await;
        inner.copying().retain(|k| *k != key);
        result
    }

    async fn create_and_copy(
        &self,
        name: &str,
        size: u64,
        replicas: Option<u32>,
        source: &str,
        snapshot: &str,
    ) -> Result<VolumeInfo, ControlError> {
        let inner = &self.inner;
        // Held from the creation to the end of the copy: nothing attaches
        // (or deletes) the new volume meanwhile.
        let op = inner.volume_lock(name).await;
        self.create_locked(name, size, replicas, "").await?;
        let progress = Arc::new(Progress::new());
        inner
            .restores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), progress.clone());
        let what = format!("copy of {source}/{snapshot}");
        let copied = async {
            {
                let mut st = inner.state.lock().await;
                let v = st.volume_mut(name)?;
                v.record.restoring = Some(what.clone());
                inner.store.save(&v.record)?;
            }
            let reader = inner.backup_reader(source).await?;
            let snap = snapshot.to_string();
            let (from, ranges) = tokio::task::spawn_blocking(move || {
                super::backups::open_snapshot_source(reader, &snap)
            })
            .await??;
            let sink = inner.replica_sink(name).await?;
            let p = progress.clone();
            let bytes = tokio::task::spawn_blocking(move || -> Result<u64, ControlError> {
                p.set_total(ranges.iter().map(|(_, len)| len).sum());
                let mut buf = vec![0u8; COPY_CHUNK];
                for (start, len) in ranges {
                    let mut at = start;
                    let end = start + len;
                    while at < end {
                        let n = ((end - at) as usize).min(COPY_CHUNK);
                        let chunk = &mut buf[..n];
                        from.read_at(at, chunk).map_err(|e| {
                            ControlError::Internal(format!("reading the source at {at}: {e}"))
                        })?;
                        crate::backupstore::store::BlockSink::write_at(&sink, at, chunk).map_err(
                            |e| ControlError::Internal(format!("writing the copy at {at}: {e}")),
                        )?;
                        p.add_done(n as u64);
                        at += n as u64;
                    }
                }
                sink.flush()
                    .map_err(|e| ControlError::Internal(format!("flushing the copy: {e}")))?;
                Ok(p.done())
            })
            .await??;
            let mut st = inner.state.lock().await;
            let v = st.volume_mut(name)?;
            v.record.restoring = None;
            inner.store.save(&v.record)?;
            inner.publish(&st);
            Ok::<u64, ControlError>(bytes)
        }
        .await;
        inner
            .restores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        match copied {
            Ok(bytes) => {
                tracing::info!(
                    volume = name,
                    source,
                    snapshot,
                    bytes,
                    "volume copied from a snapshot"
                );
                drop(op);
                self.get(name).await
            }
            Err(e) => {
                tracing::warn!(volume = name, source, snapshot, error = %e, "copy failed; removing the new volume");
                drop(op);
                if let Err(d) = self.delete(name, true).await {
                    tracing::error!(volume = name, error = %d, "cannot remove the half-copied volume");
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_and_bad_ones_say_what_to_give() {
        assert_eq!(CloneSource::parse("", "").ok(), Some(None));
        assert_eq!(
            CloneSource::parse("db/s1", "").ok().flatten(),
            Some(CloneSource::Snapshot {
                volume: "db".into(),
                snapshot: "s1".into()
            })
        );
        assert_eq!(
            CloneSource::parse("", "db").ok().flatten(),
            Some(CloneSource::Volume {
                volume: "db".into()
            })
        );
        for (s, v) in [
            ("db", ""),
            ("db/", ""),
            ("db/a/b", ""),
            ("db/s1", "db"),
            ("Bad_Name/s", ""),
        ] {
            let e = CloneSource::parse(s, v).err().map(|e| e.to_string());
            assert!(e.is_some(), "{s:?} {v:?} accepted");
        }
    }
}
