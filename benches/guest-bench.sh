#!/usr/bin/env bash
# Runs inside the guest: the same fio jobs against a raw file, a kernel loop
# device on the same kind of backing file, a 1-replica Cairn volume, and
# (when `rublk` is on PATH) rublk's loop target; prints a table of IOPS/bandwidth
# and the ratios of Cairn to the loop device. All targets live on the same
# scratch filesystem and are measured in the same run.
set -euo pipefail
: "${REPO:?}" "${SCRATCH:?}"
BIN=$REPO/target/release
JOBS=$REPO/benches/fio
export SIZE=${BENCH_SIZE:-1G} RUNTIME=${BENCH_RUNTIME:-15}
work=$SCRATCH/bench
rm -rf "$work" && mkdir -p "$work/disk"
jobs=(seqwrite-1m seqread-1m randwrite-4k randread-4k)
declare -A result

run_jobs() { # TARGET-NAME FILENAME
    local target=$1
    export FILENAME=$2
    # Fill first so reads hit allocated blocks on every target.
    fio --name=fill --filename="$FILENAME" --size="$SIZE" --rw=write --bs=1m --ioengine=io_uring \
        --direct=1 --iodepth=8 >/dev/null
    for j in "${jobs[@]}"; do
        local out
        out=$(cd "$JOBS" && fio --output-format=json "$j.fio")
        local iops bw
        iops=$(jq '[.jobs[0].read.iops, .jobs[0].write.iops] | add | floor' <<<"$out")
        bw=$(jq '[.jobs[0].read.bw_bytes, .jobs[0].write.bw_bytes] | add / 1048576 | floor' <<<"$out")
        result[$target,$j]="$iops $bw"
        echo "bench $target $j iops=$iops MiB/s=$bw"
    done
}

# Raw file on the scratch filesystem.
truncate -s "$SIZE" "$work/raw.img"
run_jobs raw-file "$work/raw.img"

# Kernel loop device (buffered, like Cairn's replica files).
truncate -s "$SIZE" "$work/loop.img"
loopdev=$(losetup --find --show "$work/loop.img")
run_jobs loop "$loopdev"
losetup -d "$loopdev"

# Cairn, one replica.
sock=$work/cairnd.sock
"$BIN/cairnd" --data-dir "$work/data" --socket "$sock" --disk "$work/disk" \
    --queues "${BENCH_QUEUES:-2}" --queue-depth 64 >"$work/cairnd.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
for _ in $(seq 1 150); do [[ -S $sock ]] && break; sleep 0.2; done
"$BIN/cairnctl" --socket "$sock" volume create bench --size "${SIZE}iB" --replicas 1 >/dev/null
dev=$("$BIN/cairnctl" --socket "$sock" volume attach bench)
run_jobs cairn "$dev"
"$BIN/cairnctl" --socket "$sock" volume detach bench >/dev/null

targets=(raw-file loop cairn)
if command -v rublk >/dev/null; then
    truncate -s "$SIZE" "$work/rublk.img"
    rublk add loop -f "$work/rublk.img" >"$work/rublk.json"
    rdev=/dev/ublkb$(jq -r '.dev_id // ."dev_info".dev_id' "$work/rublk.json" 2>/dev/null || echo 0)
    run_jobs rublk-loop "$rdev"
    rublk del -a || true
    targets+=(rublk-loop)
fi

echo
printf '| job | %s | cairn / loop |\n' "$(IFS='|'; echo "${targets[*]}" | sed 's/|/ | /g')"
printf '|---|%s---|\n' "$(for _ in "${targets[@]}"; do printf -- '---|'; done)"
for j in "${jobs[@]}"; do
    row="| $j |"
    for t in "${targets[@]}"; do
        read -r iops bw <<<"${result[$t,$j]}"
        row+=" $iops IOPS, $bw MiB/s |"
    done
    read -r ci _ <<<"${result[cairn,$j]}"
    read -r li _ <<<"${result[loop,$j]}"
    ratio=$(awk -v a="$ci" -v b="$li" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
    echo "$row ${ratio}x |"
done
