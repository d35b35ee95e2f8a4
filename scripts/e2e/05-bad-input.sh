#!/usr/bin/env bash
# Case 5: bad input gets a one-line error naming the problem, a non-zero exit,
# and changes nothing.
source "$(dirname "$0")/lib.sh"

start_cairnd
ctl volume create good --size 64MiB --replicas 2 >/dev/null
DEV=$(ctl volume attach good)

expect_error() { # DESCRIPTION PATTERN ARGS...
    local what=$1 pattern=$2
    shift 2
    local out rc=0
    out=$(ctl "$@" 2>&1 >/dev/null) || rc=$?
    [[ $rc -ne 0 ]] || die "$what: exit 0, expected failure"
    [[ $(printf '%s\n' "$out" | wc -l) -eq 1 ]] || die "$what: error is not one line: $out"
    [[ "$out" == error:* ]] || die "$what: error does not start with 'error:': $out"
    grep -qiE "$pattern" <<<"$out" || die "$what: error '$out' does not match /$pattern/"
    say "ok: $what -> $out"
}

before=$(ctl -o json volume list; find "$DATA" "$WORK/d1" "$WORK/d2" | sort)
expect_error "zero size" "size" volume create z --size 0
expect_error "unaligned size" "multiple of 4096" volume create u --size 1000
expect_error "unparsable size" "size" volume create u --size 12XB
expect_error "bad name" "DNS-1123" volume create Bad_Name --size 64MiB
expect_error "duplicate name" "already exists" volume create good --size 64MiB
expect_error "too many replicas" "replica" volume create many --size 64MiB --replicas 3
expect_error "attach attached" "already attached" volume attach good
expect_error "unknown volume get" "not found" volume get nope
expect_error "unknown volume attach" "not found" volume attach nope
expect_error "unknown volume detach" "not found" volume detach nope
expect_error "unknown volume delete" "not found" volume delete nope
expect_error "delete attached" "attached" volume delete good
expect_error "unknown replica" "replica" replica fail good nope
after=$(ctl -o json volume list; find "$DATA" "$WORK/d1" "$WORK/d2" | sort)
[[ "$before" == "$after" ]] || die "bad input changed state: $(diff <(echo "$before") <(echo "$after"))"
[[ -b "$DEV" ]] || die "device vanished"
say "state unchanged after every bad input"

# The device disappears cleanly on delete --force and on daemon shutdown.
ctl volume delete good --force >/dev/null
[[ ! -e "$DEV" ]] || die "$DEV still present after delete --force"
ctl volume create keep --size 64MiB --replicas 1 >/dev/null
DEV=$(ctl volume attach keep)
stop_cairnd
[[ ! -e "$DEV" ]] || die "$DEV still present after cairnd shutdown"
start_cairnd
wait_for 60 "keep re-attached after restart" '[[ -b "$(vol_field keep device)" ]]'
say "attached volume came back after a clean restart at $(vol_field keep device)"
stop_cairnd
say PASS
