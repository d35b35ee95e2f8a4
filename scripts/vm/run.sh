#!/usr/bin/env bash
# scripts/vm/run.sh SCRIPT [ARGS...]
#
# Boots a QEMU guest on Debian's linux-image-6.12-amd64 kernel (it ships
# ublk_drv; bookworm's default 6.1 kernel does not, and the host kernel here
# has none and cannot load modules) and runs SCRIPT in it as root. Prints the
# script's output (stdout+stderr) and exits with its status. VM_KERNEL=7.3
# boots trixie-backports' 7.3 kernel instead (ublk with UPDATE_SIZE etc.).
#
# The guest sees the host's root read-only over 9p and runs the host's own
# dynamically linked programs (bash, fio, mkfs.*, target/release/*) in a chroot
# with tmpfs /tmp /run /var /mnt and a fresh ext4 disk at /scratch. Only
# busybox, two small init scripts and the needed kernel modules go into the
# initramfs. Everything built is cached in target/vm/. See README.md here.
#
# Environment:
#   VM_MEM (3G)  VM_CPUS (2)  VM_TIMEOUT (1800 s)  VM_SCRATCH_SIZE (8G)
#   VM_KERNEL    6.12 (default: bookworm's linux-image-6.12-amd64) or 7.3
#                (trixie-backports' linux-image-7.3.4+deb13-amd64)
#   VM_ACCEL     kvm or tcg; default: probe KVM once (verdict cached), else TCG
#   VM_ENV       space-separated names of host variables to export to SCRIPT
#   VM_VERBOSE   1: also show the boot (kernel, init) on stderr
# Exit status: SCRIPT's; 124 on timeout; 125 when the harness itself failed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=$repo/target/vm
VM_KERNEL=${VM_KERNEL:-6.12}

# Each kernel has its own cache: target/vm/kernel<sfx>/ and
# target/vm/initramfs<sfx>.cpio.gz (6.12 keeps the unsuffixed names).
case "$VM_KERNEL" in
    6.12)
        kernel_sfx=
        kernel_meta=linux-image-6.12-amd64 # from the host's own apt sources
        ;;
    7.3)
        kernel_sfx=-7.3
        # trixie-backports splits the image: vmlinuz, the modules, and the
        # base (config, System.map, modules.builtin and modules.order: 1 MB).
        kernel_pkgs=(linux-binary-7.3.4+deb13-amd64 linux-modules-7.3.4+deb13-amd64 linux-base-7.3.4+deb13-amd64)
        kernel_suite=trixie-backports
        ;;
    *)
        printf 'vm: error: VM_KERNEL must be 6.12 or 7.3, not %s\n' "$VM_KERNEL" >&2
        exit 125
        ;;
esac
kdir=$cache/kernel$kernel_sfx

VM_MEM=${VM_MEM:-3G}
VM_CPUS=${VM_CPUS:-2}
VM_TIMEOUT=${VM_TIMEOUT:-1800}
VM_SCRATCH_SIZE=${VM_SCRATCH_SIZE:-8G}
VM_VERBOSE=${VM_VERBOSE:-0}

# Modules the guest loads, in groups, each module after its dependencies
# (from modules.dep; those built into the kernel are not there and skipped).
# The first group is loaded before anything else: the 9p stack to reach the
# host, and crc32c, which ext4 and libcrc32c (xfs) ask the crypto API for at
# run time (that would need modprobe). The other groups load in parallel in
# the background while init builds the new root (xfs alone takes ~1 s under
# TCG), so they must not share a dependency outside the first group.
guest_module_groups=(
    "virtio_blk netfs 9pnet 9pnet_virtio 9p crc32c_generic crc32c-intel crc32c-cryptoapi"
    "crc16 mbcache jbd2 ext4"
    "libcrc32c xfs"
    "loop ublk_drv"
    "llc stp bridge veth"
    "sunrpc grace lockd dns_resolver nfs nfsv4"
)
# Names above that are absent are skipped (6.12 and 7.3 differ: 7.3 has
# crc32c-cryptoapi and no libcrc32c, crc32c_generic or crc32c-intel). These
# must be there, as a module or built in, or the initramfs is not built.
required_modules="virtio_blk 9pnet_virtio 9p ext4 xfs loop ublk_drv bridge veth"

log() { printf 'vm: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 125
}

