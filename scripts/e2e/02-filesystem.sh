#!/usr/bin/env bash
# Case 2: ext4 and xfs on a volume: write files, record sha256s, unmount,
# detach, re-attach, mount, sums match. Then offline expansion: an attached
# volume is refused, the detached one grows, the filesystem grows into it
# (resize2fs / xfs_growfs) and every file still verifies.
source "$(dirname "$0")/lib.sh"

start_cairnd
for fs in ext4 xfs; do
    vol="fs-$fs"
    ctl volume create "$vol" --size 320MiB --replicas 2 >/dev/null
    DEV=$(ctl volume attach "$vol")
    case $fs in
        ext4) mkfs.ext4 -q -F "$DEV" ;;
        xfs) mkfs.xfs -q -f "$DEV" ;;
    esac
    mnt="$WORK/mnt-$fs"
    mkdir -p "$mnt"
    mount "$DEV" "$mnt"
    for i in 1 2 3 4; do
        dd if=/dev/urandom of="$mnt/file$i" bs=1M count=$((i * 4)) status=none
    done
    mkdir -p "$mnt/dir" && seq 1 20000 >"$mnt/dir/numbers"
    (cd "$mnt" && find . -type f -print0 | xargs -0 sha256sum) | sort >"$WORK/sums-$fs"
    umount "$mnt"
    ctl volume detach "$vol" >/dev/null
    [[ ! -e "$DEV" ]] || die "$DEV still present after detach"
    DEV=$(ctl volume attach "$vol")
    mount "$DEV" "$mnt"
    (cd "$mnt" && sha256sum -c --quiet "$WORK/sums-$fs") || die "$fs: checksums differ after re-attach"
    if out=$(ctl volume expand "$vol" --size 640MiB 2>&1); then die "$fs: expanded while attached"; fi
    grep -qE "detach it before you expand it|detach the volume first" <<<"$out" || die "$fs: unexpected refusal: $out"
    umount "$mnt"
    ctl volume detach "$vol" >/dev/null
    say "$fs: $(wc -l <"$WORK/sums-$fs") files verified after detach/attach"
    ctl volume expand "$vol" --size 640MiB >/dev/null || die "$fs: offline expansion failed"
    DEV=$(ctl volume attach "$vol")
    [[ $(blockdev --getsize64 "$DEV") -eq $((640 << 20)) ]] || die "$fs: device is $(blockdev --getsize64 "$DEV") bytes after expansion"
    mount "$DEV" "$mnt"
    case $fs in
        ext4) resize2fs -f "$DEV" >/dev/null 2>&1 || die "resize2fs failed" ;;
        xfs) xfs_growfs "$mnt" >/dev/null || die "xfs_growfs failed" ;;
    esac
    # The filesystem spans the new size (the scratch disk is shared by
    # every case: prove it by size, not by filling it).
    fs_mib=$(( $(df -B1M --output=size "$mnt" | tail -n1) ))
    [[ $fs_mib -gt 480 ]] || die "$fs: filesystem is $fs_mib MiB after growing (volume 640 MiB)"
    dd if=/dev/urandom of="$mnt/after" bs=1M count=32 status=none || die "$fs: cannot write after growing"
    (cd "$mnt" && sha256sum -c --quiet "$WORK/sums-$fs") || die "$fs: checksums differ after expansion"
    umount "$mnt"
    ctl volume detach "$vol" >/dev/null
    say "$fs: expanded offline 320 MiB -> 640 MiB, filesystem grown to $fs_mib MiB, files intact"
    ctl volume delete "$vol" >/dev/null
done
stop_cairnd
say PASS
