#!/usr/bin/env bash
# Cluster scenario 1: a 3-replica volume (one replica per node); kill -9 one
# replica node's cairnd mid-write. I/O continues; the node comes back; its
# replica is rebuilt with only the blocks it missed; 3 healthy; every block
# verifies and the three replicas are byte-identical.
source "$(dirname "$0")/cluster-lib.sh"

net_up
for i in 1 2 3; do start_node "$i"; done
wait_cluster 1
nctl 1 volume create v --size 96MiB --replicas 3 >/dev/null
DEV=$(nctl 1 volume attach v)
say "attached at $DEV, replicas on $(vfield 1 v '[.replicas[].node] | join(",")')"

fio_write "$DEV" 0 96M 1 &
FIO=$!
sleep 3
kill -0 "$FIO" 2>/dev/null || die "fio finished before the fault; grow the volume"
say "kill -9 n3's cairnd during fio"
kill_node 3
wait "$FIO" || { tail -n 20 "$WORK/fio-w1.txt"; die "fio failed when n3 died"; }
grep -q "err= 0" "$WORK/fio-w1.txt" || die "fio reported errors"
wait_for 30 "v degraded" '[[ "$(vfield 1 v .state)" == degraded ]]'
say "fio completed with n3 down; volume $(vfield 1 v .state)"
start_node 3
wait_for 180 "3 healthy replicas" '[[ "$(healthy_count 1 v)" -eq 3 ]]'
copied=$(rebuilt_bytes 1 v n3)
say "n3 rebuilt: copied $((copied >> 20)) MiB of the 96 MiB volume (only what it missed)"
[[ -n "$copied" && "$copied" -lt $((96 << 20)) ]] || die "rebuild copied ${copied:-?} bytes: not incremental"
grep -q "rebuild started.*incremental=true" "$WORK/n1/log" || die "rebuild was not incremental"
fio_verify "$DEV" 0 96M 1
nctl 1 volume get v
nctl 1 volume detach v >/dev/null
same_replicas 1 v
for i in 1 2 3; do stop_node "$i"; done
say PASS
