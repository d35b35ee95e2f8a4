#!/usr/bin/env bash
# Case 18: expanding an attached volume, on whichever kernel the guest runs
# (scripts/vm/run.sh's VM_KERNEL). cairnd reads the ublk driver's feature
# bits at run time:
#   - without UBLK_F_UPDATE_SIZE (Linux < 6.16, e.g. 6.12) it refuses with
#     the exact "needs Linux 6.16" message and nothing changes: the record
#     and /dev/ublkbN keep their size, the mounted ext4 keeps working;
#   - with it (7.3) the volume grows while mounted and written (fio with
#     crc32c verify, its writes spanning the growth): /dev/ublkbN shows the new
#     size at once, resize2fs grows the mounted ext4, the new range takes
#     data, both replicas are healthy at the new size, and everything
#     verifies after a re-attach.
# Then, detached, the offline expansion works on both.
source "$(dirname "$0")/lib.sh"

release=$(uname -r)
IFS=.- read -r major minor _ <<<"$release"
if ((major > 6 || (major == 6 && minor >= 16))); then
    has_update_size=1
else
    has_update_size=0
    want="online expansion needs Linux 6.16 or newer (this kernel: $release); detach the volume first"
fi
say "kernel $release (UBLK_F_UPDATE_SIZE expected: $has_update_size)"

start_cairnd
# `node get` says the same of this kernel.
node_json=$(ctl -o json node get)
[[ "$(jq -r .kernel <<<"$node_json")" == "$release" ]] || die "node get: kernel $(jq -r .kernel <<<"$node_json"), uname $release"
want_online=$([[ $has_update_size == 1 ]] && echo true || echo false)
[[ "$(jq -r .online_expansion <<<"$node_json")" == "$want_online" ]] ||
    die "node get: online_expansion $(jq -r .online_expansion <<<"$node_json"), expected $want_online"
say "node get: kernel $release, online_expansion $want_online, ublk features $(jq -r .ublk_features <<<"$node_json")"
# The scratch disk is shared by the whole suite: its free space is not this
# case's business (the placement rules would refuse the offline growth).
ctl setting set storage-minimal-available-percentage 0 >/dev/null
vol=online-x
size=$((256 << 20))
ctl volume create "$vol" --size 256MiB --replicas 2 >/dev/null
DEV=$(ctl volume attach "$vol")
mkfs.ext4 -q -F "$DEV"
mnt="$WORK/mnt"
mkdir -p "$mnt"
mount "$DEV" "$mnt"
dd if=/dev/urandom of="$mnt/before" bs=1M count=8 status=none
sync
sum_before=$(sha256sum <"$mnt/before")

if [[ $has_update_size == 0 ]]; then
if out=$(ctl volume expand "$vol" --size 512MiB 2>&1); then die "expanded while attached: $out"; fi
grep -qF -- "$want" <<<"$out" || die "unexpected refusal: $out (expected: $want)"
say "attached expand refused: ${out#error: }"

# Nothing changed: the record, the live device and the filesystem.
[[ $(vol_field "$vol" size) -eq $size ]] || die "record size is $(vol_field "$vol" size) after the refusal"
[[ $(blockdev --getsize64 "$DEV") -eq $size ]] || die "$DEV is $(blockdev --getsize64 "$DEV") bytes after the refusal"
[[ $(vol_field "$vol" state) == healthy ]] || die "volume state $(vol_field "$vol" state) after the refusal"
dd if=/dev/urandom of="$mnt/after" bs=1M count=8 conv=fsync status=none || die "cannot write after the refusal"
sum_after=$(sha256sum <"$mnt/after")
umount "$mnt"
ctl volume detach "$vol" >/dev/null
DEV=$(ctl volume attach "$vol")
mount "$DEV" "$mnt"
[[ $(sha256sum <"$mnt/before") == "$sum_before" && $(sha256sum <"$mnt/after") == "$sum_after" ]] ||
    die "data changed across the refusal and a re-attach"
umount "$mnt"
ctl volume detach "$vol" >/dev/null
say "size unchanged ($size bytes), files written before and after the refusal verify after a re-attach"
else
# Online: fio writes a file on the mounted ext4 (crc32c verify) while the
# volume grows under it.
fio --name=grow --filename="$mnt/fio" --size=48M --bs=4k --rw=randwrite --direct=1 \
    --ioengine=libaio --iodepth=8 --rate_iops=1500 --verify=crc32c --verify_fatal=1 \
    --output="$WORK/fio-grow.log" >/dev/null 2>&1 &
