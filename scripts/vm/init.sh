#!/bin/sh
# Guest /init (busybox): load modules, mount the host root read-only over 9p,
# build a chroot from it with tmpfs where writes go and an ext4 /scratch, run
# the requested script there, report its status, power off.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in $(cat /modules/order); do
    insmod "/modules/$m" 2>/dev/null || echo "init: insmod $m failed" >&2
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host ||
    { echo "init: cannot mount host root over 9p"; echo "CAIRN-VM-EXIT=125"; poweroff -f; }

envfile=$(sed -n 's/.*cairn\.env=\([^ ]*\).*/\1/p' /proc/cmdline)
r=/newroot
mount -t tmpfs -o mode=0755 newroot $r
mkdir -p $r/usr $r/etc $r/work $r/root $r/opt $r/proc $r/sys $r/dev $r/tmp $r/run $r/var $r/scratch $r/mnt $r/home
for d in bin sbin lib lib64; do
    if [ -L /host/$d ]; then ln -s "$(readlink /host/$d)" $r/$d; else mkdir -p $r/$d && mount --bind /host/$d $r/$d; fi
done
for d in usr etc work root opt home; do
    [ -d /host/$d ] && mount --bind /host/$d $r/$d
done
mount -t proc proc $r/proc
mount -t sysfs sys $r/sys
mount -t devtmpfs dev $r/dev
mkdir -p $r/dev/pts $r/dev/shm && mount -t devpts devpts $r/dev/pts && mount -t tmpfs shm $r/dev/shm
mount -t tmpfs tmp $r/tmp
mount -t tmpfs run $r/run
mount -t tmpfs var $r/var
mkdir -p $r/var/tmp $r/var/lib $r/run/lock
# busybox applets (nc, ...) as a fallback at the end of PATH
mkdir -p $r/run/busybox
cp /bin/busybox $r/run/busybox/busybox
for a in $(/bin/busybox --list); do ln -s busybox $r/run/busybox/$a 2>/dev/null; done
ip link set lo up 2>/dev/null
hostname cairn-vm

cat >$r/tmp/vm-wrapper.sh <<'WRAP'
set -u
. "$1"
mkfs.ext4 -q -F -E nodiscard /dev/vda >/dev/null 2>&1 && mount /dev/vda /scratch ||
    { echo "vm-wrapper: cannot make /scratch on /dev/vda"; echo "CAIRN-VM-EXIT=125"; exit 0; }
cd "$VM_CWD" 2>/dev/null || cd /
echo CAIRN-VM-BEGIN
"${VM_CMD[@]}" </dev/null 2>&1
rc=$?
echo "CAIRN-VM-EXIT=$rc"
WRAP
chroot $r /bin/bash /tmp/vm-wrapper.sh "$envfile"
sync
echo o >/proc/sysrq-trigger
poweroff -f
