#!/usr/bin/env bash
# Volumes that follow their workload (design 0007):
#   A. handover: a volume written on n1 is attached on n2, then on n3 (asked
#      from n1), with the same bytes each time; attach elsewhere while it is
#      mounted on its owner is refused and changes nothing.
#   B. forced takeover after kill -9 of the owner mid-write: every batch the
#      writer had fsynced verifies on the new owner; the old owner, restarted,
#      drops its record (it cannot claim the replicas back) and its replica
#      is rebuilt by the new owner.
#   C. forced takeover from an owner cut off the network with fio running on
#      it: blocks it writes after the takeover are refused or absent from the
#      new owner's replicas; once healed it reports the volume fenced, and
#      its replica is rebuilt.
# Prints the handover and takeover times (command start to device).
source "$(dirname "$0")/cluster-lib.sh"

net_up
for i in 1 2 3; do start_node "$i"; done
wait_cluster 1
wait_cluster 2
nctl 1 setting set storage-minimal-available-percentage 0 >/dev/null

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
owner_of() { nctl "$1" -o json volume get "$2" | jq -r .owner; }

PARTS=${PARTS:-ABC}
# ---------------------------------------------------------------- A. handover
if [[ $PARTS == *A* ]]; then
nctl 1 volume create h --size 64MiB --replicas 3 >/dev/null
D1=$(nctl 1 volume attach h)
head -c 32M /dev/urandom >"$WORK/h.data"
dd if="$WORK/h.data" of="$D1" bs=1M oflag=direct status=none
SUM=$(sha256sum <"$D1" | cut -d' ' -f1)

mkfs.ext4 -q "$D1"
mkdir -p "$WORK/mnt"
mount "$D1" "$WORK/mnt"
if out=$(nctl 2 volume attach h 2>&1); then
    umount "$WORK/mnt"
    die "attach on n2 while h is mounted on n1 succeeded: $out"
fi
grep -q "attached on n1 and in use" <<<"$out" || { umount "$WORK/mnt"; die "unclear refusal: $out"; }
[[ "$(owner_of 2 h)" == n1 && -b "$D1" ]] || { umount "$WORK/mnt"; die "the refused attach changed something"; }
say "attach on n2 while mounted on n1: refused ($out)"
umount "$WORK/mnt"
dd if="$WORK/h.data" of="$D1" bs=1M oflag=direct status=none

t0=$(now)
D2=$(nctl 2 volume attach h)
t1=$(now)
HANDOVER=$(secs "$t0" "$t1")
[[ -b "$D2" ]] || die "no device on n2: $D2"
[[ "$(owner_of 1 h)" == n2 ]] || die "n1 does not see n2 as h's owner"
[[ "$(vfield 2 h .device)" == "$D2" ]] || die "n2 does not show h at $D2"
[[ "$(sha256sum <"$D2" | cut -d' ' -f1)" == "$SUM" ]] || die "h on n2 differs from h on n1"
say "handover n1 -> n2 in ${HANDOVER}s, device $D2, sha256 equal"

t0=$(now)
D3=$(nctl 1 volume attach h --node n3)
t1=$(now)
[[ "$(owner_of 2 h)" == n3 ]] || die "n2 does not see n3 as h's owner"
[[ "$(sha256sum <"$D3" | cut -d' ' -f1)" == "$SUM" ]] || die "h on n3 differs"
say "handover n2 -> n3 (asked on n1) in $(secs "$t0" "$t1")s, sha256 equal"
nctl 3 volume delete h --force >/dev/null
fi

