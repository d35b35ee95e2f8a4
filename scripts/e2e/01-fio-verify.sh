#!/usr/bin/env bash
# Case 1: a 2-replica volume survives a full-device random-write fio run with
# crc32c verification, then a separate verify-only pass; afterwards both
# replicas' head files hold identical bytes.
source "$(dirname "$0")/lib.sh"

start_cairnd --metrics-listen 127.0.0.1:9420
ctl volume create v1 --size 256MiB --replicas 2 >/dev/null
DEV=$(ctl volume attach v1)
[[ -b "$DEV" ]] || die "attach printed $DEV, which is not a block device"
say "attached at $DEV"

job=(--name=verify --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite
     --bsrange=4k-128k --iodepth=16 --size=100% --verify=crc32c --verify_fatal=1 --eta=never
     --randrepeat=1 --randseed=42)
fio "${job[@]}" --do_verify=1 --output="$WORK/fio-write.txt" || { cat "$WORK/fio-write.txt"; die "fio write+verify failed"; }
grep -q "err= 0" "$WORK/fio-write.txt" || die "fio reported errors"
fio "${job[@]}" --verify_only --output="$WORK/fio-verify.txt" || { cat "$WORK/fio-verify.txt"; die "verify-only pass failed"; }
say "fio write+verify and verify-only passes: ok"

[[ "$(vol_field v1 state)" == healthy ]] || die "volume state $(vol_field v1 state), expected healthy"
metrics=$(wget -qO- http://127.0.0.1:9420/metrics) || die "metrics endpoint did not answer"
writes=$(sed -n 's/^cairn_volume_writes_total{volume="v1"} //p' <<<"$metrics")
healthy=$(sed -n 's/^cairn_volume_healthy_replicas{volume="v1"} //p' <<<"$metrics")
[[ "${writes:-0}" -gt 1000 && "$healthy" == 2 ]] || die "metrics: writes=$writes healthy_replicas=$healthy"
say "metrics: $writes writes, $healthy healthy replicas"
ctl volume detach v1 >/dev/null
[[ ! -e "$DEV" ]] || die "$DEV still exists after detach"

a=$(sha256sum "$(replica_dir v1 0)"/volume-head-*.img | cut -d' ' -f1)
b=$(sha256sum "$(replica_dir v1 1)"/volume-head-*.img | cut -d' ' -f1)
[[ "$a" == "$b" ]] || die "replica heads differ: $a vs $b"
say "both replicas identical ($a)"
stop_cairnd
say PASS
