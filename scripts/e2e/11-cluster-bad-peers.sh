#!/usr/bin/env bash
# Cluster scenario 5: while a 3-replica volume is written, a fourth node
# with the wrong cluster secret tries to join, and random bytes and a
# truncated frame are sent to the replica ports. Each is rejected and
# logged; the servers keep serving; fio finishes and every block verifies.
NODES=4
source "$(dirname "$0")/cluster-lib.sh"

net_up
for i in 1 2 3; do start_node "$i"; done
NODES=3 wait_cluster 1
nctl 1 volume create b --size 96MiB --replicas 3 >/dev/null
DEV=$(nctl 1 volume attach b)
fio_write "$DEV" 0 96M 1 &
FIO=$!
sleep 2
# n4 with another secret.
good=$SECRET
SECRET="$WORK/wrong.secret"
head -c 32 /dev/urandom | base64 >"$SECRET"
start_node 4
SECRET=$good
for i in 1 2 3; do
    ip netns exec "cn4-$$" bash -c "head -c 1048576 /dev/urandom >/dev/tcp/10.77.0.$i/9500" 2>/dev/null || true
    ip netns exec "cn4-$$" bash -c "printf 'CRN1\x05\x00\x00' >/dev/tcp/10.77.0.$i/9500" 2>/dev/null || true
done
wait "$FIO" || { tail -n 20 "$WORK/fio-w1.txt"; die "fio failed during the attacks"; }
grep -q "err= 0" "$WORK/fio-w1.txt" || die "fio reported errors"
sleep 3
for i in 1 2 3; do
    n=$(grep -c "replica connection rejected" "$WORK/n$i/log" || true)
    [[ $n -ge 2 ]] || die "n$i logged $n rejected connections, expected the wrong-secret peer and the garbage"
    kill -0 "${PIDS[i]}" || die "n$i's cairnd died"
done
grep -q "does not match the cluster secret" "$WORK/n4/log" || die "n4 did not learn its secret is wrong"
[[ "$(nctl 4 -o json node list | jq '[.[] | select(.up and (.local | not))] | length')" -eq 0 ]] || die "n4 sees peers up"
[[ "$(healthy_count 1 b)" -eq 3 ]] || die "a replica failed: $(nctl 1 volume get b)"
fio_verify "$DEV" 0 96M 1
say "wrong secret, 1 MiB of random bytes and a truncated frame per node: all rejected, volume healthy"
nctl 1 volume detach b >/dev/null
for i in 1 2 3 4; do stop_node "$i"; done
say PASS
