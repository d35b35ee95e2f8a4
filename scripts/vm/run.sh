#!/usr/bin/env bash
# scripts/vm/run.sh SCRIPT [ARGS...]
#
# Boots a QEMU guest on Debian's linux-image-6.12-amd64 kernel (it ships
# ublk_drv; bookworm's default 6.1 kernel does not) and runs SCRIPT inside as
# root. Prints the script's output and exits with its status.
#
# The guest sees the host's root filesystem read-only over 9p and runs the
# host's own dynamically linked binaries (bash, fio, mkfs.*, the workspace's
# target/release binaries) in a chroot whose /tmp, /run, /var are tmpfs and
# whose /scratch is a fresh ext4 virtio disk. Only busybox, an /init and the
# needed kernel modules go into the initramfs, cached under target/vm/.
#
# Environment:
#   VM_MEM (3G)  VM_CPUS (2)  VM_TIMEOUT (1800 s)  VM_SCRATCH_SIZE (8G)
#   VM_ACCEL     kvm or tcg; default: probe KVM once (cached), else TCG
#   VM_ENV       names of host variables to export into the guest script
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=$repo/target/vm
kpkg=linux-image-6.12-amd64
VM_MEM=${VM_MEM:-3G}
VM_CPUS=${VM_CPUS:-2}
VM_TIMEOUT=${VM_TIMEOUT:-1800}
VM_SCRATCH_SIZE=${VM_SCRATCH_SIZE:-8G}

