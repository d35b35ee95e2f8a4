#!/usr/bin/env bash
# Case 15: backups on real ublk devices, to the local file:// target, to a
# real S3 server (s3s-fs on 127.0.0.1, SigV4) and to an NFSv4 export
# (nfs-ganesha in user space, mounted by cairnd): full backup, an unchanged
# second backup uploads 0 blocks, a 1% change uploads ~1%, restore into a
# new volume gives the same device sha256, a corrupted block fails the
# restore naming it and leaves no volume, deleting a backup removes only
# its unique blocks. Prints the upload counts.
source "$(dirname "$0")/lib.sh"

S3S="${CAIRN_S3S_FS:-$REPO/target/tools/bin/s3s-fs}"
[[ -x "$S3S" ]] || die "s3s-fs not found at $S3S: run scripts/s3-server.sh install on the host"

start_cairnd
MIB=$((1 << 20))
dev_sum() { dd if="$1" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1; }
bjson() { ctl -o json backup create "$@"; }

run_target() { # LABEL: runs the whole scenario against the current backup-target
    local t=$1 V="src-$1"
    ctl volume create "$V" --size 128MiB --replicas 2 >/dev/null
    local DEV
    DEV=$(ctl volume attach "$V")
    # 96 MiB of data, 32 MiB never written (sparse: not in the backup).
    dd if=/dev/urandom of="$DEV" bs=1M count=96 oflag=direct status=none
    local sum1
    sum1=$(dev_sum "$DEV")
    local b1 b2 b3 j
    j=$(bjson "$V" --label tier=gold)
    b1=$(jq -r .name <<<"$j")
    say "$t: full backup $b1: uploaded $(jq -r .uploadedBlocks <<<"$j") of $(jq -r .totalBlocks <<<"$j") blocks"
    [[ $(jq -r .totalBlocks <<<"$j") -eq 48 ]] || die "$t: full backup maps $(jq -r .totalBlocks <<<"$j") blocks, expected 48 (96 MiB / 2 MiB)"
    [[ $(jq -r .uploadedBlocks <<<"$j") -eq 48 ]] || die "$t: full backup uploaded $(jq -r .uploadedBlocks <<<"$j")"
    j=$(bjson "$V")
    b2=$(jq -r .name <<<"$j")
    say "$t: unchanged volume, backup $b2: uploaded $(jq -r .uploadedBlocks <<<"$j") blocks (incremental=$(jq -r .incremental <<<"$j"))"
    [[ $(jq -r .uploadedBlocks <<<"$j") -eq 0 ]] || die "$t: second backup of an unchanged volume uploaded blocks"
    # Change 1% (1.28 MiB) inside one 2 MiB block.
    dd if=/dev/urandom of="$DEV" bs=4k seek=$((10 * 512)) count=328 oflag=direct status=none
    local sum3
    sum3=$(dev_sum "$DEV")
    j=$(bjson "$V")
    b3=$(jq -r .name <<<"$j")
    say "$t: 1% changed, backup $b3: uploaded $(jq -r .uploadedBlocks <<<"$j") of $(jq -r .totalBlocks <<<"$j") blocks ($(jq -r .uploadedBytes <<<"$j") bytes)"
    [[ $(jq -r .uploadedBlocks <<<"$j") -eq 1 ]] || die "$t: 1% change uploaded $(jq -r .uploadedBlocks <<<"$j") blocks, expected 1"
    [[ $(ctl -o json backup list "$V" | jq 'length') -eq 3 ]] || die "$t: backup list"
    [[ $(ctl -o json backup get "bs://$V/$b1" | jq -r '.labels.tier') == gold ]] || die "$t: bs:// handle or label"

    # Restore b1 and b3 into new volumes: same device contents.
    ctl volume create "r1-$t" --from-backup "bak://$V/$b1" --replicas 2 >/dev/null
    ctl volume create "r3-$t" --from-backup "bak://$V/$b3" >/dev/null
    local d
    d=$(ctl volume attach "r1-$t"); [[ $(dev_sum "$d") == "$sum1" ]] || die "$t: restore of $b1 differs"; ctl volume detach "r1-$t" >/dev/null
    d=$(ctl volume attach "r3-$t"); [[ $(dev_sum "$d") == "$sum3" ]] || die "$t: restore of $b3 differs"; ctl volume detach "r3-$t" >/dev/null
    say "$t: restores of $b1 and $b3 match the device sha256"
    ctl volume detach "$V" >/dev/null
}

