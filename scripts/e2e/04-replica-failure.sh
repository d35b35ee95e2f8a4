#!/usr/bin/env bash
# Case 4: a replica fails during fio — taken out by the operator, then (on a
# fresh volume) by deleting its head file under it, then by truncating it.
# I/O continues, the volume reports degraded with the replica failed, and
# fio's verification passes. With rebuilds paused (limit 0) it stays failed;
# once they are allowed, a fresh replica replaces it (a failed replica is
# never trusted again), the volume is healthy and the data verifies.
source "$(dirname "$0")/lib.sh"

start_cairnd
ctl setting set concurrent-replica-rebuild-per-node-limit 0 >/dev/null

run_with_fault() { # VOLUME FAULT-FUNCTION
    local vol=$1 fault=$2
    ctl volume create "$vol" --size 192MiB --replicas 2 >/dev/null
    local dev
    dev=$(ctl volume attach "$vol")
    local job=(--name="$vol" --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite
               --bs=16k --iodepth=16 --size=100% --verify=crc32c --verify_fatal=1 --eta=never --randseed=3)
    fio "${job[@]}" --do_verify=1 --output="$WORK/fio-$vol.txt" &
    local fio=$!
    sleep 3
    kill -0 "$fio" 2>/dev/null || die "$vol: fio ended before the fault"
    "$fault" "$vol"
    wait "$fio" || { cat "$WORK/fio-$vol.txt"; die "$vol: fio failed after the fault"; }
    wait_for 20 "$vol degraded" '[[ "$(vol_field "$vol" state)" == degraded ]]'
    [[ "$(replica_state "$vol" 1)" == failed ]] || die "$vol: replica 1 is $(replica_state "$vol" 1)"
    [[ "$(replica_state "$vol" 0)" == healthy ]] || die "$vol: replica 0 is $(replica_state "$vol" 0)"
    fio "${job[@]}" --verify_only --output="$WORK/fio-$vol-verify.txt" || die "$vol: verify-only failed"
    say "$vol: fault survived, volume degraded, data verified"
    local old
    old=$(replica_name "$vol" 1)
    ctl setting set concurrent-replica-rebuild-per-node-limit 5 >/dev/null
    wait_for 120 "$vol healthy again" '[[ "$(vol_field "$vol" state)" == healthy ]]'
    [[ "$(replica_name "$vol" 1)" != "$old" ]] || die "$vol: the failed replica $old was trusted again"
    fio "${job[@]}" --verify_only --output="$WORK/fio-$vol-verify2.txt" || die "$vol: verify after rebuild failed"
    ctl setting set concurrent-replica-rebuild-per-node-limit 0 >/dev/null
    say "$vol: replaced by $(replica_name "$vol" 1), healthy, data verified"
    ctl volume detach "$vol" >/dev/null
}

operator_fail() { ctl replica fail "$1" "$(replica_name "$1" 1)" >/dev/null; }
delete_head() { rm -f "$(replica_dir "$1" 1)"/volume-head-*.img; }
truncate_head() { truncate -s 0 "$(replica_dir "$1" 1)"/volume-head-*.img; }

run_with_fault op-fail operator_fail
run_with_fault rm-head delete_head
run_with_fault trunc-head truncate_head

# A replica failed while detached stays failed across attach until replaced.
ctl replica fail trunc-head "$(replica_name trunc-head 0)" >/dev/null
DEV=$(ctl volume attach trunc-head)
[[ "$(replica_state trunc-head 0)" == failed ]] || die "failed replica came back as $(replica_state trunc-head 0)"
ctl volume detach trunc-head >/dev/null
stop_cairnd
say PASS
