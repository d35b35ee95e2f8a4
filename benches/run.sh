#!/usr/bin/env bash
# Benchmark runner: builds release binaries, boots the guest and runs
# guest-bench.sh there; the table lands in target/bench/results.md.
#   BENCH_SIZE=1G BENCH_RUNTIME=15 benches/run.sh
# With BENCH_RUBLK=1 it also installs rublk (GPL; run as a peer, never
# vendored) and measures its loop target in the same run.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
cargo build --release --locked --bins 2>&1 | tail -n 1
if [[ "${BENCH_RUBLK:-0}" == 1 ]] && ! command -v rublk >/dev/null; then
    cargo install rublk --locked
fi
mkdir -p target/bench
export VM_ENV="BENCH_SIZE BENCH_RUNTIME BENCH_QUEUES PATH"
bash scripts/vm/run.sh benches/guest-bench.sh | tee target/bench/results.md
