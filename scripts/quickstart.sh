#!/usr/bin/env bash
# Builds Cairn and runs the main job on embedded defaults: natively when this
# kernel has ublk (/dev/ublk-control, or `modprobe ublk_drv` works), else
# inside the QEMU guest harness (scripts/vm/run.sh) with Debian's 6.12 kernel.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash scripts/install-deps.sh
cargo build --release --locked --bins 2>&1 | tail -n 2
if [[ -e /dev/ublk-control ]] || modprobe ublk_drv 2>/dev/null; then
    echo "== this kernel has ublk: running natively"
    exec bash scripts/quickstart-demo.sh
fi
echo "== this kernel has no ublk driver: running inside the QEMU guest"
exec bash scripts/vm/run.sh scripts/quickstart-demo.sh
