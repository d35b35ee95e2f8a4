//! `cairn-csi`: the CSI driver binary.

use std::path::PathBuf;

use anyhow::Context;
use cairn_csi::{serve, DriverConfig, Mode, DEFAULT_DRIVER_NAME};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Cairn's Container Storage Interface driver: drives the local cairnd.
#[derive(Debug, Parser)]
#[command(name = "cairn-csi", version)]
struct Args {
    /// The CSI endpoint to serve.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// This node's name: the Kubernetes node name (= the Cairn node name).
    #[arg(long, env = "NODE_ID")]
    node_id: String,
    /// The local cairnd's API socket.
    #[arg(long, env = "CAIRND_SOCKET", default_value = cairn_api::DEFAULT_SOCKET)]
    cairnd_socket: PathBuf,
    /// Which services to serve.
    #[arg(long, env = "CSI_MODE", value_enum, default_value = "all")]
    mode: Mode,
    /// The driver name (the StorageClass provisioner).
    #[arg(long, env = "CSI_DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME)]
    driver_name: String,
    /// Kubelet's root directory (where staging and target paths live).
    #[arg(long, env = "KUBELET_DIR", default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    /// Log filter (tracing env-filter syntax).
    #[arg(long, env = "CSI_LOG", default_value = "info")]
    log_level: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&args.log_level).context("--log-level")?)
        .with_writer(std::io::stderr)
        .init();
    let endpoint = cairn_csi::server::endpoint_path(&args.endpoint)?;
    tracing::info!(kubelet_dir = %args.kubelet_dir.display(), "starting");
    let config = DriverConfig {
        endpoint,
        node_id: args.node_id,
        cairnd_socket: args.cairnd_socket,
        mode: args.mode,
        driver_name: args.driver_name,
    };
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    serve(config, shutdown).await?;
    Ok(())
}
