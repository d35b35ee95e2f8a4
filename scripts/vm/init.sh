#!/bin/busybox sh
# Guest /init, stage 1 (busybox sh, runs as PID 1 from the initramfs).
#
# Loads the kernel modules packed by run.sh, mounts the host's root read-only
# over 9p at /host, builds /newroot from it (host directories bound at their
# own paths, tmpfs wherever the guest must write), then chroots into it to run
# stage 2 (stage2.sh, with the host's bash), which runs the user's script.
# Whatever happens, it ends by powering the guest off, so qemu exits.
#
# Parameters come on the kernel command line:
#   cairn.run=DIR    host directory of this run (holds the env file)
#   cairn.nonce=HEX  random tag of the exit marker, so output can't fake it
#   cairn.repo=DIR   repo root, bound at the same path even under /tmp

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

# Reports a failure of the harness itself (not of the user's script) with the
# marker the host looks for, then powers off. 125 = "harness error".
fail() {
    echo "cairn-init: error: $*"
    echo "CAIRN-VM-EXIT-${nonce:-unknown}=125"
    poweroff_now
}

poweroff_now() {
    sync
    # sysrq 'o' powers off at once; poweroff -f is the fallback.
    echo o >/proc/sysrq-trigger 2>/dev/null
    sleep 2
    poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o mode=1777 tmp /tmp

for opt in $(cat /proc/cmdline); do
    case "$opt" in
        cairn.run=*) rundir=${opt#cairn.run=} ;;
        cairn.nonce=*) nonce=${opt#cairn.nonce=} ;;
        cairn.repo=*) repo=${opt#cairn.repo=} ;;
    esac
done
[ -n "${rundir:-}" ] && [ -n "${nonce:-}" ] && [ -n "${repo:-}" ] || fail "missing cairn.* kernel parameters"

# Modules in dependency order (run.sh resolved them with modules.dep and
# decompressed them, since busybox insmod cannot read .ko.xz). Group 0 (the
# 9p stack) is needed at once; the others (ext4, xfs, loop + ublk_drv: ~2 s
# under TCG one after another) load in parallel while the new root is built.
load_modules() {
    while read -r m; do
        insmod "/modules/$m" || echo "cairn-init: warning: insmod $m failed"
    done <"$1"
}
load_modules /modules/group0
module_loaders=
for g in /modules/group*; do
    [ "$g" = /modules/group0 ] && continue
    load_modules "$g" &
    module_loaders="$module_loaders $!"
done

mkdir -p /host
# msize: bigger 9p messages make reading host binaries faster. cache=loose is
# safe because the share is read-only and the guest lives for one run.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host ||
    fail "cannot mount the host root over 9p (mount_tag hostroot)"
[ -x /host/bin/bash ] || fail "the host has no /bin/bash"

# --- /newroot: the host's tree, read-only, with writable places of our own ---
r=/newroot
mkdir -p $r
mount -t tmpfs -o mode=0755 newroot $r
# Directories the guest replaces with its own (writable, or the guest's own
# proc/sys/dev). Everything else at the top level of the host is bound at the
# same path, so the repo, ~/.cargo and the host's binaries and libraries are
# where the script expects them.
own=" proc sys dev tmp run var mnt media lost+found scratch "
for p in /host/* /host/.[!.]*; do
    [ -e "$p" ] || [ -L "$p" ] || continue
    name=${p#/host/}
    case "$own" in *" $name "*) continue ;; esac
    if [ -L "$p" ]; then
        ln -s "$(readlink "$p")" "$r/$name" # e.g. usrmerge's bin -> usr/bin
    elif [ -d "$p" ]; then
        mkdir -p "$r/$name" && mount --bind "$p" "$r/$name" || fail "cannot bind $p"
    fi
done
for d in proc sys dev tmp run var mnt scratch; do mkdir -p $r/$d; done
mount -t proc proc $r/proc
mount -t sysfs sys $r/sys
mount -t devtmpfs dev $r/dev
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts -o gid=5,mode=620 devpts $r/dev/pts
mount -t tmpfs -o mode=1777 shm $r/dev/shm
# What udev or systemd would make: bash's <(...) needs /dev/fd.
ln -s /proc/self/fd $r/dev/fd
ln -s /proc/self/fd/0 $r/dev/stdin
ln -s /proc/self/fd/1 $r/dev/stdout
ln -s /proc/self/fd/2 $r/dev/stderr
mount -t tmpfs -o mode=1777 tmp $r/tmp
mount -t tmpfs -o mode=0755 run $r/run
mount -t tmpfs -o mode=0755 var $r/var
mount -t tmpfs -o mode=0755 mnt $r/mnt
mkdir -p $r/var/tmp $r/var/lib $r/var/log $r/var/cache $r/run/lock
chmod 1777 $r/var/tmp
# The repo (and with it target/vm/run-*, where the env file is) must be at its
# host path even when that lies under a directory replaced above.
if [ ! -d "$r$repo" ]; then
    mkdir -p "$r$repo" && mount --bind "/host$repo" "$r$repo" || fail "cannot bind the repo $repo"
fi
# busybox applets (nc, ...) as a fallback at the end of the guest's PATH.
mkdir -p $r/run/busybox
busybox --install -s $r/run/busybox
cp /stage2.sh $r/run/cairn-stage2.sh

hostname cairn-vm
ip link set lo up || echo "cairn-init: warning: cannot bring up lo"

wait $module_loaders
chroot $r /bin/bash /run/cairn-stage2.sh "$rundir/env" "$nonce" ||
    fail "stage 2 failed to start (exit $?)"

# Unmount the scratch disk cleanly so the kernel has nothing left to write.
umount $r/scratch 2>/dev/null
poweroff_now