log() { printf 'vm: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 125; }

[[ $# -ge 1 ]] || die "usage: scripts/vm/run.sh SCRIPT [ARGS...]"
script=$(realpath "$1") || die "script $1 not found"
shift
[[ -f "$script" ]] || die "script $script not found"
case "$script" in
    /tmp/* | /run/* | /var/* | /proc/* | /sys/* | /dev/*)
        die "script $script is in a directory the guest replaces with its own; put it under the repo or /root" ;;
esac
mkdir -p "$cache"

# --- host packages ---------------------------------------------------------
ensure_packages() {
    local need=() p
    for p in qemu-system-x86 busybox-static cpio xz-utils kmod fio e2fsprogs xfsprogs jq util-linux; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
    done
    [[ ${#need[@]} -eq 0 ]] && return 0
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

# --- kernel ----------------------------------------------------------------
# Downloads the kernel package (never installed on the host) and extracts it;
# depmod generates modules.dep, which the package leaves to its postinst.
ensure_kernel() {
    if [[ -f "$cache/kernel/.ready" ]]; then
        kver=$(cat "$cache/kernel/.ready")
        return 0
    fi
    log "fetching $kpkg"
    rm -rf "$cache/kernel" "$cache/dl" && mkdir -p "$cache/dl" "$cache/kernel"
    local dep
    dep=$(apt-cache depends "$kpkg" 2>/dev/null | sed -n 's/.*Depends: \(linux-image-6\.12[^ ]*\).*/\1/p' | head -n1)
    [[ -n "$dep" ]] || { apt-get update -qq; dep=$(apt-cache depends "$kpkg" | sed -n 's/.*Depends: \(linux-image-6\.12[^ ]*\).*/\1/p' | head -n1); }
    [[ -n "$dep" ]] || die "apt has no $kpkg (need Debian bookworm-backports or newer in sources)"
    (cd "$cache/dl" && apt-get download "$dep" 2>&1 | grep -v '^W:' >&2) || die "apt-get download $dep failed"
    dpkg-deb -x "$cache"/dl/*.deb "$cache/kernel"
    kver=$(ls "$cache/kernel/lib/modules" | head -n1)
    depmod -b "$cache/kernel" "$kver"
    echo "$kver" >"$cache/kernel/.ready"
    rm -rf "$cache/dl"
}

# --- initramfs ---------------------------------------------------------------
# Modules the guest loads (with their dependencies, in order). Anything built
# into the kernel is simply not found in modules.dep and skipped.
modules=(virtio_blk netfs 9pnet 9pnet_virtio 9p crc32c_generic crc32c-intel crc16 mbcache jbd2 ext4 libcrc32c xfs loop ublk_drv)

# Prints module paths (relative to lib/modules/KVER) for $1 and its deps, deps first.
module_closure() {
    local dep_file=$1 name=$2 line path deps d
    line=$(grep -E "(^|/)${name}\.ko(\.xz)?:" "$dep_file" | head -n1) || true
    [[ -n "$line" ]] || return 0
    path=${line%%:*}
    deps=${line#*:}
    for d in $deps; do
        module_closure "$dep_file" "$(basename "$d" | sed 's/\.ko\(\.xz\)\{0,1\}$//')"
    done
    echo "$path"
}

build_initramfs() {
    local kdir=$cache/kernel/lib/modules/$kver
    local inputs
    inputs=$( (cat "$here/init.sh"; echo "$kver"; echo "${modules[*]}"; ls -l /bin/busybox) | sha256sum | cut -c1-16)
    if [[ -f "$cache/initramfs.cpio.gz" && "$(cat "$cache/initramfs.hash" 2>/dev/null)" == "$inputs" ]]; then
        return 0
    fi
    log "building initramfs"
    local root=$cache/initramfs
    rm -rf "$root" && mkdir -p "$root"/{bin,sbin,proc,sys,dev,host,newroot,modules,tmp}
    cp /bin/busybox "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    cp "$here/init.sh" "$root/init" && chmod 0755 "$root/init"
    local seen=" " m p
    for m in "${modules[@]}"; do
        while read -r p; do
            [[ -n "$p" && "$seen" != *" $p "* ]] || continue
            seen+="$p "
            local out
            out=$root/modules/$(basename "$p" .xz)
            case "$p" in
                *.xz) xz -dc "$kdir/$p" >"$out" ;;
                *) cp "$kdir/$p" "$out" ;;
            esac
            chmod 0644 "$out"
            basename "$out" >>"$root/modules/order"
        done < <(module_closure "$kdir/modules.dep" "$m")
    done
    (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$cache/initramfs.cpio.gz"
    echo "$inputs" >"$cache/initramfs.hash"
}

# --- acceleration ------------------------------------------------------------
# /dev/kvm may exist but not boot a stock guest (seen: a PVM hypervisor). Probe
# by booting once with a trivial script; remember the verdict.
accel_args() {
    local accel=${VM_ACCEL:-}
    if [[ -z "$accel" ]]; then
        if [[ -f "$cache/accel" ]]; then
            accel=$(cat "$cache/accel")
        elif [[ -r /dev/kvm && -w /dev/kvm ]]; then
            accel=tcg
            local probe=$cache/kvm-probe.sh
            printf '#!/bin/sh\nexit 0\n' >"$probe"
            if VM_ACCEL=kvm VM_TIMEOUT=60 VM_PROBE=1 "$0" "$probe" >/dev/null 2>&1; then
                accel=kvm
            fi
            echo "$accel" >"$cache/accel"
            log "acceleration: $accel (probed; delete $cache/accel to probe again)"
        else
            accel=tcg
        fi
    fi
    case "$accel" in
        kvm) echo "-accel kvm -cpu host" ;;
        tcg) echo "-accel tcg,thread=multi -cpu max" ;;
        *) die "VM_ACCEL must be kvm or tcg, not $accel" ;;
    esac
}

# --- run ---------------------------------------------------------------------
ensure_packages
ensure_kernel
build_initramfs
accel=$(accel_args)

run_id=$$
env_file=$cache/run-$run_id.env
{
    printf 'export REPO=%q\n' "$repo"
    printf 'export SCRATCH=/scratch\n'
    printf 'export VM_CWD=%q\n' "$PWD"
    printf 'export PATH=%q\n' "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/root/.cargo/bin:/run/busybox"
    for name in ${VM_ENV:-}; do
        [[ -n "${!name:-}" ]] && printf 'export %s=%q\n' "$name" "${!name}"
    done
    printf 'VM_CMD=(%q' "$script"
    for a in "$@"; do printf ' %q' "$a"; done
    printf ')\n'
} >"$env_file"

scratch_img=$cache/scratch-$run_id.img
rm -f "$scratch_img"
truncate -s "$VM_SCRATCH_SIZE" "$scratch_img"
console=$cache/last-console.log
trap 'rm -f "$env_file" "$scratch_img"' EXIT

start=$(date +%s.%N)
set +e
# shellcheck disable=SC2086
timeout --foreground "$VM_TIMEOUT" qemu-system-x86_64 $accel \
    -smp "$VM_CPUS" -m "$VM_MEM" -nodefaults -no-reboot -display none \
    -kernel "$cache/kernel/boot/vmlinuz-$kver" -initrd "$cache/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 cairn.env=$env_file" \
    -serial stdio \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -drive file="$scratch_img",if=virtio,format=raw,cache=unsafe,discard=unmap \
    </dev/null 2>&1 | sed -u 's/\r$//' | tee "$console" | sed -u -n '/^CAIRN-VM-BEGIN$/,/^CAIRN-VM-EXIT=/{/^CAIRN-VM-BEGIN$/d;/^CAIRN-VM-EXIT=/d;p}'
rc=${PIPESTATUS[0]}
set -e
elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
status=$(sed -n 's/^CAIRN-VM-EXIT=\([0-9]*\)$/\1/p' "$console" | tail -n1)
if [[ -z "$status" ]]; then
    if [[ $rc -eq 124 ]]; then
        log "guest timed out after ${VM_TIMEOUT}s (VM_TIMEOUT); console log: $console"
    else
        log "guest ended without reporting a status (qemu exit $rc); console log: $console"
    fi
    exit 124
fi
[[ -n "${VM_PROBE:-}" ]] || log "guest ran $(basename "$script") in ${elapsed}s, exit $status"
exit "$status"
