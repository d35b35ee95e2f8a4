#!/usr/bin/env bash
# Cluster scenario 4: one replica's disk fills up (n3's disk is a 40 MiB
# tmpfs under a 96 MiB volume). That replica fails with ENOSPC, the volume
# stays writable on the other two, and every block verifies.
source "$(dirname "$0")/cluster-lib.sh"

net_up
mount -t tmpfs -o size=40m cairn-full "$WORK/n3/disk"
trap 'cluster_cleanup; umount "$WORK/n3/disk" 2>/dev/null || true' EXIT
for i in 1 2 3; do start_node "$i"; done
wait_cluster 1
# The small disk may promise more than it holds (thin provisioning); no
# rebuild retries while the disk stays full.
nctl 1 setting set storage-over-provisioning-percentage 400 >/dev/null
nctl 1 setting set concurrent-replica-rebuild-per-node-limit 0 >/dev/null
nctl 1 volume create f --size 96MiB --replicas 3 >/dev/null
[[ "$(vfield 1 f '[.replicas[].node] | sort | join(",")')" == n1,n2,n3 ]] || die "placement: $(nctl 1 volume get f)"
DEV=$(nctl 1 volume attach f)
fio_write "$DEV" 0 80M 1 || { tail -n 20 "$WORK/fio-w1.txt"; die "writes failed when n3's disk filled"; }
grep -q "err= 0" "$WORK/fio-w1.txt" || die "fio reported errors"
state=$(vfield 1 f '[.replicas[] | select(.node == "n3")][0] | .state + ": " + .message')
say "n3's replica: $state"
[[ "$state" == failed:* ]] || die "n3's replica is $state"
grep -qi "space" <<<"$state" || die "failure does not say the disk is full: $state"
[[ "$(vfield 1 f .state)" == degraded ]] || die "volume $(vfield 1 f .state)"
fio_write "$DEV" 80M 16M 2 || die "volume not writable after the disk filled"
fio_verify "$DEV" 80M 16M 2
fio_verify "$DEV" 0 80M 1
say "volume stays writable and verifies with n3's disk full"
nctl 1 volume detach f >/dev/null
for i in 1 2 3; do stop_node "$i"; done
say PASS
