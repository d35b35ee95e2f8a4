#!/usr/bin/env bash
# Case 18: expanding an attached volume, on whichever kernel the guest runs
# (scripts/vm/run.sh's VM_KERNEL). cairnd reads the ublk driver's feature
# bits at run time: without UBLK_F_UPDATE_SIZE (Linux < 6.16, e.g. 6.12) it
# refuses with the exact "needs Linux 6.16" message; with it (7.3) online
# expansion is not built yet, and it refuses saying so. Either way nothing
# changes: the record and /dev/ublkbN keep their size, the mounted ext4
# keeps working, and after a detach the offline expansion still works.
source "$(dirname "$0")/lib.sh"

release=$(uname -r)
IFS=.- read -r major minor _ <<<"$release"
if ((major > 6 || (major == 6 && minor >= 16))); then
    has_update_size=1
    want="detach it before you expand it (online expansion is not built yet"
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

# Detached, it grows as before; ext4 grows into it.
ctl volume expand "$vol" --size 512MiB >/dev/null || die "offline expansion failed"
DEV=$(ctl volume attach "$vol")
[[ $(blockdev --getsize64 "$DEV") -eq $((512 << 20)) ]] || die "device is $(blockdev --getsize64 "$DEV") bytes after expansion"
resize2fs -f "$DEV" >/dev/null 2>&1 || die "resize2fs failed"
mount "$DEV" "$mnt"
fs_mib=$(df -B1M --output=size "$mnt" | tail -n1 | tr -dc 0-9)
[[ $fs_mib -gt 400 ]] || die "filesystem is $fs_mib MiB after growing (volume 512 MiB)"
[[ $(sha256sum <"$mnt/before") == "$sum_before" ]] || die "data changed across the offline expansion"
umount "$mnt"
ctl volume detach "$vol" >/dev/null
ctl volume delete "$vol" >/dev/null
say "detached: expanded 256 -> 512 MiB, ext4 grown to $fs_mib MiB, data intact"
stop_cairnd
say PASS
