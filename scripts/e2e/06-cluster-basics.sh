#!/usr/bin/env bash
# Cluster case: three nodes, each cairnd in its own network namespace.
# Membership, node list (size / allocated / used / schedulable), placement
# with hard and soft anti-affinity and the scheduling settings, bad input,
# node add/remove, and adopting a volume whose owner lost its record.
# Attaches nothing, so it also runs on a host without ublk.
source "$(dirname "$0")/cluster-lib.sh"

net_up
for i in 1 2 3; do start_node "$i"; done
wait_cluster 1

list=$(nctl 1 -o json node list)
[[ $(jq length <<<"$list") -eq 3 ]] || die "node list: $list"
for n in n1 n2 n3; do
    jq -e --arg n "$n" '.[] | select(.name == $n and .up and (.disks | length) == 1 and .disks[0].size > 0 and .disks[0].schedulable)' <<<"$list" >/dev/null ||
        die "node $n missing or not schedulable in: $list"
done
nctl 1 node list | grep -q "ALLOCATED" || die "node list table has no ALLOCATED column"

# Hard anti-affinity: three replicas on three nodes; a fourth has nowhere to go.
nctl 1 volume create spread --size 64MiB --replicas 3 >/dev/null
nodes=$(vfield 1 spread '[.replicas[].node] | sort | join(",")')
[[ "$nodes" == "n1,n2,n3" ]] || die "replicas on $nodes, expected one per node"
err=$(nctl 1 volume create four --size 64MiB --replicas 4 2>&1) && die "4 replicas on 3 nodes accepted"
grep -q "wants 4 replicas but only 3 nodes can take one (hard anti-affinity" <<<"$err" || die "unexpected error: $err"
[[ -z "$(nctl 1 -o json volume list | jq -r '.[] | select(.name == "four") | .name')" ]] || die "failed create left a volume"
# Every node answers for every volume: n1 owns "spread"; n2 and n3 list it
# with its owner, get it as n1 does, take a snapshot through it, and refuse
# its name.
wait_for 10 "n3 lists spread (owner n1)" '[[ "$(nctl 3 -o json volume list | jq -r ".[] | select(.name == \"spread\") | .owner")" == n1 ]]'
[[ "$(nctl 2 -o json volume get spread | jq -c 'del(.replicas[].rebuild)')" == "$(nctl 1 -o json volume get spread | jq -c 'del(.replicas[].rebuild)')" ]] ||
    die "get on n2 differs from the owner's"
nctl 2 snapshot create spread --name s-from-n2 >/dev/null || die "snapshot through a non-owner"
nctl 1 -o json snapshot list spread | jq -e '.[] | select(.name == "s-from-n2")' >/dev/null || die "the owner lacks the snapshot"
err=$(nctl 3 volume create spread --size 64MiB 2>&1) && die "a taken name was created on n3"
grep -q 'already exists (owner n1)' <<<"$err" || die "unexpected error: $err"
say "n2 and n3 answer for n1's volume; its name is taken cluster-wide"
# Peers' figures refresh with the membership poll (every 2 s).
wait_for 10 "3 x 64 MiB allocated" '[[ "$(nctl 1 -o json node list | jq "[.[].disks[0].allocated] | add")" -eq $((3 * 64 << 20)) ]]'

# Soft anti-affinity: the fourth replica may share a node only on another
# disk; each node has one disk here, so it still fails, with the soft message.
nctl 1 setting set replica-soft-anti-affinity true >/dev/null
err=$(nctl 1 volume create four --size 64MiB --replicas 4 2>&1) && die "4 replicas on 3 one-disk nodes accepted"
grep -q "soft anti-affinity" <<<"$err" || die "unexpected error: $err"
nctl 1 setting set replica-soft-anti-affinity false >/dev/null

# Over-provisioning: a replica bigger than any disk may promise is refused.
disk=$(nctl 1 -o json node list | jq '.[0].disks[0].size')
err=$(nctl 1 volume create huge --size "$(( (disk / 4096 + 1) * 4096 ))" --replicas 1 2>&1) && die "oversized replica placed"
grep -q "nodes can take one" <<<"$err" || die "unexpected error: $err"
nctl 1 setting set storage-over-provisioning-percentage 500 >/dev/null
nctl 1 volume create huge --size "$(( (disk / 4096 + 1) * 4096 ))" --replicas 1 >/dev/null || die "over-provisioned create refused"
nctl 1 volume delete huge >/dev/null

# Bad settings change nothing.
for bad in "auto-salvage maybe" "storage-minimal-available-percentage 101" "engine-replica-timeout 0" "no-such-setting 1"; do
    # shellcheck disable=SC2086
    err=$(nctl 1 setting set $bad 2>&1) && die "setting $bad accepted"
    [[ $(wc -l <<<"$err") -eq 1 && "$err" == error:* ]] || die "setting $bad: $err"
done
[[ "$(nctl 1 setting get auto-salvage -o json | jq -r '.[0].value')" == true ]] || die "auto-salvage changed"

# Node add/remove: a bad address is refused; removing a node that holds
# replicas is refused; an unused peer can be removed and added back.
err=$(nctl 1 node add nonsense 2>&1) && die "bad peer address accepted"
grep -q "bad peer address" <<<"$err" || die "unexpected error: $err"
err=$(nctl 1 node remove n2 2>&1) && die "removed a node holding replicas"
grep -q "still holds replicas" <<<"$err" || die "unexpected error: $err"
nctl 3 node remove n2 >/dev/null || die "n3 cannot drop peer n2"
[[ $(nctl 3 -o json node list | jq length) -eq 2 ]] || die "n3 still lists n2"
nctl 3 node add "$(addr 2)" >/dev/null
wait_cluster 3

# Adopt: n1 loses its record of "spread"; n2 adopts the volume from the
# replicas on the three nodes.
stop_node 1
rm -f "$WORK/n1/data/volumes/spread.json"
start_node 1
[[ -z "$(nctl 1 -o json volume list | jq -r '.[] | select(.owner == "n1") | .name')" ]] || die "n1 still owns volumes"
wait_cluster 2
nctl 2 volume adopt spread >/dev/null || die "adopt failed"
[[ "$(vfield 2 spread '.replicas | length')" -eq 3 && "$(healthy_count 2 spread)" -eq 3 ]] ||
    die "adopted volume: $(nctl 2 volume get spread)"
[[ "$(vfield 2 spread .size)" -eq $((64 << 20)) ]] || die "adopted size $(vfield 2 spread .size)"
err=$(nctl 2 volume adopt nothing-here 2>&1) && die "adopted a volume with no replicas"
grep -q "no replica of volume" <<<"$err" || die "unexpected error: $err"
nctl 2 volume delete spread >/dev/null
for i in 1 2 3; do
    [[ -z "$(ls "$WORK/n$i/disk/replicas")" ]] || die "n$i still holds replicas after delete: $(ls "$WORK/n$i/disk/replicas")"
done
for i in 1 2 3; do stop_node "$i"; done
say PASS
