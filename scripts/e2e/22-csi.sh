#!/usr/bin/env bash
# The CSI driver's Node calls for real (csi/tests/node_guest.rs): mount
# volumes (ext4, xfs) and a block volume through ControllerPublish,
# NodeStage, NodePublish and back, every call twice; data read back after a
# detach; stats; read-only publish; volumes from a snapshot and a clone
# (filesystem grown at staging); offline expansion then NodeExpandVolume.
# The test binary starts its own cairnd and the driver; this case finds it
# (built by the host's `cargo build --workspace --all-targets`) and runs
# its guest-only tests.
source "$(dirname "$0")/lib.sh"

bin=$(ls -t "$REPO"/target/release/deps/node_guest-* 2>/dev/null | grep -v '\.d$' | head -n 1 || true)
[[ -n "$bin" && -x "$bin" ]] || die "no node_guest test binary under target/release/deps: build with cargo build --release --workspace --all-targets"
export TMPDIR="$WORK"
export CAIRN_S3S_FS="${CAIRN_S3S_FS:-$REPO/target/tools/bin/s3s-fs}"
if ! CAIRND_BIN="$BIN/cairnd" "$bin" --ignored --test-threads 1 --nocapture >"$WORK/node_guest.log" 2>&1; then
    tail -n 60 "$WORK/node_guest.log"
    die "node_guest tests failed"
fi
grep '^\[22-csi\]' "$WORK/node_guest.log" || true
grep -E "^test result" "$WORK/node_guest.log"
grep -q "test result: ok. 4 passed" "$WORK/node_guest.log" || die "expected 4 guest tests to pass"
say PASS
