#!/usr/bin/env bash
# Case 14: snapshots on a 2-replica volume on real ublk: taken under fio
# load (I/O quiesced across queues), listed, deleted (coalesced into the
# next snapshot), purged, reverted; both replicas keep identical chains and
# data; bad snapshot input changes nothing.
source "$(dirname "$0")/lib.sh"

start_cairnd
V=snap
ctl volume create $V --size 128MiB --replicas 2 >/dev/null
DEV=$(ctl volume attach $V)
MIB=$((1 << 20))
# The first 16 MiB of the device equal file $1 (no /dev/fd in the guest).
head_is() { dd if="$DEV" of="$WORK/head.bin" bs=1M count=16 iflag=direct status=none; cmp -s "$WORK/head.bin" "$1"; }

dd if=/dev/urandom of="$WORK/a.bin" bs=1M count=16 status=none
dd if=/dev/urandom of="$WORK/b.bin" bs=1M count=16 status=none
dd if="$WORK/a.bin" of="$DEV" bs=1M oflag=direct status=none
ctl snapshot create $V --name s1 --label app=db >/dev/null

# Snapshots while fio writes and verifies the upper half: the switch to a
# new head happens between requests on every queue.
fio --name=load --filename="$DEV" --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio --direct=1 \
    --offset=64M --size=64M --time_based --runtime=6 --verify=crc32c --do_verify=0 \
    --verify_state_save=1 --numjobs=1 --group_reporting >"$WORK/fio-load.log" 2>&1 &
FIO=$!
sleep 1
for i in 1 2 3; do
    ctl snapshot create $V --name "load$i" >/dev/null || die "snapshot under load failed"
    sleep 1
done
wait $FIO || die "fio under snapshots failed: $(tail -n 5 "$WORK/fio-load.log")"
fio --name=load --filename="$DEV" --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio --direct=1 \
    --offset=64M --size=64M --verify=crc32c --verify_only --verify_state_load=1 >"$WORK/fio-verify.log" 2>&1 \
    || die "fio verify after snapshots under load: $(grep -m3 -i 'verify\|err' "$WORK/fio-verify.log")"
say "3 snapshots taken under fio load; fio verify clean"

dd if="$WORK/b.bin" of="$DEV" bs=1M oflag=direct status=none
ctl snapshot create $V --name s2 >/dev/null
names=$(ctl -o json snapshot list $V | jq -r '.[].name' | tr '\n' ' ')
[[ "$names" == "s1 load1 load2 load3 s2 volume-head " ]] || die "snapshot list: $names"
[[ $(ctl -o json snapshot list $V | jq -r '.[0].labels.app') == db ]] || die "label lost"
[[ $(ctl -o json snapshot list $V | jq -r '.[0].size') -ge $((16 * MIB)) ]] || die "s1 size"

# Delete load2: its child load3 is a snapshot, so it is merged away.
out=$(ctl -o json snapshot delete $V load2)
[[ $(jq -r .coalesced <<<"$out") == true ]] || die "load2 not coalesced: $out"
# Delete s2: its child is the head, so it is only marked.
out=$(ctl -o json snapshot delete $V s2)
[[ $(jq -r .coalesced <<<"$out") == false ]] || die "s2 should only be marked: $out"
[[ $(ctl -o json snapshot list $V | jq -r '.[] | select(.name=="s2") | .removed') == true ]] || die "s2 not marked removed"
ctl snapshot create $V --name s3 >/dev/null
merged=$(ctl -o json snapshot purge $V | jq -r '.merged | join(" ")')
[[ "$merged" == "s2" ]] || die "purge merged '$merged', expected s2"
names=$(ctl -o json snapshot list $V | jq -r '.[].name' | tr '\n' ' ')
[[ "$names" == "s1 load1 load3 s3 volume-head " ]] || die "after delete/purge: $names"
head_is "$WORK/b.bin" || die "data changed by delete/purge"
say "delete coalesced load2, marked s2; purge merged s2; data unchanged"

# Both replicas hold the same chain.
r0=$(replica_dir $V 0) r1=$(replica_dir $V 1)
[[ "$(cd "$r0" && ls volume-snap-*.img)" == "$(cd "$r1" && ls volume-snap-*.img)" ]] || die "replica chains differ"

# Bad input changes nothing.
before=$(ctl -o json snapshot list $V)
for args in "snapshot create $V --name Bad_Name" "snapshot create $V --name s1" "snapshot delete $V nope" \
    "snapshot revert $V s1" "snapshot list nope" "snapshot create $V --label =x" "snapshot delete $V volume-head"; do
    if out=$(ctl $args 2>&1); then die "'$args' succeeded: $out"; fi
    say "ok: $args -> $out"
done
[[ "$before" == "$(ctl -o json snapshot list $V)" ]] || die "bad input changed the chain"

# Revert (detached) to s1: the first 16 MiB are a.bin again.
ctl volume detach $V >/dev/null
dropped=$(ctl -o json snapshot revert $V s1 | jq -r '.dropped | join(" ")')
[[ "$dropped" == "load1 load3 s3" ]] || die "revert dropped '$dropped'"
DEV=$(ctl volume attach $V)
head_is "$WORK/a.bin" || die "revert: data is not s1's"
[[ "$(cd "$r0" && ls volume-snap-*.img)" == "$(cd "$r1" && ls volume-snap-*.img)" ]] || die "replica chains differ after revert"
say "revert to s1 restored its data on both replicas"
ctl volume detach $V >/dev/null
stop_cairnd
say PASS