FIO=$!
sleep 2
kill -0 "$FIO" 2>/dev/null || die "fio did not start: $(tail -n 5 "$WORK/fio-grow.log")"
t0=$(date +%s.%N)
out=$(ctl volume expand "$vol" --size 512MiB 2>&1) || { kill "$FIO"; die "online expansion failed: $out"; }
t1=$(date +%s.%N)
[[ $(blockdev --getsize64 "$DEV") -eq $((512 << 20)) ]] || { kill "$FIO"; die "$DEV is $(blockdev --getsize64 "$DEV") bytes after the online expansion"; }
[[ $(vol_field "$vol" size) -eq $((512 << 20)) ]] || { kill "$FIO"; die "record size $(vol_field "$vol" size)"; }
resize2fs "$DEV" >/dev/null 2>&1 || { kill "$FIO"; die "online resize2fs failed"; }
kill -0 "$FIO" 2>/dev/null || die "fio ended before the growth did: raise its size or lower its rate"
wait "$FIO" || die "fio (writes through the growth, then crc32c verify) failed: $(grep -m3 -i "verify\|crc\|err" "$WORK/fio-grow.log")"
sum_fio=$(sha256sum <"$mnt/fio")
fs_mib=$(df -B1M --output=size "$mnt" | tail -n1 | tr -dc 0-9)
[[ $fs_mib -gt 400 ]] || die "mounted filesystem is $fs_mib MiB after the online growth"
# The new range takes data: a file larger than the old volume.
dd if=/dev/urandom of="$mnt/big" bs=1M count=300 conv=fsync status=none || die "cannot fill the grown filesystem"
sum_big=$(sha256sum <"$mnt/big")
[[ $(vol_field "$vol" state) == healthy ]] || die "volume state $(vol_field "$vol" state) after the growth"
healthy=$(ctl -o json volume get "$vol" | jq '[.replicas[] | select(.state == "healthy")] | length')
[[ $healthy -eq 2 ]] || die "$healthy healthy replicas after the growth"
say "online: 256 -> 512 MiB under fio in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')s, ext4 grown mounted to $fs_mib MiB, 300 MiB written past the old end"
umount "$mnt"
ctl volume detach "$vol" >/dev/null
DEV=$(ctl volume attach "$vol")
[[ $(blockdev --getsize64 "$DEV") -eq $((512 << 20)) ]] || die "$DEV is $(blockdev --getsize64 "$DEV") bytes after a re-attach"
mount "$DEV" "$mnt"
[[ $(sha256sum <"$mnt/before") == "$sum_before" && $(sha256sum <"$mnt/big") == "$sum_big" ]] ||
    die "data changed across the online growth and a re-attach"
[[ $(sha256sum <"$mnt/fio") == "$sum_fio" ]] || die "fio's file changed across the re-attach"
rm -f "$mnt/big"
umount "$mnt"
ctl volume detach "$vol" >/dev/null
size=$((512 << 20))
say "after a re-attach: 512 MiB, every file verifies"
fi

# Detached, it grows as before; ext4 grows into it.
to=$((size + (256 << 20)))
ctl volume expand "$vol" --size "$((to >> 20))MiB" >/dev/null || die "offline expansion failed"
DEV=$(ctl volume attach "$vol")
[[ $(blockdev --getsize64 "$DEV") -eq $to ]] || die "device is $(blockdev --getsize64 "$DEV") bytes after expansion"
resize2fs -f "$DEV" >/dev/null 2>&1 || die "resize2fs failed"
mount "$DEV" "$mnt"
fs_mib=$(df -B1M --output=size "$mnt" | tail -n1 | tr -dc 0-9)
[[ $fs_mib -gt $(( (to >> 20) - 100 )) ]] || die "filesystem is $fs_mib MiB after growing (volume $((to >> 20)) MiB)"
[[ $(sha256sum <"$mnt/before") == "$sum_before" ]] || die "data changed across the offline expansion"
umount "$mnt"
ctl volume detach "$vol" >/dev/null
ctl volume delete "$vol" >/dev/null
say "detached: expanded $((size >> 20)) -> $((to >> 20)) MiB, ext4 grown to $fs_mib MiB, data intact"
stop_cairnd
say PASS
