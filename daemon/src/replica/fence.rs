//! Fencing: a replica accepts writes only from its current owner session.
//!
//! Every replica persists an *owner generation* in `volume.meta`. An engine
//! that starts using a replica (attach, adopt, salvage, rebuild) first
//! *claims* it, which persists a generation one higher than the stored one
//! and makes that the replica's only live session. Every older session is
//! fenced at once: its `fenced` flag is set, its transport is shut (the
//! replica server closes that connection), and the claim waits until the
//! requests it had already admitted have finished before it answers. From
//! then on nothing an older session sends reaches the replica's files: a
//! late packet from a dead connection, a stalled server thread, or a second
//! engine that still believes it owns the volume.
//!
//! An engine's many connections to one replica (one per ublk queue, plus
//! blocking ones for rebuild and control) share a session: the first claims,
//! the others *join* the generation it got, which succeeds only while it is
//! still the current one.
//!
//! Admission is two atomics on the session's own cache line, never a lock:
//! [`Session::enter`] bumps the in-flight count and then checks the flag;
//! the claim sets the flag and then waits for the count to drain. With
//! sequentially consistent operations either the request sees the flag or
//! the claim sees the request (Dekker), so no admitted request outlives a
//! claim that fenced it.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

/// Which node owns a volume, and since which move. Every replica persists
/// the ownership of the last claim that took it over; a takeover claim is
/// accepted only from the same node at the same term or from a later term
/// (see [`OwnerTerm::may_take_over`]). A volume's term goes up by one at
/// every handover and forced takeover, so an old owner that comes back
/// (restarted, or healed from a partition) cannot take back a replica the
/// new owner holds: the term it claims with is behind the replica's.
#[derive(Debug, Clone, Default, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct OwnerTerm {
    /// 0 for replicas and engines from before ownership moved (no check).
    pub term: u64,
    /// The owner node's name; empty when unknown (term 0).
    pub node: String,
}

impl OwnerTerm {
    pub fn new(term: u64, node: &str) -> OwnerTerm {
        OwnerTerm {
            term,
            node: node.to_string(),
        }
    }

    /// Whether a takeover claim by `self` may replace the ownership
    /// `stored` a replica persisted: a later term, or the same term from
    /// the same node (or from nobody known).
    pub fn may_take_over(&self, stored: &OwnerTerm) -> bool {
        self.term > stored.term
            || (self.term == stored.term && (stored.node.is_empty() || stored.node == self.node))
    }
}

impl std::fmt::Display for OwnerTerm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.node.is_empty() {
            write!(f, "term {}", self.term)
        } else {
            write!(f, "node {} at term {}", self.node, self.term)
        }
    }
}

/// How a caller wants to become (or join) a replica's owner session.
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub enum Claim {
    /// A new owner takes the replica over whatever session held it (attach,
    /// adopt, a forced takeover): the stored generation + 1. Refused when
    /// the replica was taken over at a later term (or by another node at
    /// the same term): that owner holds it now.
    Takeover { owner: OwnerTerm },
    /// The owner that holds generation `expect` starts a new session (a
    /// rebuild or reconnect after the replica left the set). Refused when
    /// the stored generation is not `expect`: someone else took it over.
    Renew { expect: u64 },
    /// Another connection of the session holding `generation`.
    Join { generation: u64 },
    /// No session: the connection may list and read layers (backups, chain
    /// listings) but every admitted op (data, revision, chain change) is
    /// refused. Fences nobody.
    Observe,
}

/// Why a claim or a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    #[error("replica {replica}: fenced: generation {asked} is not the owner generation {current}; another engine owns the volume now")]
    Fenced {
        replica: String,
        asked: u64,
        current: u64,
    },
    #[error("replica {replica}: taken over by {stored} (this claim: {asked}); the volume moved to another node, so this node must not use it")]
    TakenOver {
        replica: String,
        asked: OwnerTerm,
        stored: OwnerTerm,
    },
    #[error("replica {replica}: the previous owner session still has requests in flight after {waited:?}; try again")]
    Draining { replica: String, waited: Duration },
}

/// What a session does when it is fenced: the replica server shuts the
/// connection, a local engine stops admitting writes and drains the ones it
/// has in flight. Must not take locks the claimer holds.
pub type OnFence = Box<dyn Fn() + Send + Sync>;

/// One owner session's handle on a replica.
pub struct Session {
    generation: u64,
    fenced: AtomicBool,
    inflight: AtomicU32,
    on_fence: Mutex<Option<OnFence>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("generation", &self.generation)
            .field("fenced", &self.is_fenced())
            .finish()
    }
}

/// An admitted request: the session's in-flight count is held until drop.
pub struct Admitted<'a>(&'a Session);

impl Drop for Admitted<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Session {
    fn new(generation: u64) -> Session {
        Session {
            generation,
            fenced: AtomicBool::new(false),
            inflight: AtomicU32::new(0),
            on_fence: Mutex::new(None),
        }
    }