# ------------------------------------------- B. kill -9 the owner mid-write
# Batch b is 256 KiB at offset b*256KiB; every 4 KiB block names its batch
# and block. A batch is logged only after its dd (O_DIRECT + fsync) returned.
batch() { perl -e 'for $k (0..63) { printf "%-4096s", sprintf("cairn batch %08d block %02d ", $ARGV[0], $k) }' "$1"; }
writer() { # DEV LOG
    local b=0
    while [[ $b -lt 256 ]]; do
        batch "$b" | dd of="$1" bs=256K seek="$b" oflag=direct conv=fsync,notrunc status=none 2>/dev/null || return 0
        echo "$b" >>"$2"
        b=$((b + 1))
    done
}
nctl 1 volume create k --size 64MiB --replicas 3 >/dev/null
DK=$(nctl 1 volume attach k)
: >"$WORK/k.log"
writer "$DK" "$WORK/k.log" &
WRITER=$!
wait_for 120 "10 batches written" '[[ $(wc -l <"$WORK/k.log") -ge 10 ]]'
say "kill -9 the owner n1 mid-write"
kill_node 1
CONFIRMED=$(tail -n 1 "$WORK/k.log")
wait_for 60 "n2 sees n1 down" '[[ "$(nctl 2 -o json node list | jq -r ".[] | select(.name == \"n1\") | .up")" == false ]]'
if out=$(nctl 2 volume attach k 2>&1); then die "attach without --force took k from an unreachable owner: $out"; fi
grep -q "owner n1 unreachable" <<<"$out" || die "unclear refusal: $out"
t0=$(now)
DK2=$(nctl 2 volume attach k --force)
t1=$(now)
TAKEOVER=$(secs "$t0" "$t1")
say "forced takeover on n2 in ${TAKEOVER}s; the writer had fsynced batches 0..$CONFIRMED"
# The old owner back at once: it must drop its record (the replicas refuse
# its term) and remove the device its crash left parked, so its blocked
# writer ends (and no parked device outlives the case).
start_node 1
wait_for 60 "n1 drops its record of k" 'grep -q "dropping this node.s record" "$WORK/n1/log"'
[[ "$(owner_of 1 k)" == n2 ]] || die "n1 does not see n2 as k's owner"
wait_for 60 "the writer on n1's parked device to end" '! kill -0 "$WRITER" 2>/dev/null'
# (Files, not <(...): the guest's /dev has no /dev/fd.)
for b in $(seq 0 "$CONFIRMED"); do
    batch "$b" >"$WORK/want"
    dd if="$DK2" bs=256K skip="$b" count=1 iflag=direct status=none >"$WORK/got"
    cmp -s "$WORK/want" "$WORK/got" || die "batch $b, fsynced before the crash, differs on the new owner: $(cmp "$WORK/want" "$WORK/got" 2>&1)"
done
say "every fsynced batch verifies on n2"
wait_for 180 "k's replica on n1 rebuilt" '[[ "$(healthy_count 2 k)" -eq 3 ]]'
say "old owner restarted: record dropped, writer ended, its replica rebuilt"
nctl 2 volume detach k >/dev/null
same_replicas 2 k
nctl 2 volume delete k >/dev/null

# ----------------------- C. the owner cut off, fio running on it, takeover
nctl 1 volume create f --size 64MiB --replicas 3 >/dev/null
DF=$(nctl 1 volume attach f)
timeout 300 fio --name=busy --filename="$DF" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --iodepth=4 --offset=0 --size=16M --time_based --runtime=40 --eta=never \
    --output="$WORK/fio-busy.txt" >/dev/null 2>&1 &
BUSY=$!
sleep 2
say "cut n1 off the network while fio runs on it"
link_down 1
wait_for 60 "n2 sees n1 down" '[[ "$(nctl 2 -o json node list | jq -r ".[] | select(.name == \"n1\") | .up")" == false ]]'
t0=$(now)
DF2=$(nctl 2 volume attach f --force)
t1=$(now)
say "forced takeover of f on n2 in $(secs "$t0" "$t1")s (owner cut off, fio running on it)"
# Everything n1 writes from now on is after the takeover: a marker in
# every block, in a region fio does not touch.
marker() { perl -e 'for (0..15) { printf "%-4096s", "CAIRN-OLD-OWNER-WRITE-AFTER-TAKEOVER" }'; }
acked=0 refused=0
for b in $(seq 0 15); do
    if marker | timeout 60 dd of="$DF" bs=64K seek=$((512 + b)) oflag=direct conv=notrunc status=none 2>/dev/null; then
        acked=$((acked + 1))
    else
        refused=$((refused + 1))
    fi
done
say "old owner's writes after the takeover: $acked acknowledged there (cut off), $refused refused"
link_up 1
wait_for 120 "n1 reports f fenced" \
    '[[ "$(nctl 1 -o json volume list | jq -r ".[] | select(.name == \"f\" and .owner == \"n1\") | .state")" == fenced ]]'
grep -q "volume fenced" "$WORK/n1/log" || die "n1's log does not say f was fenced"
wait_for 120 "fio on the fenced old owner to end" '! kill -0 "$BUSY" 2>/dev/null'
nctl 1 volume detach f >/dev/null
wait_for 60 "n1 drops its record of f" '[[ "$(owner_of 1 f)" == n2 ]]'
wait_for 240 "f's replica on n1 rebuilt" '[[ "$(healthy_count 2 f)" -eq 3 ]]'
hits=$(grep -c "CAIRN-OLD-OWNER" "$DF2" || true)
[[ "$hits" -eq 0 ]] || die "$hits blocks the old owner wrote after the takeover are on the new owner's device"
nctl 2 volume detach f >/dev/null
for d in $(vfield 2 f '.replicas[].dir'); do
    if grep -l "CAIRN-OLD-OWNER" "$d"/*.img 2>/dev/null; then
        die "replica $d holds a block the old owner wrote after the takeover"
    fi
done
say "no block written by the old owner after the takeover is in any of the new owner's replicas"
nctl 2 volume delete f >/dev/null

say "handover ${HANDOVER:-(not run)}s, forced takeover ${TAKEOVER:-(not run)}s"
for i in 1 2 3; do stop_node "$i"; done
say PASS
