//! `engine-bench`: the replication engine measured natively, without ublk,
//! on any Linux host. In one run, side by side: raw io_uring on a file; the
//! engine with 1 local replica; 1 local + 1 and + 2 remote replicas over
//! loopback; 3 remote only; and (with `--veth`, root) the remote ones behind
//! veth links into network namespaces. Each workload reports IOPS, the
//! ratio to 1 local replica, CPU per I/O (total and per thread group, from
//! `/proc/self/task`), context switches per I/O, and for QD1 the latency
//! percentiles. Replica servers run in this process, so their threads'
//! CPU is counted too. See docs/benchmarks.md.

mod driver;
mod netns;
mod threads;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use cairn::disks::NodeDisks;
use cairn::engine::{
    IoOp, QueueEngine, QueueLayout, RemoteReplica, RemoteTarget, ReplicaHandle, ReplicaIo, VolumeIo,
};
use cairn::replica::{Claim, Replica, ReplicaSpec};
use cairn::transport::{ClusterSecret, ReplicaServer};
use clap::Parser;
use driver::{Limit, Order, Outcome, Ring, Target, Workload};

const DEPTH: u16 = 64;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "The engine measured natively (no ublk): raw io_uring, local and remote replicas"
)]
struct Args {
    /// Scratch directory for the files (removed after each case). Use a
    /// real filesystem (ext4/xfs), not tmpfs, to measure the page cache
    /// writes replicas do.
    #[arg(long, default_value = "target/bench-engine")]
    dir: PathBuf,
    /// Size of the volume and of each replica file.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Seconds per timed workload.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Runs of each workload; the median by IOPS is reported.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Block size of the fill before the workloads (every block written
    /// once). 4 KiB keeps clear of an ext4 regression on 6.18 kernels
    /// that makes 4 KiB overwrites of 1 MiB-filled files slow; pass 1MiB
    /// to see it.
    #[arg(long, default_value = "4KiB", value_parser = parse_size)]
    fill_bs: u64,
    /// Cases to run (default: all but the veth ones unless --veth).
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// Workloads to run (default: all).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Also the remote cases behind veth links into network namespaces
    /// (needs root and `ip`).
    #[arg(long)]
    veth: bool,
    /// Writes every figure as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    cairn::size::parse_size(s).map_err(|e| e.to_string())
}

/// Where a replica lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Local,
    Loopback,
    Veth,
}

struct Case {
    name: &'static str,
    /// `None`: the raw io_uring baseline on a plain file.
    replicas: Option<&'static [Place]>,
}

const CASES: &[Case] = &[
    Case {
        name: "raw",
        replicas: None,
    },
    Case {
        name: "local1",
        replicas: Some(&[Place::Local]),
    },
    Case {
        name: "local1-remote1",
        replicas: Some(&[Place::Local, Place::Loopback]),
    },
    Case {
        name: "local1-remote2",
        replicas: Some(&[Place::Local, Place::Loopback, Place::Loopback]),
    },
    Case {
        name: "remote3",
        replicas: Some(&[Place::Loopback, Place::Loopback, Place::Loopback]),
    },
    Case {
        name: "local1-remote2-veth",
        replicas: Some(&[Place::Local, Place::Veth, Place::Veth]),
    },
    Case {
        name: "remote3-veth",
        replicas: Some(&[Place::Veth, Place::Veth, Place::Veth]),
    },
];

struct Load {
    name: &'static str,
    op: IoOp,
    bs: u32,
    qd: u16,
    latency: bool,
}

const LOADS: &[Load] = &[
    Load {
        name: "randwrite-4k-qd32",
        op: IoOp::Write,
        bs: 4096,
        qd: 32,
        latency: false,
    },
    Load {
        name: "randread-4k-qd32",
        op: IoOp::Read,
        bs: 4096,
        qd: 32,
        latency: false,
    },
    Load {
        name: "randwrite-4k-qd1",
        op: IoOp::Write,
        bs: 4096,
        qd: 1,
        latency: true,
    },
    Load {
        name: "randwrite-64k-qd32",
        op: IoOp::Write,
        bs: 64 << 10,
        qd: 32,
        latency: false,
    },
    Load {
        name: "randwrite-1m-qd8",
        op: IoOp::Write,
        bs: 1 << 20,
        qd: 8,
        latency: false,
    },
];

/// One workload's figures on one case.
struct Figures {
    outcome: Outcome,
    threads: BTreeMap<String, threads::Counters>,
}

impl Figures {
    fn cpu_us_per_io(&self) -> f64 {
        let ns: u64 = self.threads.values().map(|c| c.cpu_ns).sum();
        ns as f64 / 1000.0 / self.outcome.ios.max(1) as f64
    }

    fn switches_per_io(&self) -> f64 {
        let n: u64 = self
            .threads
            .values()
            .map(|c| c.voluntary + c.involuntary)
            .sum();
        n as f64 / self.outcome.ios.max(1) as f64
    }
}

