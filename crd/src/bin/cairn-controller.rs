//! `cairn-controller`: the per-node Kubernetes controller of Cairn.
//!
//! * `run`: watches the `cairn.io` objects and drives the local `cairnd`.
//! * `init-secret`: makes the cluster Secret once (the install's Job).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use cairn_crd::controller::{
    self, leader, metrics, mirror, node, secret, setting, volume, Cairnd, Context,
};
use cairn_crd::resources::{Backup, BackupTarget, Setting, Volume};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::Api;

#[derive(Parser)]
#[command(version, about = "Cairn's per-node Kubernetes controller")]
struct Cli {
    /// Log filter (tracing EnvFilter syntax).
    #[arg(
        long,
        env = "CAIRN_CONTROLLER_LOG",
        default_value = "info",
        global = true
    )]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch the cairn.io objects and drive the local cairnd.
    Run {
        /// This node's name: the Kubernetes node name, which is cairnd's --node-id.
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// The install namespace (where every cairn.io object lives).
        #[arg(long, env = "POD_NAMESPACE")]
        namespace: String,
        #[arg(long, env = "CAIRND_SOCKET", default_value = cairn_api::DEFAULT_SOCKET)]
        cairnd_socket: PathBuf,
        /// Where peers reach this node's replica server (HOST:PORT), published in its Node object.
        #[arg(long, env = "REPLICA_ADDR")]
        replica_addr: String,
        /// Serve Prometheus metrics on http://ADDR/metrics.
        #[arg(long, env = "METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        /// Where backup-target credentials are written for cairnd.
        #[arg(long, env = "CREDENTIALS_DIR", default_value = controller::DEFAULT_CREDENTIALS_DIR)]
        credentials_dir: PathBuf,
    },
    /// Make the cluster Secret (32 random bytes) unless it exists.
    InitSecret {
        #[arg(long, env = "POD_NAMESPACE")]
        namespace: String,
        #[arg(long, default_value = "cairn-cluster-secret")]
        name: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level)?)
        .init();
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    match cli.command {
        Command::InitSecret { namespace, name } => {
            let made = secret::ensure(client, &namespace, &name).await?;
            println!("secret {namespace}/{name}: {made:?}");
            Ok(())
        }
        Command::Run {
            node_name,
            namespace,
            cairnd_socket,
            replica_addr,
            metrics_listen,
            credentials_dir,
        } => {
            let m = Arc::new(metrics::Metrics::default());
            if let Some(addr) = metrics_listen {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding --metrics-listen {addr}"))?;
                tokio::spawn(metrics::serve(l, m.clone()));
            }
            let mut ctx = Context::new(
                client.clone(),
                Cairnd {
                    socket: cairnd_socket,
                },
                &node_name,
                &namespace,
                m,
            );
            ctx.credentials_dir = credentials_dir;
            let ctx = Arc::new(ctx);
            run(client, ctx, replica_addr).await
        }
    }
}

async fn run(client: kube::Client, ctx: Arc<Context>, replica_addr: String) -> anyhow::Result<()> {
    let ns = ctx.namespace.clone();
    let (lead_tx, lead_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(leader::run(
        Api::<Lease>::namespaced(client.clone(), &ns),
        ctx.node.clone(),
        lead_tx,
    ));
    let node_ctx = ctx.clone();
    tokio::spawn(async move {
        loop {
            if let Err(e) = node::pass(&node_ctx, &replica_addr).await {
                tracing::warn!(error = %e, "node publication");
            }
            tokio::time::sleep(node::PASS).await;
        }
    });
    let mirror_ctx = ctx.clone();
    let mirror_lead = lead_rx.clone();
    tokio::spawn(async move {
        loop {
            if *mirror_lead.borrow() {
                if let Err(e) = mirror::pass(&mirror_ctx).await {
                    tracing::warn!(error = %e, "mirror pass");
                }
            }
            tokio::time::sleep(mirror::MIRROR_INTERVAL).await;
        }
    });
    let backups = Controller::new(
        Api::<Backup>::namespaced(client.clone(), &ns),
        watcher::Config::default(),
    )
    .run(
        leader_only(lead_rx.clone(), mirror::reconcile_backup),
        setting::error_policy,
        ctx.clone(),
    )
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "backup reconcile");
        }
    });
    let volumes = Controller::new(
        Api::<Volume>::namespaced(client.clone(), &ns),
        watcher::Config::default(),
    )
    .run(
        leader_only(lead_rx.clone(), volume::reconcile),
        volume::error_policy,
        ctx.clone(),
    )
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "volume reconcile");
        }
    });
    let settings = Controller::new(
        Api::<Setting>::namespaced(client.clone(), &ns),
        watcher::Config::default(),
    )
    .run(
        setting::reconcile_setting,
        setting::error_policy,
        ctx.clone(),
    )
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "setting reconcile");
        }
    });
    let targets = Controller::new(
        Api::<BackupTarget>::namespaced(client.clone(), &ns),
        watcher::Config::default(),
    )
    .run(
        setting::reconcile_target,
        setting::error_policy,
        ctx.clone(),
    )
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "backup target reconcile");
        }
    });
    tokio::select! {
        _ = futures::future::join4(volumes, settings, targets, backups) => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
    }
    Ok(())
}

/// `reconcile` on the lease holder; followers leave the object to it and
/// look again after a renewal period.
fn leader_only<K, F, Fut>(
    leading: tokio::sync::watch::Receiver<bool>,
    reconcile: F,
) -> impl FnMut(
    Arc<K>,
    Arc<Context>,
) -> futures::future::BoxFuture<'static, Result<Action, controller::Error>>
where
    K: Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = Result<Action, controller::Error>> + Send + 'static,
{
    move |obj, ctx| {
        let lead = *leading.borrow();
        Box::pin(async move {
            if !lead {
                return Ok(Action::requeue(leader::RENEW));
            }
            reconcile(obj, ctx).await
        })
    }
}