    /// A session that admits nothing (see [`Claim::Observe`]).
    pub(crate) fn observer(generation: u64) -> Arc<Session> {
        let s = Session::new(generation);
        s.fenced.store(true, Ordering::SeqCst);
        Arc::new(s)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Admits one request, or `None` once the session is fenced.
    #[inline]
    pub fn enter(&self) -> Option<Admitted<'_>> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        if self.fenced.load(Ordering::SeqCst) {
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Admitted(self))
    }

    /// What to do when a newer claim fences this session (replaces any
    /// earlier hook). Runs at once if the session is already fenced.
    pub fn set_on_fence(&self, f: OnFence) {
        let mut slot = self.on_fence.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_fenced() {
            drop(slot);
            f();
            return;
        }
        *slot = Some(f);
    }

    /// Ends the session without a hook (its owner let go of the replica).
    pub fn release(&self) {
        self.on_fence
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.fenced.store(true, Ordering::SeqCst);
    }

    fn fence(&self) {
        self.fenced.store(true, Ordering::SeqCst);
        let hook = self
            .on_fence
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(f) = hook {
            f();
        }
    }

    fn drained(&self) -> bool {
        self.inflight.load(Ordering::SeqCst) == 0
    }
}

/// The live sessions of one replica. The generation itself lives in the
/// replica's `volume.meta` (see `Replica::claim`).
#[derive(Default)]
pub(crate) struct Sessions {
    live: Mutex<Vec<Weak<Session>>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sessions")
    }
}

/// How long a claim waits for a fenced session's admitted requests.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

impl Sessions {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Session>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new session at `generation`, registered as live.
    pub(crate) fn add(live: &mut Vec<Weak<Session>>, generation: u64) -> Arc<Session> {
        let s = Arc::new(Session::new(generation));
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(&s));
        s
    }

    /// Fences every live session older than `generation` and waits for the
    /// requests they admitted to finish.
    pub(crate) fn fence_older(
        live: &mut Vec<Weak<Session>>,
        generation: u64,
        replica: &str,
    ) -> Result<(), FenceError> {
        let older: Vec<Arc<Session>> = live
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|s| s.generation < generation)
            .collect();
        for s in &older {
            s.fence();
        }
        let since = Instant::now();
        for s in &older {
            while !s.drained() {
                if since.elapsed() > DRAIN_TIMEOUT {
                    return Err(FenceError::Draining {
                        replica: replica.to_string(),
                        waited: since.elapsed(),
                    });
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        live.retain(|w| w.upgrade().is_some_and(|s| s.generation >= generation));
        if !older.is_empty() {
            tracing::warn!(%replica, generation, fenced = older.len(), "older owner sessions fenced");
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_a_later_term_or_the_same_owner_takes_over() {
        let n1 = OwnerTerm::new(2, "n1");
        assert!(
            n1.may_take_over(&OwnerTerm::default()),
            "an unowned replica"
        );
        assert!(
            n1.may_take_over(&OwnerTerm::new(2, "n1")),
            "its own owner again"
        );
        assert!(n1.may_take_over(&OwnerTerm::new(1, "n2")), "an older term");
        assert!(
            !n1.may_take_over(&OwnerTerm::new(2, "n2")),
            "another node, same term"
        );
        assert!(!n1.may_take_over(&OwnerTerm::new(3, "n2")), "a later term");
        assert!(!OwnerTerm::default().may_take_over(&OwnerTerm::new(1, "n1")));
    }

    #[test]
    fn fenced_session_admits_nothing_and_runs_its_hook_once() {
        let s = Sessions::default();
        let mut live = s.lock();
        let old = Sessions::add(&mut live, 1);
        let hits = Arc::new(AtomicU32::new(0));
        let h = hits.clone();
        old.set_on_fence(Box::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        }));
        assert!(old.enter().is_some());
        Sessions::fence_older(&mut live, 2, "r").unwrap();
        assert!(old.enter().is_none());
        Sessions::fence_older(&mut live, 3, "r").unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn claim_waits_for_admitted_requests() {
        let s = Arc::new(Sessions::default());
        let old = Sessions::add(&mut s.lock(), 1);
        let (tx, rx) = std::sync::mpsc::channel();
        let o = old.clone();
        let t = std::thread::spawn(move || {
            let g = o.enter().unwrap();
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(150));
            drop(g);
            Instant::now()
        });
        rx.recv().unwrap();
        Sessions::fence_older(&mut s.lock(), 2, "r").unwrap();
        let fenced_at = Instant::now();
        let released_at = t.join().unwrap();
        assert!(
            fenced_at >= released_at,
            "the claim answered before the admitted request ended"
        );
    }

    #[test]
    fn same_generation_sessions_survive() {
        let s = Sessions::default();
        let mut live = s.lock();
        let a = Sessions::add(&mut live, 4);
        Sessions::fence_older(&mut live, 4, "r").unwrap();
        assert!(a.enter().is_some());
    }
}
