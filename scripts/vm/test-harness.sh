#!/usr/bin/env bash
# Host-side test of scripts/vm/run.sh: the guest self-test passes, a script's
# exit status comes back, arguments, the start directory and VM_ENV variables
# arrive intact, a script that hangs is stopped by VM_TIMEOUT, and an
# unknown VM_KERNEL is refused. (The 7.3 kernel is exercised by scripts/test.sh.)
# Prints 'N passed, N failed' and exits non-zero if anything failed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
run=$here/run.sh
passed=0
failed=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT

check() { # check NAME COMMAND...: passes when COMMAND succeeds
    local name=$1
    shift
    if "$@"; then
        echo "PASS $name"
        passed=$((passed + 1))
    else
        echo "FAIL $name"
        sed 's/^/    | /' "$out"
        failed=$((failed + 1))
    fi
}

# Runs run.sh with the rest of the arguments; stores its output in $out and
# succeeds when its exit status is $1.
expect_status() {
    local want=$1 rc=0
    shift
    "$run" "$@" >"$out" 2>&1 || rc=$?
    [[ $rc -eq $want ]] || { echo "exit $rc, expected $want" >>"$out"; return 1; }
}

expect_output() { grep -qxF -- "$1" "$out" || { echo "missing line: $1" >>"$out"; return 1; }; }

start=$(date +%s.%N)
check "trivial script exits 0" expect_status 0 "$here/exit-with.sh" 0
end=$(date +%s.%N)
echo "     (boot + trivial script: $(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.1f", e - s }') s wall)"

check "selftest" expect_status 0 "$here/selftest.sh"
grep '^selftest:' "$out" | sed 's/^/    /'

check "exit status 3 propagates" expect_status 3 "$here/exit-with.sh" 3
check "exit status 1 of /bin/false-like script" expect_status 1 "$here/exit-with.sh" 1

args_ok() {
    expect_status 0 "$here/exit-with.sh" 0 "a b" '$HOME' "" 'q"uote' &&
        expect_output 'args: [0] [a b] [$HOME] [] [q"uote]'
}
check "arguments pass through intact" args_ok

cwd_env_ok() {
    (cd "$here" && FOO='x y' BAR='' SHOW_VARS="FOO BAR BAZ" VM_ENV="FOO BAR BAZ SHOW_VARS" \
        expect_status 0 ./exit-with.sh) &&
        expect_output "cwd: $here" && expect_output "FOO=x y" && expect_output "BAR=" &&
        expect_output "BAZ=<unset>" && expect_output "REPO=$(cd "$here/../.." && pwd) SCRATCH=/scratch"
}
check "relative script path, start directory and VM_ENV" cwd_env_ok

outside_ok() { # a script under the host's /tmp (which the guest replaces), not executable
    local t
    t=$(mktemp /tmp/cairn-vm-test.XXXXXX)
    printf 'echo "from tmp"\nprintf "no newline at the end"\nexit 7\n' >"$t"
    chmod -x "$t"
    local rc=0
    expect_status 7 "$t" || rc=1
    rm -f "$t"
    [[ $rc -eq 0 ]] && expect_output "from tmp" && expect_output "no newline at the end"
}
check "non-executable script under /tmp, last line without newline" outside_ok

bulk_ok() { # the end of a long output must not be lost at power-off
    local s
    s=$(cd "$here/../.." && pwd)/target/vm/bulk.sh
    printf '#!/bin/bash\nseq 1 50000\necho last-line\n' >"$s"
    chmod +x "$s"
    expect_status 0 "$s" && [[ $(wc -l <"$out") -ge 50001 ]] && grep -qx 50000 "$out" &&
        expect_output last-line
}
check "50k lines of output arrive whole" bulk_ok

timeout_ok() {
    local hang
    hang=$(cd "$here/../.." && pwd)/target/vm/hang.sh
    printf '#!/bin/sh\necho started\nsleep 600\n' >"$hang"
    chmod +x "$hang"
    VM_TIMEOUT=20 expect_status 124 "$hang" && grep -q 'timed out' "$out"
}
check "VM_TIMEOUT stops a hung script with 124" timeout_ok

bad_kernel_ok() { # refused before anything is fetched or booted
    VM_KERNEL=5.10 expect_status 125 "$here/exit-with.sh" 0 && grep -q 'VM_KERNEL must be 6.12 or 7.3' "$out"
}
check "an unknown VM_KERNEL exits 125" bad_kernel_ok

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