# --- file:// (the default target) ---
run_target file
store="$DATA/backups/backupstore"
nblk() { find "$store" -name '*.blk' | wc -l; }
before=$(nblk)
ctl backup delete "bak://src-file/$(ctl -o json backup list src-file | jq -r 'sort_by(.created) | .[2].name')" >/dev/null
after=$(nblk)
say "file: deleting the third backup removed $((before - after)) block(s) ($before -> $after)"
[[ $((before - after)) -eq 1 ]] || die "delete removed $((before - after)) blocks, expected its 1 unique block"
# --no-wait: the handle at once, then backup get follows it to completed.
j=$(ctl -o json backup create src-file --no-wait)
h=$(jq -r .handle <<<"$j")
[[ $(jq -r .state <<<"$j") == in-progress ]] || die "--no-wait answered state $(jq -r .state <<<"$j")"
wait_for 60 "async backup $h completed" '[[ "$(ctl -o json backup get "$h" | jq -r .state)" == completed ]]'
say "file: backup create --no-wait returned $h in progress; it completed"
# Corrupt one block: the restore fails naming it and leaves no volume.
blk=$(find "$store" -name '*.blk' | sort | sed -n 1p)
printf 'garbage' | dd of="$blk" bs=1 seek=100 conv=notrunc status=none
b1=$(ctl -o json backup list src-file | jq -r 'sort_by(.created) | .[0].name')
if out=$(ctl volume create bad --from-backup "bak://src-file/$b1" 2>&1); then die "restore from a corrupt block succeeded"; fi
grep -q "$(basename "$blk" .blk)" <<<"$out" || die "error does not name the corrupt block: $out"
if ctl volume get bad >/dev/null 2>&1; then die "a half-restored volume was left behind"; fi
say "corrupt block detected: $out"

# --- S3 (s3s-fs, SigV4, path style) ---
mkdir -p "$WORK/s3/cairn"
"$S3S" --host 127.0.0.1 --port 9900 --access-key ak --secret-key sk "$WORK/s3" >"$WORK/s3.log" 2>&1 &
S3PID=$!
trap 'kill $S3PID 2>/dev/null || true; cleanup' EXIT
wait_for 10 "s3s-fs" 'curl -s -o /dev/null http://127.0.0.1:9900/'
cat >"$WORK/creds" <<EOC
AWS_ACCESS_KEY_ID=ak
AWS_SECRET_ACCESS_KEY=wrong
AWS_ENDPOINTS=http://127.0.0.1:9900
EOC
ctl setting set backup-target-credential-secret "$WORK/creds" >/dev/null
ctl setting set backup-target "s3://cairn@us-east-1/e2e/" >/dev/null
if out=$(ctl backup list 2>&1); then die "wrong secret key accepted"; fi
grep -qi "access\|credential\|signature" <<<"$out" || die "wrong credentials error unclear: $out"
say "wrong S3 secret: $out"
sed -i 's/^AWS_SECRET_ACCESS_KEY=.*/AWS_SECRET_ACCESS_KEY=sk/' "$WORK/creds"
run_target s3
[[ -n "$(find "$WORK/s3/cairn/e2e/backupstore/volumes" -name volume.cfg)" ]] || die "nothing in the S3 bucket"

# --- NFSv4 (nfs-ganesha serving a directory of this guest; cairnd mounts it) ---
command -v ganesha.nfsd >/dev/null || die "ganesha.nfsd not found: scripts/vm/run.sh installs nfs-ganesha on the host"
NFS="$WORK/nfs"
mkdir -p "$NFS/export" "$NFS/recovery"
# No Bind_addr: ganesha resolves it with AI_ADDRCONFIG, which fails when only lo is up.
cat >"$NFS/ganesha.conf" <<EOC
NFS_CORE_PARAM { Protocols = 4; NFS_Port = 2049; Enable_NLM = false; Enable_RQUOTA = false; }
NFSV4 { Graceless = true; RecoveryBackend = fs; RecoveryRoot = $NFS/recovery; }
NFS_KRB5 { Active_krb5 = false; }
EXPORT {
    Export_Id = 1; Path = $NFS/export; Pseudo = /export; Access_Type = RW;
    Squash = No_Root_Squash; Protocols = 4; Transports = TCP; SecType = sys;
    FSAL { Name = VFS; }
}
LOG { Default_Log_Level = WARN; }
EOC
ganesha.nfsd -f "$NFS/ganesha.conf" -L "$NFS/ganesha.log" -p "$NFS/ganesha.pid"
trap 'kill $S3PID 2>/dev/null || true; [[ -s $NFS/ganesha.pid ]] && kill "$(cat "$NFS/ganesha.pid")" 2>/dev/null; cleanup' EXIT
wait_for 10 "nfs-ganesha on port 2049" '(exec 3<>/dev/tcp/127.0.0.1/2049) 2>/dev/null'
nfs_mounts() { awk '$1 == "127.0.0.1:/export" && $3 == "nfs4" {print $2}' /proc/mounts; }
ctl setting set backup-target "nfs://127.0.0.1:/nope" >/dev/null
if out=$(ctl backup list 2>&1); then die "a missing nfs export was accepted"; fi
grep -q "mount" <<<"$out" || die "missing export error unclear: $out"
say "missing nfs export: $out"
ctl setting set backup-target "nfs://127.0.0.1:/export" >/dev/null
run_target nfs
mnt=$(nfs_mounts)
[[ -n "$mnt" ]] || die "no nfs4 mount of 127.0.0.1:/export in /proc/mounts"
[[ -n "$(find "$NFS/export/backupstore/volumes" -name volume.cfg)" ]] || die "nothing in the nfs export"
say "nfs: backupstore written to the export through the nfs4 mount at $mnt"
ctl setting set backup-target "" >/dev/null
[[ -z "$(nfs_mounts)" ]] || die "the nfs target stays mounted after backup-target changed"
say "nfs: unmounted when backup-target changed"
stop_cairnd
say PASS
