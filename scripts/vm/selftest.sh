#!/usr/bin/env bash
# Guest self-test of the harness: the ublk driver, the tools the e2e suite
# uses, loop devices with ext4 and xfs, and the scratch disk.
set -euo pipefail
fail() { echo "selftest: FAIL: $*"; exit 1; }
[[ -e /dev/ublk-control ]] || fail "/dev/ublk-control missing"
fio --version >/dev/null || fail "fio"
mkfs.ext4 -V >/dev/null 2>&1 || fail "mkfs.ext4"
mkfs.xfs -V >/dev/null || fail "mkfs.xfs"
for t in sha256sum dd nc find jq losetup mount truncate; do command -v "$t" >/dev/null || fail "$t missing"; done
[[ "$(stat -f -c %T "$SCRATCH")" == ext2/ext3 ]] || fail "$SCRATCH is not ext4"
free=$(df -BG --output=avail "$SCRATCH" | tail -n1 | tr -dc 0-9)
[[ $free -ge 4 ]] || fail "$SCRATCH has only ${free}G free"
cd "$SCRATCH"
for fs in ext4 xfs; do
    truncate -s 320M "$fs.img"
    dev=$(losetup --find --show "$fs.img")
    if [[ $fs == ext4 ]]; then mkfs.ext4 -q "$dev"; else mkfs.xfs -q "$dev"; fi
    mkdir -p "m-$fs" && mount "$dev" "m-$fs"
    dd if=/dev/urandom of="m-$fs/f" bs=1M count=8 status=none
    sum=$(sha256sum <"m-$fs/f")
    umount "m-$fs" && mount "$dev" "m-$fs"
    [[ "$(sha256sum <"m-$fs/f")" == "$sum" ]] || fail "$fs roundtrip"
    umount "m-$fs" && losetup -d "$dev"
done
echo "selftest: ok (kernel $(uname -r), $(nproc) CPUs, ${free}G scratch)"
