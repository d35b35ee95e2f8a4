#!/usr/bin/env bash
# Cluster scenario 2: partition one replica node (its link down) for 10 s
# while the volume is written, then heal. The replica times out of the I/O
# set (engine-replica-timeout 3 s), I/O goes on, and after the heal the
# rebuild copies about what was written during the outage, not the volume.
source "$(dirname "$0")/cluster-lib.sh"

net_up
for i in 1 2 3; do start_node "$i"; done
wait_cluster 1
nctl 1 setting set engine-replica-timeout 3 >/dev/null
nctl 1 volume create p --size 96MiB --replicas 3 >/dev/null
DEV=$(nctl 1 volume attach p)
fio_write "$DEV" 0 80M 1 || die "phase 1 write failed"
say "phase 1: 80 MiB written on 3 replicas"

say "partition n3 for 10 s"
link_down 3
t0=$(date +%s)
fio_write "$DEV" 80M 16M 2 || { tail -n 20 "$WORK/fio-w2.txt"; die "writes failed during the partition"; }
grep -q "err= 0" "$WORK/fio-w2.txt" || die "fio reported errors during the partition"
wait_for 30 "n3's replica failed" '[[ "$(vfield 1 p "[.replicas[] | select(.node == \"n3\") | .state][0]")" == failed ]]'
sleep $((10 - ($(date +%s) - t0) > 0 ? 10 - ($(date +%s) - t0) : 0))
link_up 3
say "healed after $(($(date +%s) - t0)) s; 16 MiB were written meanwhile"
wait_for 180 "3 healthy replicas" '[[ "$(healthy_count 1 p)" -eq 3 ]]'
copied=$(rebuilt_bytes 1 p n3)
say "rebuild after the partition copied $((copied >> 10)) KiB; written during the outage 16384 KiB; volume 98304 KiB"
[[ -n "$copied" && "$copied" -le $((32 << 20)) ]] || die "rebuild copied ${copied:-?} bytes, expected about 16 MiB"
fio_verify "$DEV" 0 80M 1
fio_verify "$DEV" 80M 16M 2
nctl 1 volume detach p >/dev/null
same_replicas 1 p
for i in 1 2 3; do stop_node "$i"; done
say PASS
