#!/usr/bin/env bash
# Guest smoke test of the engine + ublk frontend without the control plane.
set -euo pipefail
ex=$REPO/target/release/examples/serve_volume
mkdir -p $SCRATCH/r0 $SCRATCH/r1 && cd $SCRATCH
coproc SRV { "$ex" $((256 << 20)) $SCRATCH/r0 $SCRATCH/r1 2>$SCRATCH/srv.log; }
read -r dev <&"${SRV[0]}"
echo "device: $dev"
fio --name=v --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-128k --iodepth=16 \
    --size=100% --verify=crc32c --verify_fatal=1 --eta=never --output-format=terse >/dev/null && echo "fio verify ok"
mkfs.ext4 -q -F "$dev" && echo "mkfs ok"
echo stop >&"${SRV[1]}"
wait $SRV_PID || true
cat $SCRATCH/srv.log | tail -5
cmp $SCRATCH/r0/volume-head-000.img $SCRATCH/r1/volume-head-000.img && echo "replicas identical"
