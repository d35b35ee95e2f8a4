#!/usr/bin/env bash
# The quickstart's main job, on embedded defaults: a cairnd on a temporary
# data dir with two disks, a 2-replica volume attached as /dev/ublkbN, an
# ext4 filesystem on it, mounted, shown in `cairnctl volume get`.
# Runs on a host with ublk, or inside the guest (scripts/quickstart.sh picks).
set -euo pipefail
REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
BIN=$REPO/target/release
base=${SCRATCH:-/tmp}
dir=$(mktemp -d "$base/cairn-quickstart.XXXXXX")
sock=$dir/cairnd.sock
mkdir -p "$dir/disk-a" "$dir/disk-b" "$dir/mnt"
# Each command is echoed (to stderr, so `dev=$(ctl volume attach ...)` stays clean).
ctl() { echo "\$ cairnctl $*" >&2; "$BIN/cairnctl" --socket "$sock" "$@"; }
show() { echo "\$ $*" >&2; "$@"; }

cleanup() {
    mountpoint -q "$dir/mnt" && umount "$dir/mnt"
    [[ -n "${pid:-}" ]] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT

echo "\$ cairnd --data-dir $dir/data --socket $sock --disk $dir/disk-a --disk $dir/disk-b &"
"$BIN/cairnd" --data-dir "$dir/data" --socket "$sock" --disk "$dir/disk-a" --disk "$dir/disk-b" \
    >"$dir/cairnd.log" 2>&1 &
pid=$!
for _ in $(seq 1 150); do [[ -S $sock ]] && break; sleep 0.2; done

ctl volume create demo --size 1GiB --replicas 2 >/dev/null
dev=$(ctl volume attach demo)
echo "$dev"
show mkfs.ext4 -q "$dev"
show mount "$dev" "$dir/mnt"
echo "hello from cairn" >"$dir/mnt/hello.txt"
show df -h "$dir/mnt"
sync
# Data protection on the embedded defaults: a snapshot, then a backup to the
# local target (file://<data-dir>/backups), restored into a new volume.
ctl snapshot create demo --name first >/dev/null
ctl snapshot list demo
ctl backup create demo
ctl backup list demo
backup=$("$BIN/cairnctl" --socket "$sock" -o json backup list demo | jq -r '.[0].handle')
ctl volume create restored --from-backup "$backup" --replicas 1 >/dev/null
ctl volume get demo
ctl volume get restored
if [[ "${KEEP:-0}" == 1 ]]; then
    echo "cairnd keeps running (pid $pid); socket $sock; unmount and kill it when done."
    trap - EXIT
fi
