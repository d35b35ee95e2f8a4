#!/usr/bin/env bash
# Cluster scenario 6: every replica's daemon is killed and restarted, and
# auto-salvage brings the volume back with the newest data. The owner n4
# holds no replica (its disk is too small for one), so the engine lives on
# while n1, n2, n3 die. n1 dies first and misses the second write phase;
# salvage must recover from n2/n3 (higher revision), not n1.
NODES=4
source "$(dirname "$0")/cluster-lib.sh"

net_up
mount -t tmpfs -o size=16m cairn-tiny "$WORK/n4/disk"
trap 'cluster_cleanup; umount "$WORK/n4/disk" 2>/dev/null || true' EXIT
for i in 1 2 3 4; do start_node "$i"; done
wait_cluster 4
nctl 4 volume create s --size 64MiB --replicas 3 >/dev/null
[[ "$(vfield 4 s '[.replicas[].node] | sort | join(",")')" == n1,n2,n3 ]] || die "placement: $(nctl 4 volume get s)"
DEV=$(nctl 4 volume attach s)
fio_write "$DEV" 0 32M 1 || die "phase 1 failed"
kill_node 1
fio_write "$DEV" 32M 32M 2 || die "phase 2 failed with n1 down"
say "phase 2 written on n2, n3 only (revision $(vfield 4 s .revision))"
kill_node 2
kill_node 3
wait_for 60 "volume faulted" '[[ "$(vfield 4 s .state)" == faulted ]]'
say "all three replica daemons killed: volume faulted"
# n1 (stale) comes back alone first: salvage must wait for a replica that
# holds the newest writes rather than revive n1's (repair ticks every 2 s).
start_node 1
sleep 6
[[ "$(vfield 4 s .state)" == faulted ]] || die "salvaged from n1's stale replica alone"
grep -q "auto-salvage waits" "$WORK/n4/log" || die "no sign that salvage waited for the newest replica"
say "with only the stale n1 back, auto-salvage waits"
for i in 2 3; do start_node "$i"; done
wait_for 120 "auto-salvage" 'grep -q "auto-salvage" "$WORK/n4/log" && [[ "$(vfield 4 s .state)" != faulted ]]'
kept=$(sed -n 's/.*auto-salvage.*replicas=\(.*\)/\1/p' "$WORK/n4/log" | tail -n1)
say "auto-salvage kept: $kept"
n1r=$(vfield 4 s '[.replicas[] | select(.node == "n1")][0].name')
grep -q "$n1r" <<<"$kept" && die "salvage kept n1's stale replica"
fio_verify "$DEV" 32M 32M 2
fio_verify "$DEV" 0 32M 1
wait_for 180 "3 healthy replicas" '[[ "$(healthy_count 4 s)" -eq 3 ]]'
fio_verify "$DEV" 32M 32M 2
nctl 4 volume detach s >/dev/null
same_replicas 4 s
for i in 1 2 3 4; do stop_node "$i"; done
say PASS
