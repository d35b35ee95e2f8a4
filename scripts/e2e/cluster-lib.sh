#!/usr/bin/env bash
# Helpers for the multi-host cases: NODES cairnd processes, each in its own
# network namespace (cn1..cnN) with a veth pair into one bridge, addresses
# 10.77.0.<i>, replica servers on port 9500, one shared cluster secret.
# The case creates the namespaces with net_up and the EXIT trap removes them.
# Runs in the guest (real ublk) or, for cases that attach nothing, anywhere
# with `ip netns` and root.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NODES=${NODES:-3}
SECRET="$WORK/cluster.secret"
declare -a PIDS=()
BR=cbr$$

die() {
    say "FAIL: $*"
    local i
    for i in $(seq 1 "$NODES"); do
        if [[ -f "$WORK/n$i/log" ]]; then
            echo "--- last lines of n$i's cairnd log ---"
            tail -n 25 "$WORK/n$i/log" || true
        fi
    done
    exit 1
}

addr() { echo "10.77.0.$1:9500"; }
# Every call is bounded: a hung daemon fails the case with its logs, never hangs it.
nctl() { local i=$1; shift; timeout 120 "$BIN/cairnctl" --socket "$WORK/n$i/sock" "$@"; }

net_up() {
    head -c 32 /dev/urandom | base64 >"$SECRET"
    ip link add "$BR" type bridge
    ip link set "$BR" up
    local i
    for i in $(seq 1 "$NODES"); do
        ip netns add "cn$i-$$"
        ip link add "cv$i-$$" type veth peer name eth0 netns "cn$i-$$"
        ip link set "cv$i-$$" master "$BR" up
        ip -n "cn$i-$$" addr add "10.77.0.$i/24" dev eth0
        ip -n "cn$i-$$" link set eth0 up
        ip -n "cn$i-$$" link set lo up
        mkdir -p "$WORK/n$i/data" "$WORK/n$i/disk"
    done
}

net_down() {
    local i
    for i in $(seq 1 "$NODES"); do
        ip netns del "cn$i-$$" 2>/dev/null || true
    done
    ip link del "$BR" 2>/dev/null || true
}

# Cuts node $1 off the network (its link goes down), or heals it.
link_down() { ip link set "cv$1-$$" down; }
link_up() { ip link set "cv$1-$$" up; }

# start_node I [cairnd args...]: starts node I in its namespace; waits for its API.
start_node() {
    local i=$1
    shift
    local peers=() j
    for j in $(seq 1 "$NODES"); do peers+=(--peer "$(addr "$j")"); done
    rm -f "$WORK/n$i/sock"
    ip netns exec "cn$i-$$" "$BIN/cairnd" --node-id "n$i" --data-dir "$WORK/n$i/data" \
        --socket "$WORK/n$i/sock" --disk "$WORK/n$i/disk" \
        --replica-listen "$(addr "$i")" --cluster-secret "$SECRET" "${peers[@]}" \
        --queues "${QUEUES:-2}" --queue-depth "${DEPTH:-64}" "$@" >>"$WORK/n$i/log" 2>&1 &
    PIDS[i]=$!
    local _
    for _ in $(seq 1 300); do
        [[ -S "$WORK/n$i/sock" ]] && nctl "$i" volume list >/dev/null 2>&1 && return 0
        kill -0 "${PIDS[i]}" 2>/dev/null || die "n$i: cairnd exited during startup"
        sleep 0.2
    done
    die "n$i: cairnd did not open its socket within 60 s"
}

kill_node() { # kill -9, as a crash
    local i=$1
    [[ -n "${PIDS[i]:-}" ]] || return 0
    kill -9 "${PIDS[i]}" 2>/dev/null || true
    wait "${PIDS[i]}" 2>/dev/null || true
    PIDS[i]=""
}

stop_node() {
    local i=$1
    [[ -n "${PIDS[i]:-}" ]] || return 0
    kill -TERM "${PIDS[i]}" 2>/dev/null || true
    local _
    for _ in $(seq 1 300); do
        kill -0 "${PIDS[i]}" 2>/dev/null || { PIDS[i]=""; return 0; }
        sleep 0.2
    done
    die "n$i: cairnd did not exit within 60 s of SIGTERM"
}

# Waits until node $1 sees every peer up.
wait_cluster() {
    local i=$1
    wait_for 60 "n$i sees $NODES nodes up" \
        '[[ "$(nctl "$i" -o json node list | jq "[.[] | select(.up)] | length")" -eq "$NODES" ]]'
}

# vfield NODE VOLUME JQ-EXPR
vfield() { nctl "$1" -o json volume get "$2" | jq -r "$3"; }
healthy_count() { vfield "$1" "$2" '[.replicas[] | select(.state == "healthy")] | length'; }

# Bytes the last rebuild of volume $2's replica on node $3 copied, from
# `volume get` on the owner $1.
rebuilt_bytes() {
    vfield "$1" "$2" "[.replicas[] | select(.node == \"$3\") | .last_rebuild.copied_bytes][0] // empty"
}

