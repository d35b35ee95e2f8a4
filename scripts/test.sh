#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs, builds
# once (release profile, reused by the unit tests and the guest), runs the
# unit and integration tests, then the end-to-end suite against real
# /dev/ublkbN devices inside a QEMU guest running Debian's 6.12 kernel, and
# a short kernel matrix: three cases again on trixie-backports' 7.3 kernel
# (VM_KERNEL=7.3; its ublk driver has UPDATE_SIZE, 6.12's does not).
#
#   scripts/test.sh            everything
#   SKIP_VM=1 scripts/test.sh  host tests only (the guest suite is not run,
#                              and the summary says so)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
t0=$(date +%s)

bash scripts/install-deps.sh
echo "== S3 test servers (s3s-fs, moto)"
bash scripts/s3-server.sh install
bash scripts/s3-server.sh install-moto

echo "== build (release, all targets)"
cargo build --release --workspace --all-targets --locked 2>&1 | tail -n 3

echo "== lint: rustfmt, clippy, rustdoc"
lint_failed=0
cargo fmt --all --check >target/fmt.log 2>&1 || { echo "cargo fmt --check: FAILED"; head -n 40 target/fmt.log; lint_failed=1; }
cargo clippy --release --workspace --all-targets --features failpoints --locked >target/clippy.log 2>&1 || { echo "cargo clippy: FAILED"; grep -E "^error" -A8 target/clippy.log | head -n 60; lint_failed=1; }
echo "clippy: $(grep -c '^warning' target/clippy.log || true) warnings (see target/clippy.log)"
RUSTDOCFLAGS="-D warnings" cargo doc --release --workspace --no-deps --locked >target/doc.log 2>&1 || { echo "cargo doc: FAILED"; grep -E "^(error|warning)" -A8 target/doc.log | head -n 40; lint_failed=1; }

# Thin clients link no storage code: the API crate, cairnctl, the CSI driver
# and the CRD controller must not depend on these.
for pkg in cairn-api cairnctl cairn-csi cairn-crd; do
    if ! tree=$(cargo tree -p "$pkg" -e normal --prefix none --locked 2>&1); then
        echo "cargo tree -p $pkg failed: $tree"
        lint_failed=1
        continue
    fi
    heavy=$(grep -E "^(cairn |libublk|io-uring|object_store) " <<<"$tree" | sort -u | tr '\n' ' ' || true)
    if [[ -n "$heavy" ]]; then
        echo "thin client $pkg links storage crates: $heavy"
        lint_failed=1
    else
        echo "thin client $pkg: links no engine, libublk, io-uring or object_store"
    fi
done

echo "== unit and integration tests"
cargo test --release --workspace --locked 2>&1 | tee target/host-tests.log | grep -E "^(test result|running|error|failures:|---- )|panicked" || true
host_failed=0
grep -q "test result: FAILED" target/host-tests.log && host_failed=1
grep -qE "^error(\[|:)" target/host-tests.log && host_failed=1
# The failpoint target: the same crate with the named failpoints compiled in
# (only the cairn crate rebuilds; dependencies are reused from above).
echo "== failpoint tests (--features failpoints)"
cargo test --release -p cairn --features failpoints --test failpoints --locked 2>&1 | tee -a target/host-tests.log | grep -E "^(test result|running|error|failures:|---- )|panicked" || true
grep -q "test result: FAILED" target/host-tests.log && host_failed=1
grep -qE "^error(\[|:)" target/host-tests.log && host_failed=1
host_passed=$(grep -o "test result: [a-zA-Z]*\. [0-9]* passed" target/host-tests.log | awk '{s+=$4} END {print s+0}')
host_failed_n=$(grep -o "; [0-9]* failed" target/host-tests.log | awk '{s+=$2} END {print s+0}')
echo "host tests: $host_passed passed, $host_failed_n failed"

# The cluster case that attaches nothing also runs here, on the host: three
# cairnd in their own network namespaces (needs root and `ip netns`).
# Its disks live on a private tmpfs: the host's root filesystem may be a shared
# pool whose free space sits below the 25 % storage-minimal-available rule,
# which would make every disk unschedulable for reasons outside this test.
echo "== cluster basics on the host (network namespaces)"
host_scratch=$repo/target/host-e2e
mkdir -p "$host_scratch"
mountpoint -q "$host_scratch" || mount -t tmpfs -o size=2G cairn-host-e2e "$host_scratch" ||
    echo "warning: could not mount a tmpfs on $host_scratch; disks use the host filesystem"
