#!/usr/bin/env bash
# Case 16: a DR standby volume follows three successive backups of another
# volume incrementally (polling the target every second), refuses attach
# while standby, and after `volume activate` holds the latest backup's data.
source "$(dirname "$0")/lib.sh"

start_cairnd
dev_sum() { dd if="$1" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1; }
ctl setting set backupstore-poll-interval 1 >/dev/null
ctl volume create src --size 64MiB --replicas 2 >/dev/null
DEV=$(ctl volume attach src)
dd if=/dev/urandom of="$DEV" bs=1M count=32 oflag=direct status=none
b1=$(ctl -o json backup create src | jq -r .name)
ctl volume create dr --standby --from-backup bak://src >/dev/null
[[ $(vol_field dr last_restored) == "$b1" ]] || die "standby did not restore $b1 at creation"
[[ $(vol_field dr standby) == true ]] || die "not standby"
if out=$(ctl volume attach dr 2>&1); then die "attached a standby volume"; fi
say "attach refused: $out"
for i in 2 3 4; do
    dd if=/dev/urandom of="$DEV" bs=1M seek=$((i * 8)) count=2 oflag=direct status=none
    b=$(ctl -o json backup create src | jq -r .name)
    wait_for 30 "standby follows $b" '[[ $(vol_field dr last_restored) == "$b" ]]'
    say "standby restored backup $i ($b) incrementally"
done
grep -q "incremental=true\|incremental: true" "$LOG" || die "no incremental DR restore logged"
want=$(dev_sum "$DEV")
ctl volume detach src >/dev/null
ctl volume activate dr >/dev/null
[[ $(vol_field dr standby) == false ]] || die "still standby after activate"
D=$(ctl volume attach dr)
[[ $(dev_sum "$D") == "$want" ]] || die "activated DR volume differs from the source's last backup"
say "activated DR volume matches the source (sha256 $want)"
ctl volume detach dr >/dev/null
stop_cairnd
say PASS