cluster_cleanup() {
    local i
    for i in $(seq 1 "$NODES"); do
        if [[ -n "${PIDS[i]:-}" ]]; then
            kill -9 "${PIDS[i]}" 2>/dev/null || true
            wait "${PIDS[i]}" 2>/dev/null || true
        fi
    done
    net_down
}
trap cluster_cleanup EXIT

# fio over a whole device: random writes with crc32c verify headers.
fio_job() { # DEV NAME SEED
    echo --name="$2" --filename="$1" --ioengine=libaio --direct=1 --rw=randwrite --bs=16k --iodepth=16 \
        --size=100% --verify=crc32c --verify_fatal=1 --eta=never --randrepeat=1 --randseed="$3"
}

# The head image of every replica of volume $2 (owner $1) must hold the same
# bytes: all replicas live on this machine's filesystem, so compare them.
same_replicas() {
    local owner=$1 vol=$2 dirs sums
    dirs=$(vfield "$owner" "$vol" '.replicas[].dir')
    sums=$(for d in $dirs; do sha256sum "$d"/volume-head-*.img | cut -d' ' -f1; done | sort -u)
    [[ $(wc -l <<<"$sums") -eq 1 ]] || die "replicas of $vol differ: $(for d in $dirs; do sha256sum "$d"/volume-head-*.img; done)"
    say "all $(wc -w <<<"$dirs") replicas of $vol hold identical bytes"
}

# fio phases over one region of a device: write (+verify), verify only.
fio_write() { # DEV REGION-OFFSET REGION-SIZE SEED [fio args...]
    local dev=$1 off=$2 size=$3 seed=$4
    shift 4
    fio --name="w$seed" --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --bs=16k --iodepth=16 \
        --offset="$off" --size="$size" --verify=crc32c --verify_fatal=1 --eta=never --randrepeat=1 \
        --randseed="$seed" --do_verify=0 --output="$WORK/fio-w$seed.txt" "$@"
}
fio_verify() { # DEV REGION-OFFSET REGION-SIZE SEED
    timeout 600 fio --name="w$4" --filename="$1" --ioengine=libaio --direct=1 --rw=randwrite --bs=16k --iodepth=16 \
        --offset="$2" --size="$3" --verify=crc32c --verify_fatal=1 --eta=never --randrepeat=1 \
        --randseed="$4" --verify_only --output="$WORK/fio-v$4.txt" ||
        { tail -n 20 "$WORK/fio-v$4.txt"; die "verify of seed $4 over $2+$3 failed"; }
    grep -q "err= 0" "$WORK/fio-v$4.txt" || die "verify of seed $4 reported errors"
}

# stall_node I SECONDS: freezes node I's cairnd (SIGSTOP) for SECONDS, as a
# hung process or a long GC-like pause would, then lets it go on (SIGCONT).
stall_node() {
    local i=$1 secs=$2
    [[ -n "${PIDS[i]:-}" ]] || return 0
    kill -STOP "${PIDS[i]}"
    sleep "$secs"
    kill -CONT "${PIDS[i]}"
}

# fio_verify_count DEV REGION-OFFSET REGION-SIZE SEED [fio args...]: like
# fio_verify, but reads the whole region even past bad blocks and prints how
# many blocks failed verification (0 when clean). The fio args must repeat
# those given to fio_write (e.g. --bs). Output in $WORK/fio-v<SEED>.txt(.err).
fio_verify_count() {
    local dev=$1 off=$2 size=$3 seed=$4 rc=0 bad
    shift 4
    local out="$WORK/fio-v$seed.txt"
    fio --name="w$seed" --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --bs=16k --iodepth=16 \
        --offset="$off" --size="$size" --verify=crc32c --verify_fatal=0 --continue_on_error=verify --eta=never \
        --randrepeat=1 --randseed="$seed" --verify_only --output="$out" "$@" 2>>"$out.err" || rc=$?
    bad=$(cat "$out" "$out.err" 2>/dev/null | grep -c "requested block:" || true)
    # fio failing without naming a bad block (an I/O error, a bad option) still counts.
    [[ $rc -ne 0 && $bad -eq 0 ]] && bad=1
    echo "$bad"
}

# The snapshot layers of every replica of volume $2 (owner $1) must be the
# same files with the same bytes (run with the volume detached).
same_chains() {
    local owner=$1 vol=$2 dirs d sums
    dirs=$(vfield "$owner" "$vol" '.replicas[].dir')
    sums=$(for d in $dirs; do
        (cd "$d" && for f in volume-snap-*.img; do if [[ -e $f ]]; then echo "$f $(sha256sum <"$f" | cut -d' ' -f1)"; fi; done | sort | sha256sum)
    done | sort -u)
    [[ $(wc -l <<<"$sums") -eq 1 ]] ||
        die "snapshot chains of $vol differ: $(for d in $dirs; do echo "$d:"; (cd "$d" && ls -l volume-snap-*.img 2>&1); done)"
}
