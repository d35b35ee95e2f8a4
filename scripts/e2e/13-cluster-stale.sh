#!/usr/bin/env bash
# Cluster: stale-replica-timeout. A replica node goes away and stays away;
# after the timeout (here 0.1 min = 6 s) its replica is replaced by a new
# one on the spare node, rebuilt in full while the volume serves I/O, and
# the volume is healthy on n1, n2, n4. Also checks that rebuild progress is
# visible in `volume get` while it runs.
NODES=4
source "$(dirname "$0")/cluster-lib.sh"

net_up
for i in 1 2 3 4; do start_node "$i"; done
wait_cluster 1
nctl 1 setting set stale-replica-timeout 0.1 >/dev/null
# One rebuild at a time per node, and the replacement waits until we look.
nctl 1 setting set concurrent-replica-rebuild-per-node-limit 0 >/dev/null
nctl 1 volume create st --size 128MiB --replicas 3 >/dev/null
[[ "$(vfield 1 st '[.replicas[].node] | sort | join(",")')" == n1,n2,n3 ]] || die "placement: $(nctl 1 volume get st)"
DEV=$(nctl 1 volume attach st)
fio_write "$DEV" 0 112M 1 || die "phase 1 failed"
kill_node 3
fio_write "$DEV" 112M 16M 2 || die "phase 2 failed with n3 gone"
wait_for 30 "n3's replica failed" '[[ "$(vfield 1 st "[.replicas[] | select(.node == \"n3\") | .state][0]")" == failed ]]'
sleep 7
# Progress while the full copy of 128 MiB runs, with fio writing meanwhile.
fio_write "$DEV" 0 112M 3 &
FIO=$!
nctl 1 setting set concurrent-replica-rebuild-per-node-limit 1 >/dev/null
seen=""
for _ in $(seq 1 300); do
    seen=$(vfield 1 st '[.replicas[] | select(.rebuild != null) | "\(.message): \(.rebuild.percent)% \(.rebuild.done_bytes)/\(.rebuild.total_bytes) bytes \(.rebuild.bytes_per_second) B/s"][0] // empty')
    [[ -n "$seen" ]] && break
    [[ "$(healthy_count 1 st)" -eq 3 ]] && break
    sleep 0.1
done
[[ -n "$seen" ]] || die "no rebuild progress visible in volume get"
say "rebuild progress in volume get: $seen"
wait "$FIO" || die "fio failed during the rebuild"
wait_for 180 "3 healthy replicas" '[[ "$(healthy_count 1 st)" -eq 3 ]]'
nodes=$(vfield 1 st '[.replicas[].node] | sort | join(",")')
[[ "$nodes" == n1,n2,n4 ]] || die "replicas on $nodes after the stale timeout"
grep -q "stale replica" "$WORK/n1/log" || die "no stale-replica log line"
grep -q "rebuild started.*incremental=false" "$WORK/n1/log" || die "the replacement was not a full rebuild"
say "n3's replica replaced on n4 after the stale timeout: replicas on $nodes"
fio_verify "$DEV" 0 112M 3
fio_verify "$DEV" 112M 16M 2
nctl 1 volume detach st >/dev/null
same_replicas 1 st
for i in 1 2 4; do stop_node "$i"; done
say PASS
