//! Prometheus metrics: the text exposition of per-volume state and I/O
//! counters, served over HTTP on `cairnd --metrics-listen ADDR`.

use std::fmt::Write as _;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use tokio::net::TcpListener;

use crate::engine::{IoStats, VolumeHealth};

/// One volume as metrics see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSample {
    pub name: String,
    pub size: u64,
    /// `None` while detached.
    pub health: Option<VolumeHealth>,
    pub replicas: u32,
    pub healthy_replicas: u32,
    pub revision: u64,
    pub io: IoStats,
    /// Bytes copied and to copy by the rebuilds running now.
    pub rebuild_done: u64,
    pub rebuild_total: u64,
    pub rebuilding_replicas: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Renders samples in the Prometheus text format (version 0.0.4).
pub fn render(volumes: &[VolumeSample]) -> String {
    let mut out = String::new();
    let mut family =
        |name: &str, kind: &str, help: &str, value: &dyn Fn(&VolumeSample) -> Option<u64>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for v in volumes {
                if let Some(x) = value(v) {
                    let _ = writeln!(out, "{name}{{volume=\"{}\"}} {x}", v.name);
                }
            }
        };
    family("cairn_volume_size_bytes", "gauge", "Volume size.", &|v| {
        Some(v.size)
    });
    family(
        "cairn_volume_attached",
        "gauge",
        "1 while the volume has a device.",
        &|v| Some(v.health.is_some() as u64),
    );
    family(
        "cairn_volume_degraded",
        "gauge",
        "1 while serving with fewer replicas than it has (2 when faulted).",
        &|v| {
            v.health.map(|h| match h {
                VolumeHealth::Healthy => 0,
                VolumeHealth::Degraded => 1,
                VolumeHealth::Faulted => 2,
            })
        },
    );
    family(
        "cairn_volume_replicas",
        "gauge",
        "Replicas of the volume.",
        &|v| Some(v.replicas as u64),
    );
    family(
        "cairn_volume_healthy_replicas",
        "gauge",
        "Replicas in the I/O set.",
        &|v| Some(v.healthy_replicas as u64),
    );
    family(
        "cairn_volume_revision",
        "gauge",
        "Revision counter (advances at epochs).",
        &|v| Some(v.revision),
    );
    family(
        "cairn_volume_reads_total",
        "counter",
        "Read requests completed.",
        &|v| Some(v.io.reads),
    );
    family(
        "cairn_volume_writes_total",
        "counter",
        "Write requests completed.",
        &|v| Some(v.io.writes),
    );
    family(
        "cairn_volume_read_bytes_total",
        "counter",
        "Bytes read.",
        &|v| Some(v.io.read_bytes),
    );
    family(
        "cairn_volume_write_bytes_total",
        "counter",
        "Bytes written.",
        &|v| Some(v.io.write_bytes),
    );
    family(
        "cairn_volume_flushes_total",
        "counter",
        "Flush requests completed.",
        &|v| Some(v.io.flushes),
    );
    family(
        "cairn_volume_discards_total",
        "counter",
        "Discard and write-zeroes requests.",
        &|v| Some(v.io.discards),
    );
    family(
        "cairn_volume_io_errors_total",
        "counter",
        "Requests completed with an error.",
        &|v| Some(v.io.errors),
    );
    family(
        "cairn_volume_rebuilding_replicas",
        "gauge",
        "Replicas being rebuilt now.",
        &|v| Some(v.rebuilding_replicas as u64),
    );
    family(
        "cairn_volume_rebuild_done_bytes",
        "gauge",
        "Bytes copied by the running rebuilds.",
        &|v| Some(v.rebuild_done),
    );
    family(
        "cairn_volume_rebuild_total_bytes",
        "gauge",
        "Bytes the running rebuilds copy.",
        &|v| Some(v.rebuild_total),
    );
    out
}

/// Serves `GET /metrics` on `addr` until the task is dropped; `sample` is
/// called per scrape.
pub async fn serve<F>(addr: SocketAddr, sample: F) -> Result<(), MetricsError>
where
    F: Fn() -> Vec<VolumeSample> + Send + Sync + Clone + 'static,
{
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept");
                continue;
            }
        };
        let sample = sample.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let sample = sample.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(render(&sample()))))
                    } else {
                        Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                    };
                    resp
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_per_volume() {
        let v = VolumeSample {
            name: "db".into(),
            size: 1 << 30,
            health: Some(VolumeHealth::Degraded),
            replicas: 2,
            healthy_replicas: 1,
            revision: 7,
            io: IoStats {
                writes: 3,
                write_bytes: 12288,
                ..IoStats::default()
            },
            rebuild_done: 1 << 20,
            rebuild_total: 4 << 20,
            rebuilding_replicas: 1,
        };
        let text = render(&[v]);
        assert!(
            text.contains("cairn_volume_degraded{volume=\"db\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("cairn_volume_write_bytes_total{volume=\"db\"} 12288\n"));
        assert!(text.contains("# TYPE cairn_volume_writes_total counter\n"));
        assert!(
            text.contains("cairn_volume_rebuild_done_bytes{volume=\"db\"} 1048576\n"),
            "{text}"
        );
        let detached = VolumeSample {
            health: None,
            name: "x".into(),
            ..render_default()
        };
        let text = render(&[detached]);
        assert!(!text.contains("cairn_volume_degraded{volume=\"x\"}"));
        assert!(text.contains("cairn_volume_attached{volume=\"x\"} 0\n"));
    }

    fn render_default() -> VolumeSample {
        VolumeSample {
            name: String::new(),
            size: 0,
            health: None,
            replicas: 0,
            healthy_replicas: 0,
            revision: 0,
            io: IoStats::default(),
            rebuild_done: 0,
            rebuild_total: 0,
            rebuilding_replicas: 0,
        }
    }
}