# --- host packages -----------------------------------------------------------
# Installs what is missing, quietly; apt-get update only when needed. The
# guest runs these host binaries: fio, mkfs, jq, and nfs-ganesha + mount.nfs4
# for the nfs:// backup target case (the host kernel has no NFS client).
ensure_packages() {
    local need=() p
    for p in qemu-system-x86 busybox-static cpio xz-utils kmod fio e2fsprogs xfsprogs util-linux jq iproute2 \
        nfs-common nfs-ganesha nfs-ganesha-vfs; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
    done
    [[ ${#need[@]} -eq 0 ]] && return 0
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
        die "apt-get install ${need[*]} failed"
}

# --- kernel ------------------------------------------------------------------
# Downloads the kernel packages (never installs them: the host keeps its own
# kernel), extracts them into $kdir, and runs depmod on the copy (the
# packages leave modules.dep to their postinst). Sets $kver and $vmlinuz.
#
# 6.12: the meta package from the host's apt sources names the versioned
# image package. 7.3: the two packages from trixie-backports, through a
# private apt state in target/vm/apt-<suite>/ (its own sources list, lists and
# cache), so the host's apt configuration and lists are untouched.
ensure_kernel() {
    if [[ -f $kdir/.ready ]]; then
        kver=$(cat "$kdir/.ready")
        find_vmlinuz
        return 0
    fi
    local dl=$cache/dl$kernel_sfx
    rm -rf "$kdir" "$dl"
    mkdir -p "$dl" "$kdir"
    # apt-get download writes into the current directory, as _apt if it can.
    chmod 0777 "$dl"
    local apt_opts=() p
    if [[ -n ${kernel_meta:-} ]]; then
        log "fetching the guest kernel ($kernel_meta)"
        fetch_pkg() { (cd "$dl" && apt-get download -q "$1" >/dev/null 2>&1); }
        if ! fetch_pkg "$kernel_meta"; then
            apt-get update -qq >/dev/null || true
            fetch_pkg "$kernel_meta" || die "apt-get download $kernel_meta failed (is it in the apt sources?)"
        fi
        local image
        image=$(dpkg-deb -f "$dl"/"$kernel_meta"_*.deb Depends | tr ',' '\n' |
            sed -n 's/^ *\(linux-image-[0-9][^ ]*\).*/\1/p' | head -n1)
        [[ -n $image ]] || die "cannot find the image package $kernel_meta depends on"
        fetch_pkg "$image" || die "apt-get download $image failed"
        dpkg-deb -x "$dl/${image}"_*.deb "$kdir"
    else
        log "fetching the guest kernel (${kernel_pkgs[*]} from $kernel_suite)"
        local astate=$cache/apt-$kernel_suite
        mkdir -p "$astate/lists/partial" "$astate/cache/archives/partial"
        # The same Debian mirror the host's own sources name.
        local mirror
        mirror=$(grep -hoE 'https?://[^ ]*/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
            /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 | tr -d ' ' || true)
        mirror=${mirror:-http://deb.debian.org/debian}
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror%/} $kernel_suite main" \
            >"$astate/sources.list"
        apt_opts=(-o "Dir::Etc::sourcelist=$astate/sources.list" -o "Dir::Etc::sourceparts=-"
            -o "Dir::State::Lists=$astate/lists" -o "Dir::Cache=$astate/cache")
        apt-get -qq "${apt_opts[@]}" update >/dev/null 2>"$dl/apt.err" ||
            die "apt-get update for $kernel_suite failed: $(tail -n 3 "$dl/apt.err")"
        (cd "$dl" && apt-get download -q "${apt_opts[@]}" "${kernel_pkgs[@]}" >/dev/null 2>"$dl/apt.err") ||
            die "apt-get download ${kernel_pkgs[*]} failed: $(tail -n 3 "$dl/apt.err")"
        for p in "${kernel_pkgs[@]}"; do
            dpkg-deb -x "$dl/${p}"_*.deb "$kdir"
        done
        # Trixie's packages are merged-/usr (usr/lib/modules); depmod -b and
        # the code below look in lib/modules.
        [[ -e $kdir/lib ]] || ln -s usr/lib "$kdir/lib"
    fi
    kver=$(ls "$kdir/lib/modules")
    [[ -n $kver && $kver != *$'\n'* ]] || die "expected one kernel in $kdir/lib/modules, found: $kver"
    find_vmlinuz
    depmod -b "$kdir" "$kver" || die "depmod failed"
    rm -rf "$dl"
    echo "$kver" >"$kdir/.ready"
}

# Sets $vmlinuz: /boot/vmlinuz-KVER (bookworm) or lib/modules/KVER/vmlinuz (trixie).
find_vmlinuz() {
    for vmlinuz in "$kdir/boot/vmlinuz-$kver" "$kdir/lib/modules/$kver/vmlinuz"; do
        [[ -f $vmlinuz ]] && return 0
    done
    die "no vmlinuz for $kver in $kdir (rm -rf $kdir to fetch it again)"
}

# --- initramfs ---------------------------------------------------------------
# Prints the paths (relative to lib/modules/KVER) of module $2 and of all its
# dependencies, dependencies first, from modules.dep file $1.
module_closure() {
    local dep_file=$1 name=$2 line dep
    line=$(grep -E "(^|/)${name}\.ko(\.xz|\.zst|\.gz)?:" "$dep_file" | head -n1) || true
    [[ -n $line ]] || return 0 # built in (or absent): nothing to load
    for dep in ${line#*:}; do
        dep=$(basename "$dep")
        module_closure "$dep_file" "${dep%%.ko*}"
    done
    echo "${line%%:*}"
}

# Rebuilds target/vm/initramfs<sfx>.cpio.gz when any input changed: this
# script, init.sh, stage2.sh, busybox, the kernel version or the module list.
# Sets $initramfs.
ensure_initramfs() {
    local kmods=$kdir/lib/modules/$kver
    initramfs=$cache/initramfs$kernel_sfx.cpio.gz
    local hash hash_file=$cache/initramfs$kernel_sfx.hash
    hash=$( (cat "$here/run.sh" "$here/init.sh" "$here/stage2.sh" /bin/busybox
        echo "$kver ${guest_module_groups[*]}") | sha256sum | cut -c1-16)
    if [[ -f $initramfs && "$(cat "$hash_file" 2>/dev/null)" == "$hash" ]]; then
        return 0
    fi
    log "building the initramfs ($kver)"
    local root=$cache/initramfs$kernel_sfx
    rm -rf "$root"
    mkdir -p "$root"/{bin,modules}
    cp /bin/busybox "$root/bin/busybox"
    install -m 0755 "$here/init.sh" "$root/init"
    install -m 0644 "$here/stage2.sh" "$root/stage2.sh"
    # modules/group<N>: file names in load order; see guest_module_groups.
    local seen=" " g m p out
    for g in "${!guest_module_groups[@]}"; do
        touch "$root/modules/group$g"
        for m in ${guest_module_groups[$g]}; do
            while read -r p; do
                [[ -n $p ]] || continue
                out=$(basename "$p")
                out=${out%%.ko*}.ko
                if [[ $seen == *" $out "* ]]; then
                    grep -qx "$out" "$root/modules/group0" "$root/modules/group$g" ||
                        die "module $out is needed by two background groups: move it to the first"
                    continue
                fi
                seen+="$out "
                case "$p" in
                    *.xz) xz -dc "$kmods/$p" >"$root/modules/$out" ;;
                    *.zst) zstd -qdc "$kmods/$p" >"$root/modules/$out" || die "cannot decompress $p (zstd installed?)" ;;
                    *.gz) gzip -dc "$kmods/$p" >"$root/modules/$out" ;;
                    *) cp "$kmods/$p" "$root/modules/$out" ;;
                esac
                echo "$out" >>"$root/modules/group$g"
            done < <(module_closure "$kmods/modules.dep" "$m")
        done
    done
    cat "$root"/modules/group* | grep -qx ublk_drv.ko || die "the guest kernel has no ublk_drv module"
    for m in $required_modules; do
        cat "$root"/modules/group* | tr - _ | grep -qx "${m//-/_}.ko" ||
            grep -qE "/${m}\.ko\$" "$kmods/modules.builtin" 2>/dev/null ||
            die "the guest kernel $kver has no module $m (neither packed nor built in)"
    done
    (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$initramfs.new"
    mv "$initramfs.new" "$initramfs"
    echo "$hash" >"$hash_file"
}

# --- acceleration ------------------------------------------------------------
# /dev/kvm can exist and still not boot a stock guest (seen here: a PVM
# hypervisor; qemu asserts on MSRs or the guest crashes). So the first run
# boots a trivial script under KVM and caches the verdict in target/vm/accel.
# Prints qemu's acceleration arguments.
accel_args() {
    local accel=${VM_ACCEL:-}
    if [[ -z $accel ]]; then
        if [[ -f $cache/accel ]]; then
            accel=$(cat "$cache/accel")
        else
            accel=tcg
            if [[ -r /dev/kvm && -w /dev/kvm ]]; then
                log "probing KVM (once; the verdict is cached in target/vm/accel)"
                local probe=$cache/kvm-probe.sh
                printf '#!/bin/sh\necho kvm-ok\n' >"$probe"
                chmod +x "$probe"
                if [[ "$(VM_ACCEL=kvm VM_TIMEOUT=90 VM_QUIET=1 "$here/run.sh" "$probe" 2>/dev/null)" == kvm-ok ]]; then
                    accel=kvm
                fi
            fi
            echo "$accel" >"$cache/accel"
            log "acceleration: $accel"
        fi
    fi
    case "$accel" in
        kvm) echo "-accel kvm -cpu host" ;;
        tcg) echo "-accel tcg,thread=multi -cpu max" ;;
        *) die "VM_ACCEL must be kvm or tcg, not '$accel'" ;;
    esac
}

