//! `cairnd`: the Cairn node daemon. Serves the node API on a Unix socket and
//! the volumes' ublk devices until SIGINT/SIGTERM.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use cairn::api::{client::DEFAULT_SOCKET, server};
use cairn::control::{NodeConfig, VolumeManager};
use cairn::frontend::FrontendOptions;

/// Cairn node daemon: replicated block volumes as /dev/ublkbN.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Directory for volume records (and the default disk when no --disk is given).
    #[arg(long, env = "CAIRN_DATA_DIR", default_value = "/var/lib/cairn")]
    data_dir: PathBuf,
    /// Unix socket the API listens on.
    #[arg(long, env = "CAIRN_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Directory that holds replicas; repeat for each disk. Default: `<data-dir>/disks/default`.
    #[arg(long = "disk", env = "CAIRN_DISKS", value_delimiter = ',')]
    disks: Vec<PathBuf>,
    /// Name of this node, recorded with each replica. Default: the host name.
    #[arg(long, env = "CAIRN_NODE_ID")]
    node_id: Option<String>,
    /// ublk hardware queues per new volume (1-32). Default: one per CPU, at most 4.
    #[arg(long, env = "CAIRN_QUEUES")]
    queues: Option<u16>,
    /// Requests in flight per ublk queue (1-4096).
    #[arg(long, env = "CAIRN_QUEUE_DEPTH", default_value_t = 128)]
    queue_depth: u16,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9420). Off by default.
    #[arg(long, env = "CAIRN_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Serve this node's replicas to peers on ADDR (e.g. 0.0.0.0:9500) and
    /// join a cluster. Needs --cluster-secret.
    #[arg(long, env = "CAIRN_REPLICA_LISTEN")]
    replica_listen: Option<SocketAddr>,
    /// Address peers reach this node's replica server at, when it is not
    /// the --replica-listen address (e.g. that is 0.0.0.0:9500).
    #[arg(long, env = "CAIRN_ADVERTISE")]
    advertise: Option<String>,
    /// File holding the cluster secret (the same on every node, 16+ bytes).
    #[arg(long, env = "CAIRN_CLUSTER_SECRET")]
    cluster_secret: Option<PathBuf>,
    /// A peer's replica address (HOST:PORT); repeat for each peer. This
    /// node may be listed too.
    #[arg(long = "peer", env = "CAIRN_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// Log filter (tracing EnvFilter syntax), e.g. info or cairn=debug.
    #[arg(long, env = "CAIRN_LOG", default_value = "info")]
    log_level: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&args.log_level).context("bad --log-level")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let mut config = NodeConfig::new(&args.data_dir);
    config.disks = args.disks;
    if let Some(id) = args.node_id {
        config.node_id = id;
    }
    config.replica_listen = args.replica_listen;
    config.advertise = args.advertise;
    config.cluster_secret = args.cluster_secret;
    config.peers = args.peers;
    config.frontend = FrontendOptions {
        queues: args.queues.unwrap_or(FrontendOptions::default().queues),
        queue_depth: args.queue_depth,
    };
    tracing::info!(node = %config.node_id, data_dir = %args.data_dir.display(), "starting cairnd");
    let manager = Arc::new(VolumeManager::open(config).await?);
    let listener = server::bind(&args.socket)?;
    tracing::info!(socket = %args.socket.display(), "serving the node API");

    if let Some(addr) = args.metrics_listen {
        let m = manager.clone();
        tokio::spawn(async move {
            if let Err(e) = cairn::metrics::serve(addr, move || m.samples()).await {
                tracing::error!("{e}");
            }
        });
    }

    let served = server::serve(listener, manager.clone(), shutdown_signal()).await;
    tracing::info!("shutting down: stopping devices");
    manager.shutdown().await;
    if let Err(e) = std::fs::remove_file(&args.socket) {
        tracing::warn!(socket = %args.socket.display(), error = %e, "removing the socket");
    }
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut int, mut term) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        _ => {
            tracing::error!("cannot install signal handlers; stop cairnd with SIGKILL");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
