#!/usr/bin/env bash
# Guest self-test of the harness (run it with scripts/vm/run.sh): the ublk
# driver, the tools the tests use, loop devices with ext4 and xfs, and the
# scratch disk. Prints one line per check; exits non-zero on the first failure.
set -euo pipefail

fail() {
    echo "selftest: FAIL: $*"
    exit 1
}
ok() { echo "selftest: ok: $*"; }

# 1. The ublk driver is loaded and its control node exists.
[[ -c /dev/ublk-control ]] || fail "/dev/ublk-control missing (ublk_drv not loaded?)"
ok "/dev/ublk-control ($(uname -r))"

# 2. Host tools run in the guest (dynamically linked, over 9p).
fio --version >/dev/null || fail "fio --version"
mkfs.ext4 -V >/dev/null 2>&1 || fail "mkfs.ext4 -V"
mkfs.xfs -V >/dev/null || fail "mkfs.xfs -V"
for t in bash sha256sum dd nc find awk sed grep timeout sleep kill ps losetup mount truncate jq ip; do
    command -v "$t" >/dev/null || fail "$t not on PATH"
done
ok "$(fio --version), $(mkfs.xfs -V), tools on PATH"

# 3. Environment from run.sh.
[[ -n ${REPO:-} && -d $REPO ]] || fail "REPO not set or not a directory"
[[ -f $REPO/scripts/vm/run.sh ]] || fail "the repo is not at its host path ($REPO)"
[[ ${SCRATCH:-} == /scratch ]] || fail "SCRATCH is '${SCRATCH:-}', not /scratch"
ok "REPO=$REPO SCRATCH=$SCRATCH"

# 4. The scratch disk: writable ext4 with a few GiB free.
[[ "$(stat -f -c %T "$SCRATCH")" == ext2/ext3 ]] || fail "$SCRATCH is not ext4"
findmnt -no FSTYPE "$SCRATCH" | grep -qx ext4 || fail "$SCRATCH is not mounted as ext4"
free_gib=$(df -BG --output=avail "$SCRATCH" | tail -n1 | tr -dc 0-9)
((free_gib >= 4)) || fail "$SCRATCH has only ${free_gib} GiB free"
touch "$SCRATCH/.w" && rm "$SCRATCH/.w" || fail "$SCRATCH is not writable"
ok "$SCRATCH: ext4, ${free_gib} GiB free"

# 5. /tmp is a writable tmpfs.
[[ "$(stat -f -c %T /tmp)" == tmpfs ]] || fail "/tmp is not tmpfs"
echo x >/tmp/.w && rm /tmp/.w || fail "/tmp is not writable"

# 6. Loop devices: ext4 round trip through sha256sum (with a remount, so the
# data comes back from the device), and mkfs.xfs + mount on another.
cd "$SCRATCH"
for fs in ext4 xfs; do
    truncate -s 512M "$fs.img"
    dev=$(losetup --find --show "$fs.img") || fail "losetup $fs.img"
    case $fs in
        ext4) mkfs.ext4 -q "$dev" || fail "mkfs.ext4 $dev" ;;
        xfs) mkfs.xfs -q "$dev" || fail "mkfs.xfs $dev" ;;
    esac
    mkdir -p "mnt-$fs"
    mount "$dev" "mnt-$fs" || fail "mount $fs on $dev"
    dd if=/dev/urandom of="mnt-$fs/data" bs=1M count=16 status=none
    sum=$(sha256sum <"mnt-$fs/data")
    umount "mnt-$fs"
    mount "$dev" "mnt-$fs" || fail "remount $fs on $dev"
    [[ "$(sha256sum <"mnt-$fs/data")" == "$sum" ]] || fail "$fs: data changed across a remount"
    umount "mnt-$fs"
    losetup -d "$dev"
    rm "$fs.img"
    ok "loop device + $fs: mkfs, mount, write/read 16 MiB, sha256 matches"
done

# 7. Loopback network (servers in tests listen on 127.0.0.1).
ip -o link show lo | grep -q 'UP' || fail "lo is down"
ok "lo is up"

# 8. A real ublk device, when a ublk server is at hand: rublk's loop target
# (cargo install rublk) on a scratch file, ext4 on /dev/ublkbN, a sha256
# round trip across a remount, then delete the device.
if command -v rublk >/dev/null; then
    truncate -s 256M "$SCRATCH/ublk.img"
    timeout 60 rublk add loop -n 7 -f "$SCRATCH/ublk.img" --quiet >/dev/null || fail "rublk add loop"
    [[ -b /dev/ublkb7 ]] || fail "/dev/ublkb7 did not appear"
    mkfs.ext4 -q /dev/ublkb7 || fail "mkfs.ext4 /dev/ublkb7"
    mkdir -p mnt-ublk && mount /dev/ublkb7 mnt-ublk || fail "mount /dev/ublkb7"
    dd if=/dev/urandom of=mnt-ublk/data bs=1M count=16 status=none
    sum=$(sha256sum <mnt-ublk/data)
    umount mnt-ublk && mount /dev/ublkb7 mnt-ublk || fail "remount /dev/ublkb7"
    [[ "$(sha256sum <mnt-ublk/data)" == "$sum" ]] || fail "ublk: data changed across a remount"
    umount mnt-ublk
    timeout 60 rublk del -n 7 || fail "rublk del"
    ok "ublk device (rublk loop target): ext4, write/read 16 MiB, sha256 matches"
else
    echo "selftest: skip: no rublk on PATH, no live ublk device test"
fi

echo "selftest: all ok"
