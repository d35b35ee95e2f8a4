#!/usr/bin/env bash
# Runs every guest e2e case (or those named as arguments) and prints a
# summary line "N passed, N failed". Runs inside the guest.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cases=("$@")
[[ ${#cases[@]} -gt 0 ]] || cases=("$here"/[0-9]*.sh)
passed=0 failed=0 names=()
start=$(date +%s)
for c in "${cases[@]}"; do
    [[ -f "$c" ]] || c="$here/$c"
    name=$(basename "$c" .sh)
    t0=$(date +%s)
    if CASE="$name" bash "$c"; then
        passed=$((passed + 1))
        echo "e2e $name: PASS ($(($(date +%s) - t0))s)"
        # The cases share one scratch disk: a passed case's files go, so
        # the later cases' placement finds room (a full disk takes no
        # replica: every replica creation and rebuild would be refused).
        rm -rf "${SCRATCH:?}/e2e/$name"
    else
        failed=$((failed + 1))
        names+=("$name")
        echo "e2e $name: FAIL ($(($(date +%s) - t0))s)"
        # Keep what explains the failure (logs, outputs), not its data.
        find "${SCRATCH:?}/e2e/$name" -type f ! -name '*log*' ! -name '*.txt' ! -name '*.json' -delete 2>/dev/null
    fi
    echo "e2e scratch: $(df --output=pcent,avail -h "$SCRATCH" | tail -n 1 | xargs) (used, available)"
done
echo "e2e suite took $(($(date +%s) - start))s"
[[ $failed -eq 0 ]] || echo "failed cases: ${names[*]}"
echo "e2e: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
