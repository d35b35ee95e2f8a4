//! The bench binary runs end to end on a small volume and reports every
//! case and workload asked for (figures are not checked: timings on a
//! shared host are noise; what is checked is that each case moved data
//! and the report and JSON carry it).
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn the_bench_runs_each_case_and_reports_it() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_engine-bench"))
        .arg("--dir")
        .arg(tmp.path().join("scratch"))
        .args(["--size", "8MiB", "--seconds", "0.2"])
        .args(["--cases", "raw,local1,local1-remote1,remote3"])
        .args([
            "--workloads",
            "randwrite-4k-qd32,randread-4k-qd32,randwrite-4k-qd1",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for case in ["raw", "local1", "local1-remote1", "remote3"] {
        assert!(stdout.contains(&format!("| {case} |")), "{case}: {stdout}");
    }
    assert!(stdout.contains("### randwrite-4k-qd1") && stdout.contains("p99.9 µs"));
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(rows.len(), 4 * 3);
    for r in &rows {
        assert!(r["ios"].as_u64().unwrap() > 0, "{r}");
        assert!(r["cpu_us_per_io"].as_f64().unwrap() > 0.0, "{r}");
        if r["workload"] == "randwrite-4k-qd1" {
            assert!(r["p99_us"].as_f64().unwrap() >= r["p50_us"].as_f64().unwrap());
        }
    }
    // Remote cases ran their replica servers' threads in this process.
    let remote = rows.iter().find(|r| r["case"] == "remote3").unwrap();
    assert!(remote["threads"].get("replica-conn").is_some(), "{remote}");
    // Scratch files are removed after each case.
    let left = std::fs::read_dir(tmp.path().join("scratch"))
        .unwrap()
        .count();
    assert_eq!(left, 0);
}

#[test]
fn unknown_cases_and_bad_sizes_are_refused() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_engine-bench"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--cases", "nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown case \"nope\"") && err.contains("local1-remote2"),
        "{err}"
    );
    let out = run(&["--size", "12345"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--size"));
}
