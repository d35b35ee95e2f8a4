//! The built `cairnctl` against a `cairnd` child process on a temporary
//! socket and data dir: output formats, exit codes, one-line errors.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `cairnctl` binary: another package of the workspace (`daemon/cli`),
/// built next to this test's own binaries by `cargo test --workspace`.
fn cairnctl_bin() -> PathBuf {
    let cairnd = PathBuf::from(env!("CARGO_BIN_EXE_cairnd"));
    let bin = cairnd.with_file_name("cairnctl");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (it builds cairnctl)",
        bin.display()
    );
    bin
}

/// A running cairnd, killed when dropped (also when a test panics).
struct Cairnd {
    child: Child,
    socket: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Cairnd {
    fn start() -> Cairnd {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("cairnd.sock");
        for d in ["d1", "d2"] {
            std::fs::create_dir(tmp.path().join(d)).unwrap();
        }
        let child = Command::new(env!("CARGO_BIN_EXE_cairnd"))
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .arg("--socket")
            .arg(&socket)
            .arg("--disk")
            .arg(tmp.path().join("d1"))
            .arg("--disk")
            .arg(tmp.path().join("d2"))
            .args(["--queues", "1", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut d = Cairnd {
            child,
            socket,
            _tmp: tmp,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.socket.exists() {
            assert!(
                d.child.try_wait().unwrap().is_none(),
                "cairnd exited during startup"
            );
            assert!(
                Instant::now() < deadline,
                "cairnd did not open its socket within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(cairnctl_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs cairnctl, expects success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "cairnctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "cairnctl {args:?} wrote to stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Cairnd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts a failure: exit code 1, nothing on stdout, exactly one stderr
/// line starting with `error:` and containing `want`.
fn assert_error(out: &Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(stderr.starts_with("error: "), "{stderr:?}");
    assert!(
        stderr.contains(want),
        "{stderr:?} does not contain {want:?}"
    );
}

#[test]
fn create_list_get_delete() {
    let d = Cairnd::start();
    let out = d.ok(&[
        "volume",
        "create",
        "db",
        "--size",
        "64MiB",
        "--replicas",
        "2",
    ]);
    assert!(
        out.contains("db") && out.contains("64MiB") && out.contains("detached"),
        "{out}"
    );

    let list = d.ok(&["volume", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    assert!(
        lines[0].starts_with("NAME") && lines[1].starts_with("db "),
        "{list}"
    );
    // Columns line up: each header starts where its value starts.
    let col = |line: &str, word: &str| line.find(word).unwrap();
    assert_eq!(col(lines[0], "SIZE"), col(lines[1], "64MiB"), "{list}");

    let json: serde_json::Value =
        serde_json::from_str(&d.ok(&["-o", "json", "volume", "get", "db"])).unwrap();
    assert_eq!(json["name"], "db");
    assert_eq!(json["state"], "detached");
    assert_eq!(json["size"], 64u64 << 20);
    assert_eq!(json["device"], "");
    let replicas = json["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 2);
    for r in replicas {
        assert_eq!(r["state"], "healthy");
        assert!(r["name"].as_str().unwrap().starts_with("db-r-"));
        assert!(Path::new(r["disk"].as_str().unwrap()).is_dir());
        assert!(r["node"].as_str().is_some_and(|n| !n.is_empty()));
    }
    let list: serde_json::Value =
        serde_json::from_str(&d.ok(&["volume", "list", "-o", "json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);

    let node: serde_json::Value =
        serde_json::from_str(&d.ok(&["-o", "json", "node", "get"])).unwrap();
    assert_eq!(node["disks"].as_array().unwrap().len(), 2);
    // The kernel facts: uname -r, and (no ublk on a test host, or one with
    // it) whether online expansion is possible, as the driver says.
    let uname = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(node["kernel"].as_str(), Some(uname.trim()));
    assert!(node["online_expansion"].is_boolean());
    let table = d.ok(&["node", "get"]);
    assert!(
        table.contains(&format!("kernel: {}", uname.trim())),
        "{table}"
    );
    assert!(table.contains("online expansion: "), "{table}");

    d.ok(&["volume", "delete", "db"]);
    assert_eq!(d.ok(&["volume", "list"]).lines().count(), 1);
    assert_error(&d.ctl(&["volume", "get", "db"]), "volume \"db\" not found");
}

#[test]
fn bad_input_is_one_line_error() {
    let d = Cairnd::start();
    d.ok(&["volume", "create", "good", "--size", "1MiB"]);
    assert_error(
        &d.ctl(&["volume", "create", "x", "--size", "12XB"]),
        "unknown unit",
    );
    assert_error(&d.ctl(&["volume", "create", "x"]), "--size");
    assert_error(
        &d.ctl(&["volume", "create", "u", "--size", "1000"]),
        "multiple of 4096",
    );
    assert_error(
        &d.ctl(&["volume", "create", "z", "--size", "0"]),
        "size is zero",
    );
    assert_error(
        &d.ctl(&["volume", "create", "Bad_Name", "--size", "1MiB"]),
        "DNS-1123",
    );
    assert_error(
        &d.ctl(&["volume", "create", "good", "--size", "1MiB"]),
        "already exists",
    );
    assert_error(
        &d.ctl(&["volume", "create", "m", "--size", "1MiB", "--replicas", "3"]),
        "wants 3 replicas",
    );
    assert_error(&d.ctl(&["volume", "attach", "nope"]), "not found");
    assert_error(&d.ctl(&["volume", "delete", "nope"]), "not found");
    assert_error(
        &d.ctl(&["replica", "fail", "good", "nope"]),
        "no replica named",
    );
    assert_error(&d.ctl(&["volume", "frobnicate"]), "frobnicate");
    if !Path::new("/dev/ublk-control").exists() {
        assert_error(
            &d.ctl(&["volume", "attach", "good"]),
            "ublk driver not available: load it with `modprobe ublk_drv`",
        );
    }
    let list = d.ok(&["volume", "list"]);
    assert_eq!(
        list.lines().count(),
        2,
        "bad input changed the volume list: {list}"
    );
}

#[test]
fn unreachable_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("none.sock");
    let out = Command::new(cairnctl_bin())
        .arg("--socket")
        .arg(&sock)
        .args(["volume", "list"])
        .output()
        .unwrap();
    assert_error(
        &out,
        &format!(
            "cannot reach cairnd at {}: is it running? (start it with cairnd, or pass --socket)",
            sock.display()
        ),
    );
}

#[test]
fn sigterm_removes_socket_and_exits_zero() {
    let mut d = Cairnd::start();
    d.ok(&["volume", "create", "keep", "--size", "1MiB"]);
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "cairnd did not exit within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(!d.socket.exists(), "socket left behind");
}

/// `node scheduling`: without options it shows the rule and changes
/// nothing; each option changes only its part; a volume that needs an
/// unschedulable disk is refused with why; the replicas there stay and
/// grow; an unknown disk is one line naming the disks there are.
#[test]
fn node_scheduling_shows_sets_and_refuses() {
    let d = Cairnd::start();
    let disk = |n: &str| d._tmp.path().join(n).display().to_string();
    let (d1, d2) = (disk("d1"), disk("d2"));
    let rule = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["-o", "json", "node", "scheduling"];
        all.extend_from_slice(args);
        serde_json::from_str(&d.ok(&all)).unwrap()
    };
    let schedulable = |v: &serde_json::Value| -> Vec<bool> {
        v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["schedulable"].as_bool().unwrap())
            .collect()
    };
    // The disks share the host's filesystem: its free space is not this
    // test's business (the expansion below checks it).
    d.ok(&[
        "setting",
        "set",
        "storage-minimal-available-percentage",
        "0",
    ]);
    let v = rule(&[]);
    assert_eq!(v["allow_scheduling"], true);
    assert_eq!(schedulable(&v), [true, true]);
    d.ok(&[
        "volume",
        "create",
        "old",
        "--size",
        "8MiB",
        "--replicas",
        "2",
    ]);

    let v = rule(&["--unschedulable-disk", &d1]);
    assert_eq!(schedulable(&v), [false, true]);
    let v = rule(&[]);
    assert_eq!(schedulable(&v), [false, true], "showing changed nothing");
    assert_error(
        &d.ctl(&[
            "volume",
            "create",
            "two",
            "--size",
            "8MiB",
            "--replicas",
            "2",
        ]),
        "only 1 of this node's 2 disks take new replicas",
    );
    // More than the node has at all: said as such, not as scheduling.
    assert_error(
        &d.ctl(&[
            "volume",
            "create",
            "three",
            "--size",
            "8MiB",
            "--replicas",
            "3",
        ]),
        "wants 3 replicas but this node has 2 disks",
    );
    let out = d.ok(&[
        "-o",
        "json",
        "volume",
        "create",
        "one",
        "--size",
        "8MiB",
        "--replicas",
        "1",
    ]);
    let one: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(one["replicas"][0]["disk"], d2.as_str(), "{one}");
    // The replica already on d1 grows.
    d.ok(&["volume", "expand", "old", "--size", "16MiB"]);

    // The node off; the disk list is kept meanwhile.
    let v = rule(&["--allow", "false"]);
    assert_eq!(v["allow_scheduling"], false);
    assert_eq!(v["unschedulable_disks"][0], d1.as_str());
    assert_eq!(schedulable(&v), [false, false]);
    assert_error(
        &d.ctl(&[
            "volume",
            "create",
            "none",
            "--size",
            "8MiB",
            "--replicas",
            "1",
        ]),
        "only 0 of this node's 2 disks take new replicas",
    );
    assert_error(
        &d.ctl(&["node", "scheduling", "--unschedulable-disk", "/no/such"]),
        &format!("\"/no/such\" is not a disk of this node ({d1}, {d2})"),
    );
    let v = rule(&["--allow", "true", "--all-disks"]);
    assert_eq!(schedulable(&v), [true, true]);
    d.ok(&[
        "volume",
        "create",
        "two",
        "--size",
        "8MiB",
        "--replicas",
        "2",
    ]);
    let table = d.ok(&["node", "scheduling"]);
    assert!(table.contains("new replicas: allowed"), "{table}");
    assert!(table.contains("SCHEDULABLE"), "{table}");
}
