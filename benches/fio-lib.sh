#!/usr/bin/env bash
# Shared by the guest benchmark scripts: run the fio jobs of benches/fio/
# against one target and record "IOPS MiB/s CPU-busy%" per job in the
# associative array `result[TARGET,JOB]` (declared by the caller, with
# `jobs`, `JOBS`, `SIZE` and `RUNTIME`).

# CPU time of the whole guest (everything shares its vCPUs): busy and total
# jiffies from /proc/stat.
cpu() { awk '/^cpu / { print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9 }' /proc/stat; }

run_jobs() { # TARGET-NAME FILENAME
    local target=$1
    export FILENAME=$2
    # Fill first so reads hit allocated blocks on every target.
    fio --name=fill --filename="$FILENAME" --size="$SIZE" --rw=write --bs=1m --ioengine=io_uring \
        --direct=1 --iodepth=8 >/dev/null
    for j in "${jobs[@]}"; do
        local out iops bw b0 t0 b1 t1 busy
        read -r b0 t0 <<<"$(cpu)"
        out=$(cd "$JOBS" && fio --output-format=json "$j.fio")
        read -r b1 t1 <<<"$(cpu)"
        busy=$(( (b1 - b0) * 100 / (t1 - t0 > 0 ? t1 - t0 : 1) ))
        iops=$(jq '[.jobs[0].read.iops, .jobs[0].write.iops] | add | floor' <<<"$out")
        bw=$(jq '[.jobs[0].read.bw_bytes, .jobs[0].write.bw_bytes] | add / 1048576 | floor' <<<"$out")
        result[$target,$j]="$iops $bw $busy"
        echo "bench $target $j iops=$iops MiB/s=$bw cpu-busy=$busy%"
    done
}
