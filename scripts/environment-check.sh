#!/usr/bin/env bash
# Checks that this host can run a Cairn node (cairnd and the CSI node
# plugin). Run it on every node before installing, as root for the full
# picture:
#
#   scripts/environment-check.sh [--kubelet-dir DIR]
#
# Each check prints [ok], [warn] or [fail] and, when not ok, what to do.
# Exit status: 0 when nothing failed (warnings allowed), 1 when a check
# failed, 2 on a usage error.
set -uo pipefail

kubelet_dir=/var/lib/kubelet

usage() {
    cat <<'EOF'
usage: scripts/environment-check.sh [--kubelet-dir DIR]

Checks this host for a Cairn node:
  kernel        Linux 6.0 or newer (6.16+ for online expansion)
  ublk          the ublk_drv module: loaded, or available to modprobe
  io_uring      not disabled (/proc/sys/kernel/io_uring_disabled)
  mkfs          mkfs.ext4 (e2fsprogs) and mkfs.xfs (xfsprogs)
  nfs           an NFS client (warning only: needed for nfs:// backup targets)
  kubelet       the kubelet root directory exists (warning only)

  --kubelet-dir DIR   kubelet's root directory (default /var/lib/kubelet;
                      k3s: /var/lib/rancher/k3s/agent/kubelet,
                      microk8s: /var/snap/microk8s/common/var/lib/kubelet)
  -h, --help          this text

Exit status: 0 no failure (warnings allowed), 1 a check failed, 2 usage.
EOF
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --kubelet-dir)
        [[ $# -ge 2 && -n $2 ]] || { echo "--kubelet-dir needs a directory" >&2; usage >&2; exit 2; }
        kubelet_dir=$2
        shift 2
        ;;
    --kubelet-dir=*)
        kubelet_dir=${1#--kubelet-dir=}
        shift
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        echo "unknown argument: $1" >&2
        usage >&2
        exit 2
        ;;
    esac
done

failed=0
warned=0
ok() { printf '[ok]   %s\n' "$*"; }
warn() { printf '[warn] %s\n' "$*"; warned=$((warned + 1)); }
fail() { printf '[fail] %s\n' "$*"; failed=$((failed + 1)); }
have() { command -v "$1" >/dev/null 2>&1 || [[ -x /sbin/$1 || -x /usr/sbin/$1 ]]; }

# --- kernel -------------------------------------------------------------
release=$(uname -r)
if [[ $release =~ ^([0-9]+)\.([0-9]+) ]]; then
    major=${BASH_REMATCH[1]} minor=${BASH_REMATCH[2]}
    if ((major > 6 || (major == 6 && minor >= 16))); then
        ok "kernel $release (6.0+; 6.16+: attached volumes grow online)"
    elif ((major == 6)); then
        ok "kernel $release (6.0+; attached volumes grow only offline before 6.16)"
    else
        fail "kernel $release: Cairn needs Linux 6.0 or newer with ublk_drv (e.g. Debian bookworm: apt-get install linux-image-6.12-amd64, then reboot)"
    fi
else
    fail "kernel release '$release' not understood: Cairn needs Linux 6.0 or newer"
fi

# --- ublk_drv -----------------------------------------------------------
builtin_list=/lib/modules/$release/modules.builtin
if [[ -d /sys/module/ublk_drv || -e /dev/ublk-control ]]; then
    ok "ublk_drv loaded ($( [[ -e /dev/ublk-control ]] && echo /dev/ublk-control || echo /sys/module/ublk_drv ))"
elif [[ -r $builtin_list ]] && grep -q '/ublk_drv\.ko' "$builtin_list"; then
    ok "ublk_drv built into the kernel"
elif have modinfo && modinfo ublk_drv >/dev/null 2>&1; then
    ok "ublk_drv available ($(modinfo -n ublk_drv 2>/dev/null || echo module))"
    warn "ublk_drv is not loaded: modprobe ublk_drv, and load it at boot: echo ublk_drv > /etc/modules-load.d/cairn.conf"
else
    fail "ublk_drv missing: this kernel has no ublk driver (CONFIG_BLK_DEV_UBLK). Install a kernel that has it (Debian bookworm: linux-image-6.12-amd64; bookworm's 6.1 has none), reboot, then modprobe ublk_drv"
fi

# --- io_uring -----------------------------------------------------------
knob=/proc/sys/kernel/io_uring_disabled
if [[ ! -e $knob ]]; then
    ok "io_uring enabled ($knob absent)"
else
    v=$(cat "$knob" 2>/dev/null || echo '?')
    case $v in
    0) ok "io_uring enabled (io_uring_disabled=0)" ;;
    1) warn "io_uring limited to privileged processes (io_uring_disabled=1): cairnd runs privileged, so it works; sysctl -w kernel.io_uring_disabled=0 to lift it" ;;
    *) fail "io_uring disabled (io_uring_disabled=$v): cairnd's data path needs it; sysctl -w kernel.io_uring_disabled=0 (persist in /etc/sysctl.d/)" ;;
    esac
fi

# --- filesystems ----------------------------------------------------------
for pair in mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs; do
    tool=${pair%%:*} pkg=${pair#*:}
    if have "$tool"; then
        ok "$tool present"
    else
        fail "$tool missing: install $pkg (the Cairn image carries its own for the CSI plugin; the host needs it to format volumes with cairnctl)"
    fi
done

# --- NFS client (backup targets only) -----------------------------------
if have mount.nfs4 || have mount.nfs || [[ -x /sbin/mount.nfs ]]; then
    ok "NFS client present"
else
    warn "no NFS client (mount.nfs4): needed only for nfs:// backup targets on a bare host; install nfs-common (Debian/Ubuntu) or nfs-utils (RHEL, SUSE)"
fi

# --- kubelet directory ----------------------------------------------------
if [[ -d $kubelet_dir ]]; then
    ok "kubelet directory $kubelet_dir exists"
else
    hint=""
    for d in /var/lib/rancher/k3s/agent/kubelet /var/snap/microk8s/common/var/lib/kubelet /var/lib/kubelet; do
        if [[ $d != "$kubelet_dir" && -d $d ]]; then
            hint=" ($d exists: pass --kubelet-dir $d here and set kubeletDir=$d in the chart)"
            break
        fi
    done
    warn "kubelet directory $kubelet_dir missing: not a Kubernetes node yet, or kubelet uses another --root-dir; the chart's kubeletDir must name it$hint"
fi

echo
if ((failed > 0)); then
    echo "environment-check: $failed check(s) failed, $warned warning(s): this host cannot run a Cairn node yet"
    exit 1
fi
echo "environment-check: no failures, $warned warning(s)"
exit 0
