#!/usr/bin/env bash
# Backup and restore throughput of a 4 GiB volume, to the local file://
# target and to a real S3 server (s3s-fs on 127.0.0.1), each as a ratio to
# copying the same bytes with a plain tool in the same run: `cp` + sync for
# file://, `curl --aws-sigv4` PUT/GET of one object for S3.
#
# Runs on the host: a backup reads replica files and a restore writes them;
# no ublk device is involved. The volume's data (incompressible random
# bytes, the worst case for lz4) is written into its detached replica's head
# file directly.
#
#   benches/backup-bench.sh            # 4 GiB
#   BENCH_GIB=1 benches/backup-bench.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
GIB=${BENCH_GIB:-4}
W=$repo/target/bench/backup
BIN=$repo/target/release
rm -rf "$W" && mkdir -p "$W/disk" "$W/data" "$W/s3/bench"
bash "$repo/scripts/s3-server.sh" install >/dev/null
S3S=$repo/target/tools/bin/s3s-fs
SOCK=$W/cairnd.sock
ctl() { "$BIN/cairnctl" --socket "$SOCK" "$@"; }
now() { date +%s.%N; }
rate() { bc -l <<<"$GIB * 1024 / ($2 - $1)"; } # MiB/s from two timestamps

"$BIN/cairnd" --data-dir "$W/data" --socket "$SOCK" --disk "$W/disk" >"$W/cairnd.log" 2>&1 &
CAIRND=$!
"$S3S" --host 127.0.0.1 --port 9911 --access-key bench --secret-key benchsecret "$W/s3" >"$W/s3.log" 2>&1 &
S3PID=$!
# The run holds ~10x the volume size on disk: removed at the end (KEEP=1 keeps it).
trap 'kill $CAIRND $S3PID 2>/dev/null || true; wait 2>/dev/null; [[ "${KEEP:-0}" == 1 ]] || rm -rf "$W"' EXIT
for _ in $(seq 1 100); do ctl volume list >/dev/null 2>&1 && break; sleep 0.1; done

ctl volume create src --size "${GIB}GiB" --replicas 1 >/dev/null
dir=$(ctl -o json volume get src | jq -r '.replicas[0].dir')
head=$(ls "$dir"/volume-head-*.img)
echo "filling $GIB GiB of random data"
head -c $((GIB << 30)) /dev/urandom >"$W/data.bin"
dd if="$W/data.bin" of="$head" bs=4M conv=notrunc,fsync status=none
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true

declare -A r
measure() { # NAME COMMAND...
    local t0 t1
    sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    t0=$(now); "${@:2}" >/dev/null; sync; t1=$(now)
    r[$1]=$(rate "$t0" "$t1")
    printf '%-22s %8.1f MiB/s\n' "$1" "${r[$1]}"
}

# file://
mkdir -p "$W/plain"
measure cp-out cp "$W/data.bin" "$W/plain/copy.img"
measure backup-file ctl backup create src
b=$(ctl -o json backup list src | jq -r '.[0].name')
measure restore-file ctl volume create rf --from-backup "bak://src/$b"
measure cp-in cp "$W/plain/copy.img" "$W/plain/copy2.img"

# S3
cat >"$W/creds" <<EOC
AWS_ACCESS_KEY_ID=bench
AWS_SECRET_ACCESS_KEY=benchsecret
AWS_ENDPOINTS=http://127.0.0.1:9911
EOC
ctl setting set backup-target-credential-secret "$W/creds" >/dev/null
ctl setting set backup-target "s3://bench@us-east-1/cairn/" >/dev/null
curl_s3() { curl -sSf --aws-sigv4 "aws:amz:us-east-1:s3" --user bench:benchsecret -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"; }
measure curl-put curl_s3 -T "$W/data.bin" http://127.0.0.1:9911/bench/plain.img
measure curl-get curl_s3 -o "$W/plain/get.img" http://127.0.0.1:9911/bench/plain.img
measure backup-s3 ctl backup create src
b=$(ctl -o json backup list src | jq -r '.[0].name')
measure restore-s3 ctl volume create rs --from-backup "bak://src/$b"

cores=$(nproc)
echo
echo "## Backup and restore throughput ($GIB GiB of random data, $cores cores, same run)"
echo
echo "| operation | Cairn MiB/s | plain tool | plain MiB/s | ratio |"
echo "|---|---:|---|---:|---:|"
row() { printf '| %s | %.1f | %s | %.1f | %.2fx |\n' "$1" "${r[$2]}" "$3" "${r[$4]}" "$(bc -l <<<"${r[$2]} / ${r[$4]}")"; }
row "backup to file://" backup-file "cp" cp-out
row "restore from file://" restore-file "cp" cp-in
row "backup to S3 (s3s-fs)" backup-s3 "curl PUT" curl-put
row "restore from S3 (s3s-fs)" restore-s3 "curl GET" curl-get
