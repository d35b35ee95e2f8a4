#!/usr/bin/env bash
# Guest smoke test of ublk user recovery: kill -9 the server during fio,
# start a new one on the same device id; fio must finish and verify.
set -euo pipefail
ex=$REPO/target/release/examples/serve_volume
mkdir -p $SCRATCH/r0 $SCRATCH/r1 && cd $SCRATCH
mkfifo ctl1
(exec "$ex" $((192 << 20)) $SCRATCH/r0 $SCRATCH/r1 <ctl1 >dev1 2>srv1.log) &
srv=$!
exec 7>ctl1
for _ in $(seq 50); do [[ -s dev1 ]] && break; sleep 0.2; done
dev=$(cat dev1); echo "device: $dev"
job=(--name=v --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --bs=16k --iodepth=16
     --size=100% --verify=crc32c --verify_fatal=1 --eta=never --randseed=5)
fio "${job[@]}" --do_verify=0 --output=fio1.txt &
fio=$!
sleep 3
kill -9 $srv; echo "killed server"; sleep 1
ls -l "$dev" && cat /sys/block/$(basename $dev)/size
mkfifo ctl2
(exec "$ex" --recover "${dev#/dev/ublkb}" $((192 << 20)) $SCRATCH/r0 $SCRATCH/r1 <ctl2 >dev2 2>srv2.log) &
srv2=$!
exec 8>ctl2
for _ in $(seq 100); do [[ -s dev2 ]] && break; sleep 0.2; done
echo "recovered as $(cat dev2)"
wait $fio && echo "fio survived the crash" || { cat fio1.txt; tail srv2.log; exit 1; }
fio "${job[@]}" --verify_only --output=fio2.txt && echo "verify ok" || { cat fio2.txt; exit 1; }
echo stop >&8; wait $srv2 || true
tail -3 srv2.log