if REPO=$repo SCRATCH=$host_scratch CASE=06-cluster-basics bash scripts/e2e/06-cluster-basics.sh >target/host-cluster.log 2>&1; then
    host_passed=$((host_passed + 1))
    echo "host cluster basics: PASS"
else
    host_failed_n=$((host_failed_n + 1))
    echo "host cluster basics: FAIL"
    grep -v " INFO " target/host-cluster.log | tail -n 30
fi
if mountpoint -q "$host_scratch"; then umount "$host_scratch" || umount -l "$host_scratch" || true; fi

# The install: the Helm chart linted and rendered, every object validated
# against the Kubernetes schemas and the CRDs, the static manifest's drift.
echo "== Helm chart and manifests (scripts/chart-test.sh)"
if bash scripts/chart-test.sh >target/chart-test.log 2>&1; then
    host_passed=$((host_passed + 1))
    tail -n 1 target/chart-test.log
else
    host_failed_n=$((host_failed_n + 1))
    echo "chart tests: FAIL"
    grep -E "FAIL|^chart-test" target/chart-test.log | tail -n 30
fi
t1=$(date +%s)

vm_passed=0 vm_failed=0
if [[ "${SKIP_VM:-0}" == 1 ]]; then
    echo "== guest e2e suite SKIPPED (SKIP_VM=1): ublk claims are unproven in this run"
else
    echo "== guest harness tests (status, arguments, environment, timeout)"
    set +e
    bash scripts/vm/test-harness.sh 2>&1 | tee target/vm-harness.log
    h_rc=${PIPESTATUS[0]}
    h_passed=$(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\1/p' target/vm-harness.log | tail -n1)
    h_failed=$(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\2/p' target/vm-harness.log | tail -n1)
    h_passed=${h_passed:-0}
    h_failed=${h_failed:-0}
    [[ $h_rc -ne 0 && $h_failed -eq 0 ]] && h_failed=1
    echo "== guest e2e suite (real ublk in QEMU)"
    # The whole suite is one guest boot of about 35 minutes under TCG: more
    # than the harness's default 1800 s budget for one run.
    VM_TIMEOUT=${VM_TIMEOUT:-3600} bash scripts/vm/run.sh scripts/e2e/run-all.sh 2>&1 | tee target/e2e.log
    vm_rc=${PIPESTATUS[0]}
    set -e
    vm_passed=$(sed -n 's/^e2e: \([0-9]*\) passed, \([0-9]*\) failed.*/\1/p' target/e2e.log | tail -n1)
    vm_failed=$(sed -n 's/^e2e: \([0-9]*\) passed, \([0-9]*\) failed.*/\2/p' target/e2e.log | tail -n1)
    vm_passed=$(( ${vm_passed:-0} + h_passed ))
    vm_failed=$(( ${vm_failed:-0} + h_failed ))
    if [[ $vm_rc -ne 0 && $vm_failed -eq 0 ]]; then
        echo "guest run failed (exit $vm_rc) before reporting results: see target/vm/last-console.log"
        vm_failed=1
    fi
    # Kernel matrix, kept short: the kernel-dependent case and the data path.
    echo "== guest e2e on the 7.3 kernel (VM_KERNEL=7.3: online expansion through cairnctl and CSI, fio verify)"
    set +e
    VM_KERNEL=7.3 bash scripts/vm/run.sh scripts/e2e/run-all.sh 18-online-expand.sh 22-csi.sh 01-fio-verify.sh 2>&1 |
        tee target/e2e-7.3.log
    k_rc=${PIPESTATUS[0]}
    set -e
    k_passed=$(sed -n 's/^e2e: \([0-9]*\) passed, \([0-9]*\) failed.*/\1/p' target/e2e-7.3.log | tail -n1)
    k_failed=$(sed -n 's/^e2e: \([0-9]*\) passed, \([0-9]*\) failed.*/\2/p' target/e2e-7.3.log | tail -n1)
    k_passed=${k_passed:-0}
    k_failed=${k_failed:-0}
    if [[ $k_rc -ne 0 && $k_failed -eq 0 ]]; then
        echo "7.3 guest run failed (exit $k_rc) before reporting results: see target/vm/last-console.log"
        k_failed=1
    fi
    vm_passed=$((vm_passed + k_passed))
    vm_failed=$((vm_failed + k_failed))
fi
t2=$(date +%s)
echo "timing: build+host tests $((t1 - t0))s, guest e2e $((t2 - t1))s, total $((t2 - t0))s"
total_failed=$((host_failed_n + vm_failed + host_failed + lint_failed))
echo "cairn tests: $((host_passed + vm_passed)) passed, $total_failed failed"
[[ $total_failed -eq 0 ]]
