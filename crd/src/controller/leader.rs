//! Leader election over a `coordination.k8s.io` Lease, the Kubernetes way
//! (client-go's leaderelection): the API server's optimistic concurrency
//! (resourceVersion) decides who holds it; the holder renews it every
//! [`RENEW`]; another takes it once it is [`LEASE`] old. Only the holder
//! runs the cluster-wide reconciles (`Volume`s).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

use super::Error;

pub const LEASE_NAME: &str = "cairn-controller";
pub const LEASE: Duration = Duration::from_secs(15);
pub const RENEW: Duration = Duration::from_secs(5);

/// One attempt to take or keep the lease: whether `me` holds it after.
pub async fn try_acquire(api: &Api<Lease>, me: &str) -> Result<bool, Error> {
    let now = MicroTime(Timestamp::now());
    let spec = |transitions: i32| LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(LEASE.as_secs() as i32),
        acquire_time: Some(now.clone()),
        renew_time: Some(now.clone()),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
        let fresh = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                ..Default::default()
            },
            spec: Some(spec(0)),
        };
        return match api.create(&PostParams::default(), &fresh).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        };
    };
    let current = lease.spec.clone().unwrap_or_default();
    let holder = current.holder_identity.clone().unwrap_or_default();
    let expired = current.renew_time.as_ref().is_none_or(|t| {
        let age = Timestamp::now().duration_since(t.0);
        age.as_millis() as i64
            > i64::from(
                current
                    .lease_duration_seconds
                    .unwrap_or(LEASE.as_secs() as i32),
            ) * 1000
    });
    if holder != me && !holder.is_empty() && !expired {
        return Ok(false);
    }
    let mut next = spec(current.lease_transitions.unwrap_or(0) + i32::from(holder != me));
    if holder == me {
        next.acquire_time = current.acquire_time;
    }
    lease.spec = Some(next);
    // The resourceVersion read above makes this a compare-and-swap: a
    // concurrent taker gets 409 and stays a follower.
    match api
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Keeps trying to hold the lease; `tx` says whether this node leads.
pub async fn run(api: Api<Lease>, me: String, tx: watch::Sender<bool>) {
    loop {
        let leading = match try_acquire(&api, &me).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "leader lease: cannot reach the API; following");
                false
            }
        };
        if *tx.borrow() != leading {
            tracing::info!(node = %me, leading, "leader lease changed hands");
        }
        let _ = tx.send(leading);
        tokio::time::sleep(RENEW).await;
    }
}
