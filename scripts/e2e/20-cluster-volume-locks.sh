#!/usr/bin/env bash
# Operations on one volume never wait for another volume's: an attach
# stalled by a replica that does not answer (its node frozen with SIGSTOP,
# the replica timeout raised to 200 s) holds only its own volume's lock.
# Meanwhile another volume is created, attached, written, snapshotted,
# detached and deleted on the same node, all while the stalled attach is
# still running; then the frozen node resumes and the stalled attach ends.
source "$(dirname "$0")/cluster-lib.sh"

net_up
for i in 1 2 3; do start_node "$i"; done
wait_cluster 1
nctl 1 setting set storage-minimal-available-percentage 0 >/dev/null
nctl 1 setting set engine-replica-timeout 200 >/dev/null

nctl 1 volume create slow --size 32MiB --replicas 3 >/dev/null
say "freeze n3 (SIGSTOP), then attach slow on n1: its replica on n3 does not answer"
kill -STOP "${PIDS[3]}"
"$BIN/cairnctl" --socket "$WORK/n1/sock" volume attach slow >"$WORK/slow.attach" 2>&1 &
SLOW=$!
# Placement for the next volume must avoid the frozen node: wait until n1
# sees it down (its NodeStatus goes unanswered).
wait_for 60 "n1 sees n3 down" '[[ "$(nctl 1 -o json node list | jq -r ".[] | select(.name == \"n3\") | .up")" == false ]]'
kill -0 "$SLOW" 2>/dev/null || die "the attach of slow ended before the test: $(cat "$WORK/slow.attach")"

nctl 1 volume create quick --size 16MiB --replicas 2 >/dev/null
DEV=$(nctl 1 volume attach quick)
head -c 4M /dev/urandom >"$WORK/quick.data"
dd if="$WORK/quick.data" of="$DEV" bs=1M oflag=direct status=none
nctl 1 snapshot create quick --name s1 >/dev/null
nctl 1 -o json snapshot list quick | jq -e '.[] | select(.name == "s1")' >/dev/null || die "snapshot s1 of quick missing"
cmp -n 4194304 "$WORK/quick.data" "$DEV" || die "quick's data differs"
nctl 1 volume detach quick >/dev/null
nctl 1 volume delete quick >/dev/null
kill -0 "$SLOW" 2>/dev/null ||
    die "slow's attach ended before quick's operations did: they waited for it ($(cat "$WORK/slow.attach"))"
say "create, attach, write, snapshot, detach, delete of quick done while slow's attach was stalled"

kill -CONT "${PIDS[3]}"
wait "$SLOW" || die "slow's attach failed after n3 resumed: $(cat "$WORK/slow.attach")"
[[ -b "$(head -n 1 "$WORK/slow.attach")" ]] || die "slow's attach printed no device: $(cat "$WORK/slow.attach")"
say "n3 resumed; slow attached at $(head -n 1 "$WORK/slow.attach") ($(vfield 1 slow .state))"
nctl 1 volume delete slow --force >/dev/null
for i in 1 2 3; do stop_node "$i"; done
say PASS
