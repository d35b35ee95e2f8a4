#!/usr/bin/env bash
# Runs inside the guest: replica-count scaling and rebuild throughput.
# Three cairnd nodes, each in its own network namespace (veth + bridge, as
# in the e2e cluster cases). The same fio jobs run against a volume with 1,
# 2 and 3 replicas (the first on the engine's node, the others remote over
# veth); results are printed as ratios to the 1-replica volume of the same
# run. Then a full rebuild of a 3-replica volume is timed against a raw
# copy of the same bytes (the replica file, copied with dd on the same
# filesystem, and sent over the same veth with bash's /dev/tcp).
set -euo pipefail
: "${REPO:?}" "${SCRATCH:?}"
export CASE=cluster-bench
source "$REPO/scripts/e2e/cluster-lib.sh"
JOBS=$REPO/benches/fio
export SIZE=${BENCH_SIZE:-256M} RUNTIME=${BENCH_RUNTIME:-10}
jobs=(seqwrite-1m seqread-1m randwrite-4k randread-4k)
declare -A result

source "$REPO/benches/fio-lib.sh"

net_up
QUEUES=${BENCH_QUEUES:-2}
for i in 1 2 3; do start_node "$i"; done
wait_cluster 1
for n in 1 2 3; do
    nctl 1 volume create "r$n" --size "${SIZE}iB" --replicas "$n" >/dev/null
    dev=$(nctl 1 volume attach "r$n")
    run_jobs "$n-replica" "$dev"
    nctl 1 volume detach "r$n" >/dev/null
    nctl 1 volume delete "r$n" >/dev/null
done

echo
echo "## Replica count (ratios to the 1-replica volume, same run)"
echo
echo "| job | 1 replica IOPS | 1 replica MiB/s | 2 replicas | 3 replicas | guest CPU busy (1 / 2 / 3) |"
echo "|---|---:|---:|---:|---:|---:|"
for j in "${jobs[@]}"; do
    read -r i1 b1 c1 <<<"${result[1-replica,$j]}"
    read -r i2 _ c2 <<<"${result[2-replica,$j]}"
    read -r i3 _ c3 <<<"${result[3-replica,$j]}"
    printf '| %s | %s | %s | %.2fx | %.2fx | %s%% / %s%% / %s%% |\n' "$j" "$i1" "$b1" \
        "$(bc -l <<<"$i2 / $i1")" "$(bc -l <<<"$i3 / $i1")" "$c1" "$c2" "$c3"
done

# Rebuild throughput: a full copy onto a fresh replica (the operator fails
# one; it is replaced), from the local replica to a remote node.
nctl 1 volume create rb --size "${SIZE}iB" --replicas 3 >/dev/null
dev=$(nctl 1 volume attach rb)
fio --name=fill --filename="$dev" --size="$SIZE" --rw=write --bs=1m --ioengine=io_uring --direct=1 --iodepth=8 >/dev/null
victim=$(vfield 1 rb '[.replicas[] | select(.node == "n3")][0].name')
nctl 1 replica fail rb "$victim" >/dev/null
wait_for 600 "rebuild done" '[[ "$(healthy_count 1 rb)" -eq 3 ]]'
read -r copied millis <<<"$(vfield 1 rb '[.replicas[] | select(.node == "n3")][0].last_rebuild | "\(.copied_bytes) \(.millis)"')"
rebuild_mib_s=$(bc -l <<<"$copied / 1048576 / ($millis / 1000)")
src=$(vfield 1 rb '[.replicas[] | select(.node == "n1")][0].dir')
head=$(ls "$src"/volume-head-*.img)
sync
t0=$(date +%s.%N)
dd if="$head" of="$WORK/raw-copy.img" bs=1M conv=fsync status=none
t1=$(date +%s.%N)
raw_mib_s=$(bc -l <<<"$(stat -c %s "$head") / 1048576 / ($t1 - $t0)")
rm -f "$WORK/raw-copy.img"
# The same bytes over the veth, to a plain TCP sink in n3's namespace.
ip netns exec "cn3-$$" busybox nc -l -p 9600 >/dev/null &
sink=$!
sleep 1
t0=$(date +%s.%N)
ip netns exec "cn1-$$" bash -c "cat '$head' >/dev/tcp/10.77.0.3/9600"
wait "$sink"
t1=$(date +%s.%N)
net_mib_s=$(bc -l <<<"$(stat -c %s "$head") / 1048576 / ($t1 - $t0)")
nctl 1 volume detach rb >/dev/null
echo
echo "## Rebuild throughput"
echo
echo "| what | MiB/s |"
echo "|---|---:|"
printf '| full rebuild of a %s replica (%s MiB copied in %s ms) | %.1f |\n' "$SIZE" "$((copied >> 20))" "$millis" "$rebuild_mib_s"
printf '| raw copy of the replica file on the same disk (dd, fsync) | %.1f |\n' "$raw_mib_s"
printf '| raw send of the replica file over the same veth (TCP) | %.1f |\n' "$net_mib_s"
printf '| rebuild / network copy | %.2fx |\n' "$(bc -l <<<"$rebuild_mib_s / $net_mib_s")"
for i in 1 2 3; do stop_node "$i"; done
