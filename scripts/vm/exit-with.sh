#!/usr/bin/env bash
# Guest helper for test-harness.sh: prints what the harness passed in (args,
# cwd, environment) and exits with the status given as $1 (default 0).
set -euo pipefail
echo "args:$(printf ' [%s]' "$@")"
echo "cwd: $PWD"
echo "REPO=$REPO SCRATCH=$SCRATCH"
for name in ${SHOW_VARS:-}; do echo "$name=${!name-<unset>}"; done
exit "${1:-0}"
