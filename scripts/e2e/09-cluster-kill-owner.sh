#!/usr/bin/env bash
# Cluster scenario 3: kill -9 the owner (the node running the engine and the
# ublk device) mid-write. The kernel parks the device's I/O; the restarted
# cairnd reconnects to the remote replicas and recovers the same device; fio
# finishes without an error and every block verifies.
source "$(dirname "$0")/cluster-lib.sh"

net_up
for i in 1 2 3; do start_node "$i"; done
wait_cluster 1
nctl 1 volume create o --size 96MiB --replicas 3 >/dev/null
DEV=$(nctl 1 volume attach o)
fio_write "$DEV" 0 96M 1 --fsync=32 &
FIO=$!
sleep 3
kill -0 "$FIO" 2>/dev/null || die "fio finished before the fault"
say "kill -9 the owner n1 during fio"
kill_node 1
[[ -b "$DEV" ]] || die "$DEV vanished with the owner (expected parked for recovery)"
sleep 1
start_node 1
wait_for 90 "o back at $DEV" '[[ "$(vfield 1 o .device)" == "$DEV" ]]'
wait "$FIO" || { tail -n 20 "$WORK/fio-w1.txt"; die "fio failed across the owner crash"; }
grep -q "err= 0" "$WORK/fio-w1.txt" || die "fio reported errors"
wait_for 120 "3 healthy replicas" '[[ "$(healthy_count 1 o)" -eq 3 ]]'
say "owner restarted, device recovered, volume $(vfield 1 o .state)"
fio_verify "$DEV" 0 96M 1
nctl 1 volume detach o >/dev/null
same_replicas 1 o
for i in 1 2 3; do stop_node "$i"; done
say PASS
