# Guest stage 2: runs with the host's bash inside the chroot that init.sh built.
#   stage2.sh ENV_FILE NONCE
# Makes the scratch disk, loads the environment run.sh wrote, runs the user's
# script with stdout+stderr on the console between two marker lines, and
# reports its exit status. Exits 0 whenever a status was reported.
set -u
env_file=$1
nonce=$2
begin="CAIRN-VM-BEGIN-$nonce"
end="CAIRN-VM-EXIT-$nonce"

harness_error() {
    echo "cairn-stage2: error: $*"
    echo "$end=125"
    exit 0
}

# shellcheck disable=SC1090
. "$env_file" || harness_error "cannot read $env_file"

# Scratch: the virtio disk run.sh made for this run, already ext4 (mkfs on the
# host takes milliseconds, in the guest under TCG about a second).
[[ -b /dev/vda ]] || harness_error "no scratch disk /dev/vda"
mount -o discard /dev/vda /scratch || harness_error "cannot mount /dev/vda at /scratch"
chmod 1777 /scratch

cd "$VM_CWD" 2>/dev/null || { echo "cairn-stage2: warning: no $VM_CWD in the guest, starting in /"; cd /; }

echo "$begin"
"${VM_CMD[@]}" </dev/null 2>&1
rc=$?
# A final line without a newline would swallow the marker: always start a
# fresh line (the host drops this one empty line).
echo
echo "$end=$rc"
# The kernel log goes to the console log only (after the marker the host shows
# nothing); with loglevel=3 warnings are not on the console otherwise.
echo "----- guest dmesg -----"
/run/busybox/dmesg 2>/dev/null # busybox's: in memory, unlike the host's over 9p
exit 0
