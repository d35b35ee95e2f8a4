//! The per-node controller: watches the `cairn.io` objects and drives the
//! local `cairnd` through its socket. One runs on every node, next to that
//! node's `cairnd`.
//!
//! * [`volume`]: `Volume` objects ⇄ volumes (create, grow, delete behind a
//!   finalizer, status written back). Any node's `cairnd` answers for every
//!   volume (it forwards to the owner), so one controller does this work:
//!   the holder of the [`leader`] lease.
//! * [`setting`]: every `Setting` and the `default` `BackupTarget` are
//!   applied by each node's controller to its own `cairnd`; each writes its
//!   own entry of the object's `status.nodes`.
//! * [`node`]: publishes this node's `Node` object and feeds every other
//!   `Node`'s replica address to the local `cairnd` (its membership).
//! * [`mirror`] (lease holder): `Volume` objects for volumes made
//!   elsewhere (the CSI driver), the PersistentVolume each serves, and
//!   read-only `BackupVolume`/`Backup` mirrors of the backup target;
//!   `Backup` objects take and delete backups.
//! * [`secret`]: the install-time cluster secret.
//! * [`metrics`]: reconcile counts, failures and durations (Prometheus).

pub mod leader;
pub mod metrics;
pub mod mirror;
pub mod node;
pub mod secret;
pub mod setting;
pub mod volume;

use std::path::PathBuf;
use std::sync::Arc;

use cairn_api::pb::cairn_client::CairnClient;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Resource;
use tonic::transport::Channel;

/// The field manager of this node's controller in server-side apply.
pub fn manager_name(node: &str) -> String {
    format!("cairn-controller-{node}")
}

/// What goes wrong in a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Connect(#[from] cairn_api::ConnectError),
    #[error("cairnd, {what}: {} ({:?})", status.message(), status.code())]
    Cairnd { what: String, status: tonic::Status },
    /// The object asks for something that cannot be done as it stands;
    /// retrying will not help until it changes.
    #[error("{0}")]
    Invalid(String),
    /// Refused for now (e.g. deleting an attached volume); retried.
    #[error("{0}")]
    Refused(String),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("serializing: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    pub(crate) fn cairnd(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> Error {
        let what = what.into();
        move |status| Error::Cairnd { what, status }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Connect(_) => "connect",
            Error::Cairnd { .. } => "cairnd",
            Error::Invalid(_) => "invalid",
            Error::Refused(_) => "refused",
            Error::Finalizer(_) => "finalizer",
            Error::Json(_) => "json",
        }
    }
}

impl From<kube::runtime::finalizer::Error<Error>> for Error {
    /// The reconcile's own error when it failed, else the finalizer's.
    fn from(e: kube::runtime::finalizer::Error<Error>) -> Error {
        use kube::runtime::finalizer::Error as F;
        match e {
            F::ApplyFailed(e) | F::CleanupFailed(e) => e,
            other => Error::Finalizer(other.to_string()),
        }
    }
}

/// The local `cairnd`'s socket.
#[derive(Debug, Clone)]
pub struct Cairnd {
    pub socket: PathBuf,
}

impl Cairnd {
    pub async fn client(&self) -> Result<CairnClient<Channel>, Error> {
        Ok(cairn_api::connect(&self.socket).await?)
    }
}

/// Where backup-target credentials go unless told otherwise.
pub const DEFAULT_CREDENTIALS_DIR: &str = "/run/cairn/backup-credentials";

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub cairnd: Cairnd,
    /// This node's name (the Kubernetes node name, which is `cairnd`'s).
    pub node: String,
    /// The install namespace: every `cairn.io` object lives there.
    pub namespace: String,
    pub metrics: Arc<metrics::Metrics>,
    pub recorder: Recorder,
    /// Where backup-target credentials are written for `cairnd` (a
    /// directory both containers mount).
    pub credentials_dir: PathBuf,
}

impl Context {
    pub fn new(
        client: kube::Client,
        cairnd: Cairnd,
        node: &str,
        namespace: &str,
        metrics: Arc<metrics::Metrics>,
    ) -> Context {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "cairn-controller".into(),
                instance: Some(node.to_string()),
            },
        );
        Context {
            client,
            cairnd,
            node: node.to_string(),
            namespace: namespace.to_string(),
            metrics,
            recorder,
            credentials_dir: PathBuf::from(DEFAULT_CREDENTIALS_DIR),
        }
    }

    pub fn credentials_dir(&self) -> PathBuf {
        self.credentials_dir.clone()
    }

    /// Publishes a Kubernetes Event about `obj` (best effort: a failure to
    /// record is logged, never fails the reconcile).
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(reason, error = %e, "cannot record an event");
        }
    }
}
