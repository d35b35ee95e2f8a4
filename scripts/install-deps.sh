#!/usr/bin/env bash
# Installs what building and testing Cairn needs on a Debian host (root).
# Idempotent: installs only what is missing. The guest harness installs its
# own needs (qemu, kernel package) in scripts/vm/run.sh.
set -euo pipefail

need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for pkg in libclang-dev clang jq fio e2fsprogs xfsprogs iproute2 curl openssl python3-venv bc unzip; do
    have "$pkg" || need+=("$pkg")
done
# npm fetches Helm and kubectl once (scripts/chart-test.sh); any npm will do.
command -v npm >/dev/null || need+=(npm)
if [[ ${#need[@]} -gt 0 ]]; then
    echo "install-deps: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "install-deps: cargo not found: install Rust (rustup) first" >&2; exit 1; }
