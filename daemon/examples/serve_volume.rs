//! Serves one volume straight from replica directories, without the control
//! plane: a tool for debugging the engine and the ublk frontend in a kernel.
//!
//! `serve_volume [--recover DEV_ID] SIZE_BYTES DIR...` creates (or opens) a
//! replica in each DIR, attaches them as one ublk device (taking over device
//! DEV_ID if a killed server left it), prints its path, and serves it until
//! stdin closes or reads a line. A line `size BYTES` instead resizes the live
//! device (`UblkDevice::update_size`, Linux 6.16+; the replicas keep their
//! size, so only the kernel's view changes) and prints `size ok` or
//! `size error: ...`.

use std::io::BufRead;
use std::path::Path;

use anyhow::Context;
use cairn::engine::{QueueLayout, ReplicaHandle, ReplicaIo, VolumeIo};
use cairn::frontend::{FrontendOptions, UblkDevice};
use cairn::replica::{Replica, ReplicaSpec};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut recover = None;
    if args.first().map(String::as_str) == Some("--recover") {
        recover = Some(args.get(1).context("--recover DEV_ID")?.parse::<u32>()?);
        args.drain(..2);
    }
    let (size, dirs) = args
        .split_first()
        .context("usage: serve_volume SIZE_BYTES DIR...")?;
    let size: u64 = size.parse().context("SIZE_BYTES")?;
    let mut handles = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let dir = Path::new(dir);
        let name = format!("dbg-r-{i}");
        let replica = if dir.join("volume.meta").exists() {
            Replica::open(dir)?
        } else {
            Replica::create(
                dir,
                &ReplicaSpec {
                    volume: "dbg".into(),
                    replica: name.clone(),
                    size,
                },
            )?
        };
        handles.push(ReplicaHandle {
            name,
            io: Some(ReplicaIo::Local(replica.into())),
        });
    }
    let opts = FrontendOptions {
        queues: 2,
        queue_depth: 64,
    };
    let layout = QueueLayout {
        queues: opts.queues,
        depth: opts.queue_depth,
    };
    let volume = VolumeIo::new(
        "dbg",
        size,
        handles,
        Box::new(|e| eprintln!("event: {e:?}")),
        layout,
    )?;
    volume.begin_epoch()?;
    let dev = UblkDevice::start(volume.clone(), &opts, recover)?;
    println!("{}", dev.path().display());
    let mut line = String::new();
    while std::io::stdin().lock().read_line(&mut line).unwrap_or(0) > 0 {
        let Some(bytes) = line.trim().strip_prefix("size ") else {
            break;
        };
        match bytes.parse::<u64>() {
            Ok(bytes) => match dev.update_size(bytes) {
                Ok(()) => println!("size ok"),
                Err(e) => println!("size error: {e}"),
            },
            Err(e) => println!("size error: {e}"),
        }
        line.clear();
    }
    dev.stop()?;
    eprintln!("stats: {:?} health: {:?}", volume.stats(), volume.health());
    Ok(())
}
