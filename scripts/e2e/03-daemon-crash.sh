#!/usr/bin/env bash
# Case 3: kill -9 cairnd while fio writes. The kernel keeps /dev/ublkbN and
# parks its I/O (ublk user recovery); the restarted cairnd takes the same
# device back, the parked writes are reissued, fio finishes without an error,
# and a verify-only pass finds every block fio wrote.
source "$(dirname "$0")/lib.sh"

start_cairnd
ctl volume create crash --size 256MiB --replicas 2 >/dev/null
DEV=$(ctl volume attach crash)
say "attached at $DEV"

job=(--name=crash --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite
     --bs=16k --iodepth=16 --size=100% --verify=crc32c --verify_fatal=1 --eta=never
     --randrepeat=1 --randseed=7 --fsync=32)
fio "${job[@]}" --do_verify=0 --output="$WORK/fio-write.txt" &
FIO=$!
sleep 4
kill -0 "$FIO" 2>/dev/null || die "fio finished before the crash could be injected; grow the volume"
say "kill -9 cairnd (pid $CAIRND_PID) during fio"
kill -9 "$CAIRND_PID"
wait "$CAIRND_PID" 2>/dev/null || true
CAIRND_PID=""
[[ -b "$DEV" ]] || die "$DEV vanished when cairnd died (expected it parked for recovery)"
sleep 1
start_cairnd
wait_for 60 "volume back attached" '[[ "$(vol_field crash device)" == "$DEV" ]]'
say "restarted cairnd recovered $DEV, state $(vol_field crash state)"
wait "$FIO" || { cat "$WORK/fio-write.txt"; die "fio failed across the daemon crash"; }
fio "${job[@]}" --verify_only --output="$WORK/fio-verify.txt" || { cat "$WORK/fio-verify.txt"; die "verify after crash failed"; }
say "fio completed across kill -9 and every block verifies"
[[ "$(vol_field crash state)" == healthy ]] || die "state $(vol_field crash state) after recovery"
ctl volume detach crash >/dev/null
stop_cairnd
say PASS
