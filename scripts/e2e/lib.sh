#!/usr/bin/env bash
# Helpers for the guest end-to-end cases. Sourced by each case; runs inside
# the QEMU guest (scripts/vm/run.sh) as root, with REPO and SCRATCH set.
set -euo pipefail

: "${REPO:?REPO must point at the repository}"
: "${SCRATCH:?SCRATCH must point at a writable scratch directory}"
BIN="${CAIRN_BIN:-$REPO/target/release}"
CASE="${CASE:-$(basename "$0" .sh)}"
WORK="$SCRATCH/e2e/$CASE"
SOCK="$WORK/cairnd.sock"
DATA="$WORK/data"
LOG="$WORK/cairnd.log"
CAIRND_PID=""

rm -rf "$WORK" && mkdir -p "$WORK/d1" "$WORK/d2" "$DATA"
# fio keeps verify state files in the working directory; the repo is read-only here.
cd "$WORK"

say() { printf '[%s] %s\n' "$CASE" "$*"; }
die() {
    say "FAIL: $*"
    if [[ -f "$LOG" ]]; then
        echo "--- last lines of cairnd.log ---"
        tail -n 40 "$LOG" || true
    fi
    exit 1
}

ctl() { "$BIN/cairnctl" --socket "$SOCK" "$@"; }

# Starts cairnd in the background with two disks; waits for its socket.
start_cairnd() {
    rm -f "$SOCK"
    "$BIN/cairnd" --data-dir "$DATA" --socket "$SOCK" --disk "$WORK/d1" --disk "$WORK/d2" \
        --queues "${QUEUES:-2}" --queue-depth "${DEPTH:-64}" "$@" >>"$LOG" 2>&1 &
    CAIRND_PID=$!
    for _ in $(seq 1 300); do
        [[ -S "$SOCK" ]] && ctl volume list >/dev/null 2>&1 && return 0
        kill -0 "$CAIRND_PID" 2>/dev/null || die "cairnd exited during startup"
        sleep 0.2
    done
    die "cairnd did not open $SOCK within 60 s"
}

stop_cairnd() {
    [[ -n "$CAIRND_PID" ]] || return 0
    kill -TERM "$CAIRND_PID" 2>/dev/null || true
    for _ in $(seq 1 300); do
        kill -0 "$CAIRND_PID" 2>/dev/null || { CAIRND_PID=""; return 0; }
        sleep 0.2
    done
    die "cairnd did not exit within 60 s of SIGTERM"
}

# Field of `volume get -o json` (top level), e.g. vol_field v1 state.
vol_field() { ctl -o json volume get "$1" | jq -r ".$2"; }

# State / name of replica number $2 (0-based) of volume $1.
replica_state() { ctl -o json volume get "$1" | jq -r ".replicas[$2].state"; }
replica_name() { ctl -o json volume get "$1" | jq -r ".replicas[$2].name"; }

# Directory of replica $2 of volume $1 (on one of the two disks).
replica_dir() {
    local name
    name=$(replica_name "$1" "$2")
    ls -d "$WORK"/d*/replicas/"$name" 2>/dev/null | head -n1
}

wait_for() { # wait_for SECONDS DESCRIPTION 'SHELL CONDITION' (single-quoted: evaluated each try)
    local secs=$1 what=$2
    shift 2
    for _ in $(seq 1 $((secs * 5))); do
        eval "$*" && return 0
        sleep 0.2
    done
    die "timed out after ${secs}s waiting for: $what"
}

cleanup() {
    # A case that failed may leave fio or a writer running on a device.
    local j
    for j in $(jobs -p); do
        [[ "$j" == "$CAIRND_PID" ]] || kill "$j" 2>/dev/null || true
    done
    if [[ -n "$CAIRND_PID" ]]; then
        kill -TERM "$CAIRND_PID" 2>/dev/null || true
        wait "$CAIRND_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT
