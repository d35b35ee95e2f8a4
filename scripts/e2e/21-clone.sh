#!/usr/bin/env bash
# Volumes made from a snapshot and clones, on real devices: a volume from
# snapshot s1 holds the source as it was at s1 (sha256 of the devices) while
# the source keeps changing under fio; a clone holds the source as it is;
# a bigger copy is zero past the source's end; bad sources are refused and
# make nothing. Prints the copy's throughput beside a plain dd of the same
# bytes between two devices in the same run.
source "$(dirname "$0")/lib.sh"
start_cairnd

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
dev_sum() { sha256sum <"$1" | cut -d' ' -f1; }

ctl volume create src --size 64MiB --replicas 2 >/dev/null
SRC=$(ctl volume attach src)
head -c 48M /dev/urandom >"$WORK/src.bytes"
dd if="$WORK/src.bytes" of="$SRC" bs=1M oflag=direct status=none
ctl snapshot create src --name s1 >/dev/null
S1=$(dev_sum "$SRC")

# The source keeps changing while its snapshot is copied.
fio --name=churn --filename="$SRC" --ioengine=libaio --direct=1 --rw=randwrite --bs=64k --iodepth=4 \
    --size=64M --time_based --runtime=600 --eta=never --output="$WORK/fio.txt" >/dev/null 2>&1 &
FIO=$!
sleep 1
t0=$(now)
ctl volume create c1 --from-snapshot src/s1 --replicas 2 >/dev/null
t1=$(now)
COPY=$(secs "$t0" "$t1")
kill -0 "$FIO" 2>/dev/null || die "fio on the source ended during the copy"
C1=$(ctl volume attach c1)
[[ "$(dev_sum "$C1")" == "$S1" ]] || die "c1 differs from src at snapshot s1"
[[ "$(dev_sum "$SRC")" != "$S1" ]] || die "the source did not change (the test proves nothing)"
say "c1 from src/s1: equal to src at s1 while src kept changing (copy ${COPY}s)"
kill "$FIO"
wait "$FIO" 2>/dev/null || true

S2=$(dev_sum "$SRC")
ctl volume create c2 --from-volume src --size 96MiB >/dev/null
C2=$(ctl volume attach c2)
[[ "$(head -c 64M "$C2" | sha256sum | cut -d' ' -f1)" == "$S2" ]] || die "clone c2 differs from src"
[[ "$(tail -c 32M "$C2" | tr -d '\0' | wc -c)" -eq 0 ]] || die "c2 past the source's end is not zero"
ctl -o json snapshot list src | jq -e '.[] | select(.labels["cairn.io/clone"] == "c2")' >/dev/null ||
    die "no labelled snapshot of src for the clone"
say "clone c2 (96 MiB) equal to src, zero past its end"

# Bad sources: refused, nothing made.
before=$(ctl -o json volume list | jq length)
for args in "--from-snapshot src" "--from-snapshot src/nope" "--from-volume ghost" \
    "--from-snapshot src/s1 --size 32MiB" "--from-snapshot src/s1 --from-volume src"; do
    # shellcheck disable=SC2086
    if out=$(ctl volume create bad $args 2>&1); then die "create bad $args succeeded"; fi
    say "refused ($args): $out"
done
[[ "$(ctl -o json volume list | jq length)" -eq "$before" ]] || die "a refused create made a volume"

# Throughput: the copy against a plain dd of the same bytes between devices.
ctl volume create plain --size 64MiB --replicas 2 >/dev/null
PLAIN=$(ctl volume attach plain)
t0=$(now)
dd if="$SRC" of="$PLAIN" bs=1M iflag=direct oflag=direct status=none
t1=$(now)
DD=$(secs "$t0" "$t1")
say "copy of a 64 MiB volume's snapshot (48 MiB of data) ${COPY}s; plain dd of the 64 MiB device ${DD}s"
for v in c1 c2 plain src; do ctl volume delete "$v" --force >/dev/null; done
say PASS