fn secret() -> anyhow::Result<ClusterSecret> {
    ClusterSecret::from_bytes(b"engine-bench-secret-of-32-bytes!")
        .map_err(|n| anyhow::anyhow!("secret of {n} bytes refused"))
}

/// What one case set up: the target and what must live as long as it.
enum Setup {
    Raw(File),
    Engine {
        engine: QueueEngine,
        _volume: Arc<VolumeIo>,
        _servers: Vec<ReplicaServer>,
        _namespaces: Vec<netns::Namespace>,
    },
}

impl Setup {
    fn target(&mut self) -> Target<'_> {
        match self {
            Setup::Raw(f) => Target::Raw(f),
            Setup::Engine { engine, .. } => Target::Engine(engine),
        }
    }
}

fn setup(case: &Case, dir: &Path, size: u64) -> anyhow::Result<Setup> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let Some(places) = case.replicas else {
        let path = dir.join("raw.img");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        f.set_len(size)?;
        return Ok(Setup::Raw(f));
    };
    let mut handles = Vec::new();
    let mut servers = Vec::new();
    let mut namespaces = Vec::new();
    for (i, place) in places.iter().enumerate() {
        let name = format!("vol-r-{i}");
        let io = match place {
            Place::Local => {
                let spec = ReplicaSpec {
                    volume: "vol".into(),
                    replica: name.clone(),
                    size,
                };
                ReplicaIo::Local(Arc::new(Replica::create(&dir.join(&name), &spec)?))
            }
            Place::Loopback | Place::Veth => {
                let disk = dir.join(format!("node{i}"));
                std::fs::create_dir_all(disk.join("replicas"))?;
                let disks = Arc::new(NodeDisks::new(&format!("node{i}"), vec![disk]));
                disks.create("vol", &name, size, None, |_| true)?;
                let server = if *place == Place::Veth {
                    let ns = netns::Namespace::create(namespaces.len() as u8 + 1)?;
                    let listen = format!("{}:0", ns.inside).parse()?;
                    let secret = secret()?;
                    let s = ns.run(move || Ok(ReplicaServer::start(listen, secret, disks)?))?;
                    namespaces.push(ns);
                    s
                } else {
                    ReplicaServer::start("127.0.0.1:0".parse()?, secret()?, disks)?
                };
                let target = RemoteTarget {
                    addr: server.local_addr().to_string(),
                    volume: "vol".into(),
                    replica: name.clone(),
                    secret: secret()?,
                    node: "engine-bench".into(),
                    timeout: Duration::from_secs(30),
                };
                servers.push(server);
                let claim = Claim::Takeover {
                    owner: Default::default(),
                };
                ReplicaIo::Remote(Arc::new(
                    RemoteReplica::connect(target, claim)
                        .context("connect to the replica server")?,
                ))
            }
        };
        handles.push(ReplicaHandle { name, io: Some(io) });
    }
    let layout = QueueLayout {
        queues: 1,
        depth: DEPTH,
    };
    let volume = VolumeIo::new("vol", size, handles, Box::new(|_| {}), layout)?;
    volume.begin_epoch()?;
    let engine = QueueEngine::new(volume.clone(), 0, DEPTH);
    Ok(Setup::Engine {
        engine,
        _volume: volume,
        _servers: servers,
        _namespaces: namespaces,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|c| {
            if args.cases.is_empty() {
                args.veth || !c.name.ends_with("-veth")
            } else {
                args.cases.iter().any(|n| n == c.name)
            }
        })
        .collect();
    for n in &args.cases {
        if !CASES.iter().any(|c| c.name == n) {
            let all: Vec<_> = CASES.iter().map(|c| c.name).collect();
            bail!("unknown case {n:?}: pick from {}", all.join(", "));
        }
    }
    for n in &args.workloads {
        if !LOADS.iter().any(|l| l.name == n) {
            let all: Vec<_> = LOADS.iter().map(|l| l.name).collect();
            bail!("unknown workload {n:?}: pick from {}", all.join(", "));
        }
    }
    let loads: Vec<&Load> = LOADS
        .iter()
        .filter(|l| args.workloads.is_empty() || args.workloads.iter().any(|n| n == l.name))
        .collect();
    if args.size % args.fill_bs != 0 || args.size % (1 << 20) != 0 {
        bail!("--size must be a multiple of 1 MiB and of --fill-bs");
    }
    let seconds = Duration::from_secs_f64(args.seconds);
    println!(
        "engine-bench {}: size {} MiB, fill {} KiB writes, {} s per workload, {} run(s), scratch {}",
        env!("CARGO_PKG_VERSION"),
        args.size >> 20,
        args.fill_bs >> 10,
        args.seconds,
        args.runs,
        args.dir.display()
    );
    let mut results: BTreeMap<(&str, &str), Figures> = BTreeMap::new();
    for case in &cases {
        let dir = args.dir.join(case.name);
        let _ = std::fs::remove_dir_all(&dir);
        let mut s =
            setup(case, &dir, args.size).with_context(|| format!("set up {}", case.name))?;
        let mut ring = Ring::new(4 * DEPTH as u32)?;
        let fill = Workload {
            op: IoOp::Write,
            bs: args.fill_bs as u32,
            qd: 32,
            order: Order::Sequential,
            limit: Limit::Whole,
            latency: false,
        };
        driver::run(&mut ring, &mut s.target(), args.size, fill)
            .with_context(|| format!("fill {}", case.name))?;
        for load in &loads {
            let w = Workload {
                op: load.op,
                bs: load.bs,
                qd: load.qd,
                order: Order::Random,
                limit: Limit::Time(seconds),
                latency: load.latency,
            };
            let mut runs = Vec::new();
            for _ in 0..args.runs.max(1) {
                let before = threads::sample();
                let outcome = driver::run(&mut ring, &mut s.target(), args.size, w)
                    .with_context(|| format!("{} on {}", load.name, case.name))?;
                let after = threads::sample();
                runs.push(Figures {
                    outcome,
                    threads: threads::delta(&before, &after),
                });
            }
            runs.sort_by(|a, b| a.outcome.iops().total_cmp(&b.outcome.iops()));
            let median = runs.swap_remove(runs.len() / 2);
            eprintln!(
                "{:>20} {:>20}: {:>9.0} IOPS, {:.1} µs CPU/IO",
                case.name,
                load.name,
                median.outcome.iops(),
                median.cpu_us_per_io()
            );
            results.insert((case.name, load.name), median);
        }
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
    print!("{}", report(&cases, &loads, &results));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&json(&results))?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// One Markdown table per workload.
fn report(cases: &[&Case], loads: &[&Load], results: &BTreeMap<(&str, &str), Figures>) -> String {
    let mut out = String::new();
    for load in loads {
        out.push_str(&format!("\n### {}\n\n", load.name));
        out.push_str("| case | IOPS | × local1 | MiB/s | CPU µs/IO | ctx sw/IO |");
        if load.latency {
            out.push_str(" p50 µs | p99 µs | p99.9 µs |");
        }
        out.push_str(" CPU µs/IO by thread |\n|---|---:|---:|---:|---:|---:|");
        if load.latency {
            out.push_str("---:|---:|---:|");
        }
        out.push_str("---|\n");
        let base = results
            .get(&("local1", load.name))
            .map(|f| f.outcome.iops());
        for case in cases {
            let Some(f) = results.get(&(case.name, load.name)) else {
                continue;
            };
            let iops = f.outcome.iops();
            let ratio = base.map_or("-".to_string(), |b| format!("{:.2}", iops / b));
            let by_thread: Vec<String> = f
                .threads
                .iter()
                .filter(|(_, c)| c.cpu_ns > 0)
                .map(|(n, c)| {
                    format!(
                        "{n} {:.1}",
                        c.cpu_ns as f64 / 1000.0 / f.outcome.ios.max(1) as f64
                    )
                })
                .collect();
            out.push_str(&format!(
                "| {} | {:.0} | {} | {:.0} | {:.1} | {:.2} |",
                case.name,
                iops,
                ratio,
                iops * load.bs as f64 / (1 << 20) as f64,
                f.cpu_us_per_io(),
                f.switches_per_io()
            ));
            if load.latency {
                out.push_str(&format!(
                    " {:.1} | {:.1} | {:.1} |",
                    f.outcome.latency_us(0.5),
                    f.outcome.latency_us(0.99),
                    f.outcome.latency_us(0.999)
                ));
            }
            out.push_str(&format!(" {} |\n", by_thread.join(", ")));
        }
    }
    out
}

fn json(results: &BTreeMap<(&str, &str), Figures>) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = results
        .iter()
        .map(|((case, load), f)| {
            serde_json::json!({
                "case": case,
                "workload": load,
                "ios": f.outcome.ios,
                "seconds": f.outcome.elapsed.as_secs_f64(),
                "iops": f.outcome.iops(),
                "cpu_us_per_io": f.cpu_us_per_io(),
                "switches_per_io": f.switches_per_io(),
                "p50_us": f.outcome.latency_us(0.5),
                "p99_us": f.outcome.latency_us(0.99),
                "p999_us": f.outcome.latency_us(0.999),
                "threads": f.threads.iter().map(|(n, c)| (n.clone(), serde_json::json!({
                    "cpu_us_per_io": c.cpu_ns as f64 / 1000.0 / f.outcome.ios.max(1) as f64,
                    "voluntary_per_io": c.voluntary as f64 / f.outcome.ios.max(1) as f64,
                    "involuntary_per_io": c.involuntary as f64 / f.outcome.ios.max(1) as f64,
                }))).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    serde_json::Value::Array(rows)
}
