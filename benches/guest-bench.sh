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

source "$REPO/benches/fio-lib.sh"

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
    # Same shape as Cairn's device: 2 queues x 64, buffered I/O on the file.
    truncate -s "$SIZE" "$work/rublk.img"
    rublk add loop -n 9 -q "${BENCH_QUEUES:-2}" -d 64 --buffered-io --quiet -f "$work/rublk.img"
    for _ in $(seq 1 100); do [[ -b /dev/ublkb9 ]] && break; sleep 0.2; done
    run_jobs rublk-loop /dev/ublkb9
    rublk del -n 9 || true
    targets+=(rublk-loop)
fi

echo
has_rublk=0
[[ " ${targets[*]} " == *" rublk-loop "* ]] && has_rublk=1
extra=" cairn / loop |"
[[ $has_rublk == 1 ]] && extra+=" cairn / rublk |"
printf '| job | %s |%s\n' "$(IFS='|'; echo "${targets[*]}" | sed 's/|/ | /g')" "$extra"
printf '|---|%s---|%s\n' "$(for _ in "${targets[@]}"; do printf -- '---|'; done)" "$([[ $has_rublk == 1 ]] && echo '---|')"
for j in "${jobs[@]}"; do
    row="| $j |"
    for t in "${targets[@]}"; do
        read -r iops bw _ <<<"${result[$t,$j]}"
        row+=" $iops IOPS, $bw MiB/s |"
    done
    read -r ci _ <<<"${result[cairn,$j]}"
    read -r li _ <<<"${result[loop,$j]}"
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'; }
    row+=" $(ratio "$ci" "$li") |"
    if [[ $has_rublk == 1 ]]; then
        read -r ri _ <<<"${result[rublk-loop,$j]}"
        row+=" $(ratio "$ci" "$ri") |"
    fi
    echo "$row"
done
