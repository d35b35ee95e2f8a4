#!/usr/bin/env bash
# The CSI driver on a 3-node cluster (csi/tests/cluster_guest.rs):
# ControllerPublish to another node is the ownership handover, and a mount
# volume's data follows it n1 -> n2 -> n3 -> n1; publishing while the
# volume is mounted elsewhere is FAILED_PRECONDITION; an unknown node is
# NOT_FOUND. This case starts the cluster (each cairnd in its network
# namespace); the test binary serves one driver per node and drives them.
source "$(dirname "$0")/cluster-lib.sh"

bin=$(ls -t "$REPO"/target/release/deps/cluster_guest-* 2>/dev/null | grep -v '\.d$' | head -n 1 || true)
[[ -n "$bin" && -x "$bin" ]] || die "no cluster_guest test binary under target/release/deps: build with cargo build --release --workspace --all-targets"

net_up
for i in 1 2 3; do start_node "$i"; done
wait_cluster 1
wait_cluster 2
nctl 1 setting set storage-minimal-available-percentage 0 >/dev/null

export TMPDIR="$WORK"
export CAIRN_CSI_CLUSTER="n1=$WORK/n1/sock,n2=$WORK/n2/sock,n3=$WORK/n3/sock"
if ! "$bin" --ignored --test-threads 1 --nocapture >"$WORK/cluster_guest.log" 2>&1; then
    tail -n 60 "$WORK/cluster_guest.log"
    die "cluster_guest tests failed"
fi
grep '^\[23-csi-cluster\]' "$WORK/cluster_guest.log" || true
grep -E "^test result" "$WORK/cluster_guest.log"
grep -q "test result: ok. 2 passed" "$WORK/cluster_guest.log" || die "expected 2 guest tests to pass"
say PASS
