#!/usr/bin/env bash
# Case 2: ext4 and xfs on a volume: write files, record sha256s, unmount,
# detach, re-attach, mount, sums match.
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
    umount "$mnt"
    ctl volume detach "$vol" >/dev/null
    say "$fs: $(wc -l <"$WORK/sums-$fs") files verified after detach/attach"
done
stop_cairnd
say PASS