# --- the run -----------------------------------------------------------------
# Directories the guest replaces with its own: a script there is copied.
guest_owned() {
    case "$1" in
        /tmp/* | /run/* | /var/* | /mnt/* | /media/* | /proc/* | /sys/* | /dev/* | /scratch/*) return 0 ;;
    esac
    return 1
}

# Writes the env file stage2.sh sources: REPO, SCRATCH, the VM_ENV variables,
# the start directory and the command.
write_env() {
    local script=$1
    shift
    local name
    {
        printf 'export REPO=%q\n' "$repo"
        printf 'export SCRATCH=/scratch\n'
        printf 'export HOME=/root USER=root LOGNAME=root TERM=dumb LANG=C.UTF-8\n'
        printf 'export PATH=%q\n' "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/root/.cargo/bin:/run/busybox"
        for name in ${VM_ENV:-}; do
            [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "VM_ENV: '$name' is not a variable name"
            if [[ -n ${!name+set} ]]; then printf 'export %s=%q\n' "$name" "${!name}"; fi
        done
        printf 'VM_CWD=%q\n' "$PWD"
        # Not executable: run it with bash rather than fail with 126.
        if [[ -x $script ]]; then printf 'VM_CMD=(%q' "$script"; else printf 'VM_CMD=(bash %q' "$script"; fi
        for a in "$@"; do printf ' %q' "$a"; done
        printf ')\n'
    } >"$rundir/env"
}

# Reads the console on stdin, writes it all to the console log, and passes
# the script's output (between the BEGIN and EXIT markers) to stdout. Lines
# from init before BEGIN go to stderr (only cairn-init ones unless verbose).
filter_console() {
    # Unbuffered: the boot watchdog and the live output read the console as it comes.
    sed -u 's/\r//g' | tee "$console" | awk -v nonce="$nonce" -v verbose="$VM_VERBOSE" '
        BEGIN { begin = "CAIRN-VM-BEGIN-" nonce; end = "CAIRN-VM-EXIT-" nonce "="; state = 0; empties = 0 }
        state == 0 {
            if ($0 == begin) { state = 1; next }
            if (verbose == 1 || $0 ~ /^cairn-(init|stage2):/) { print > "/dev/stderr"; fflush("/dev/stderr") }
            next
        }
        state == 1 {
            i = index($0, end)
            if (i == 0) {
                if ($0 == "") { empties++; next } # held back: stage2 adds one before the marker
                for (; empties > 0; empties--) print ""
                print; fflush(); next
            }
            for (; empties > 1; empties--) print ""
            if (i > 1) { print substr($0, 1, i - 1); fflush() }
            state = 2
        }'
}

main() {
    [[ $# -ge 1 ]] || die "usage: scripts/vm/run.sh SCRIPT [ARGS...]"
    local script
    script=$(realpath -e -- "$1" 2>/dev/null) || die "no such script: $1"
    shift
    [[ -f $script ]] || die "not a file: $script"

    ensure_packages
    mkdir -p "$cache"
    ensure_kernel
    ensure_initramfs
    local accel
    accel=$(accel_args)

    rundir=$cache/run-$$
    rm -rf "$rundir"
    mkdir -p "$rundir"
    local scratch=$cache/scratch-$$.img
    # shellcheck disable=SC2064
    trap "rm -rf '$rundir' '$scratch'" EXIT
    # The repo is bound at its own path in the guest (init.sh), even under
    # /tmp; other files under a guest-owned directory are not.
    if guest_owned "$script" && [[ $script != "$repo"/* ]]; then
        # The guest has its own /tmp etc.; run a copy (its siblings stay behind).
        cp "$script" "$rundir/$(basename "$script")"
        script=$rundir/$(basename "$script")
    fi
    guest_owned "$PWD/" && [[ $PWD/ != "$repo"/* ]] && log "warning: $PWD does not exist in the guest; the script starts in /"
    write_env "$script" "$@"
    # A fresh sparse ext4 image each run. Inode tables and journal are written
    # now (lazy init off) so no kernel thread zeroes them during a benchmark.
    truncate -s "$VM_SCRATCH_SIZE" "$scratch"
    mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$scratch" ||
        die "mkfs.ext4 on $scratch failed"

    nonce=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
    console=$cache/last-console.log
    [[ -n ${VM_QUIET:-} ]] && console=$rundir/console.log # the KVM probe keeps the real log intact

    # lpj: skip measuring the delay loop on each CPU (0.6 s under TCG; udelay
    # uses the TSC anyway). mitigations=off: the guest runs only our tests.
    # tsc=reliable: without it the clocksource watchdog may mark the TSC
    # unstable under TCG and flip sched_clock's static key; that code
    # patching raced with the other vCPU (an int3 oops in sched_clock_cpu).
    local kernel_args="console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off lpj=10000000 tsc=reliable"
    local start end rc status tries=0
    start=$(date +%s.%N)
    while :; do
        tries=$((tries + 1))
        set +e
        # Boot watchdog, a backstop next to the panic retry below: if the
        # script has not begun within VM_BOOT_TIMEOUT seconds (a boot takes
        # 5-15 s), stop qemu; the loop below boots again.
        rm -f "$rundir/boot-hung"
        (
            for _ in $(seq 1 "${VM_BOOT_TIMEOUT:-120}"); do
                sleep 1
                grep -q "CAIRN-VM-BEGIN-$nonce" "$console" 2>/dev/null && exit 0
            done
            touch "$rundir/boot-hung"
            pkill -f "cairn.nonce=$nonce" || true
        ) &
        local watchdog=$!
        # -nodefaults: no VGA/NIC/floppy to probe. -no-reboot: a guest panic
        # (panic=-1) ends qemu instead of looping. stdin is /dev/null so qemu
        # never puts a terminal into raw mode.
        # shellcheck disable=SC2086
        timeout -k 10 "$VM_TIMEOUT" qemu-system-x86_64 $accel \
            -machine pc -smp "$VM_CPUS" -m "$VM_MEM" \
            -nodefaults -no-reboot -display none -serial stdio \
            -kernel "$vmlinuz" -initrd "$initramfs" \
            -append "$kernel_args cairn.run=$rundir cairn.nonce=$nonce cairn.repo=$repo" \
            -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
            -drive file="$scratch",if=virtio,format=raw,cache=unsafe,discard=unmap \
            </dev/null 2>"$rundir/qemu.err" | filter_console
        rc=${PIPESTATUS[0]}
        kill "$watchdog" 2>/dev/null
        wait "$watchdog" 2>/dev/null
        set -e
        # Under TCG the guest kernel rarely dies while booting (seen: an int3
        # oops in sched_clock_cpu while patching static keys, before init
        # ran). The script never started, so booting again is safe.
        if ! grep -q "CAIRN-VM-BEGIN-$nonce" "$console" && [[ $tries -lt 3 ]] &&
            { grep -q "Kernel panic" "$console" || [[ -e $rundir/boot-hung ]]; }; then
            cp "$console" "$cache/boot-failed-$tries.log"
            log "warning: the guest kernel failed while booting (before the script ran); booting again ($cache/boot-failed-$tries.log)"
            continue
        fi
        break
    done
    end=$(date +%s.%N)
    if [[ -s $rundir/qemu.err ]]; then
        { echo "----- qemu stderr -----"; cat "$rundir/qemu.err"; } >>"$console"
    fi

    status=$(sed -n "s/.*CAIRN-VM-EXIT-$nonce=\([0-9]*\)\$/\1/p" "$console" | head -n1)
    if [[ -z $status ]]; then
        if [[ $rc -eq 124 || $rc -eq 137 ]]; then
            log "error: the guest timed out after ${VM_TIMEOUT}s (VM_TIMEOUT); console log: $console"
            exit 124
        fi
        [[ -s $rundir/qemu.err ]] && sed 's/^/qemu: /' "$rundir/qemu.err" | tail -n 5 >&2
        log "error: the guest ended without reporting a status (qemu exit $rc); console log: $console"
        exit 125
    fi
    [[ -n ${VM_QUIET:-} ]] ||
        log "$(basename "$script") exited $status in the guest ($(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.1f", e - s }') s wall)"
    exit "$status"
}

main "$@"
