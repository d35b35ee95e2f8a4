//! A network namespace joined to this one by a veth pair, so a replica
//! server can listen behind a real (virtual) link instead of loopback:
//! `10.231.N.1` here, `10.231.N.2` in `cairn-bench-N`. Needs root and `ip`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{bail, Context as _};

pub struct Namespace {
    name: String,
    /// The address of this side's peer, inside the namespace.
    pub inside: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Namespace {
    /// Creates namespace `cairn-bench-N` with its veth link up.
    pub fn create(n: u8) -> anyhow::Result<Namespace> {
        let name = format!("cairn-bench-{n}");
        let (here, there) = (format!("cbv{n}a"), format!("cbv{n}b"));
        // Left over from an interrupted run.
        let _ = ip(&["netns", "del", &name]);
        let _ = ip(&["link", "del", &here]);
        ip(&["netns", "add", &name])?;
        let ns = Namespace {
            name: name.clone(),
            inside: format!("10.231.{n}.2"),
        };
        ip(&["link", "add", &here, "type", "veth", "peer", "name", &there])?;
        ip(&["link", "set", &there, "netns", &name])?;
        ip(&["addr", "add", &format!("10.231.{n}.1/24"), "dev", &here])?;
        ip(&["link", "set", &here, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", name.as_str(), "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("10.231.{n}.2/24"), "dev", &there])?;
        inside(&["link", "set", &there, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `f` on a thread inside the namespace (threads it starts stay
    /// there; sockets it binds belong to it).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        let ns = File::open(&path).with_context(|| format!("open {path}"))?;
        std::thread::spawn(move || {
            // SAFETY: setns on an open namespace fd; it changes only this
            // thread's network namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth, and so both.
        let _ = ip(&["netns", "del", &self.name]);
    }
}
