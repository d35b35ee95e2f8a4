#!/usr/bin/env python3
"""Offline checks of the Helm chart, its renders, the CRDs and the CR examples.

Called by scripts/chart-test.sh (which installs the tools: a venv with
kubernetes-validate, jsonschema and PyYAML). Every check prints one line,
`ok   <what>` or `FAIL <what>: <why>`, and each command ends with
`chart_check: passed=N failed=M`; the exit status is 1 when a check failed.

  chart_check.py render  --repo R --values V --file F --profile default|non-default [--crds C]
  chart_check.py crds    --repo R --crds C
  chart_check.py examples --repo R --crds C DOC...

There is no API server here: objects are validated against the Kubernetes
OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors),
custom resources against their CRD's openAPIV3Schema (jsonschema, plus the
API server's strict field validation: unknown fields are errors), and the
facts that matter (flags, paths, images, RBAC) are asserted one by one.
CEL rules (x-kubernetes-validations) cannot be evaluated offline; they are
counted and reported.
"""

import argparse
import copy
import os
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSIONS = ["1.33", "1.37"]
NAMESPACE = "cairn-system"
DRIVER = "csi.cairn.io"
CAIRN_BINARIES = {"cairnd", "cairnctl", "cairn-csi", "cairn-controller"}
SIDECAR_IMAGES = {
    "csi-provisioner": "registry.k8s.io/sig-storage/csi-provisioner:v5.3.0",
    "csi-attacher": "registry.k8s.io/sig-storage/csi-attacher:v4.12.0",
    "csi-resizer": "registry.k8s.io/sig-storage/csi-resizer:v2.2.1",
    "csi-snapshotter": "registry.k8s.io/sig-storage/csi-snapshotter:v8.6.0",
    "node-driver-registrar": "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.17.0",
    "liveness-probe": "registry.k8s.io/sig-storage/livenessprobe:v2.19.0",
}
DOCKER_PACKAGES = ["e2fsprogs", "xfsprogs", "util-linux", "nfs-common", "ca-certificates", "kmod"]
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CSIDriver", "StorageClass",
    "VolumeSnapshotClass", "CustomResourceDefinition", "PersistentVolume",
}
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, cond, what, why=""):
        if cond:
            self.passed += 1
            print(f"ok   {what}")
        else:
            self.failed += 1
            print(f"FAIL {what}" + (f": {why}" if why else ""))
        return bool(cond)

    def eq(self, got, want, what):
        return self.check(got == want, what, f"got {got!r}, want {want!r}")

    def done(self):
        print(f"chart_check: passed={self.passed} failed={self.failed}")
        return 1 if self.failed else 0


# ---------------------------------------------------------------- loading


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def ident(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def find(objs, kind, name=None):
    for o in objs:
        if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name):
            return o
    return None


def find_all(objs, kind):
    return [o for o in objs if o.get("kind") == kind]


def get_path(obj, path, default=None):
    cur = obj
    for p in path.split("."):
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        else:
            return default
    return cur


# ---------------------------------------------------------------- CRDs


class CrdSet:
    """The cairn.io CRDs: (group, version, kind) -> (crd, version entry)."""

    def __init__(self, path):
        self.path = path
        self.crds = []
        self.by_gvk = {}
        self.error = None
        if not path or not os.path.exists(path):
            self.error = f"{path} is missing: generate it with crdgen (the chart keeps the CRDs there)"
            return
        try:
            docs = load_all(path)
        except yaml.YAMLError as e:
            self.error = f"{path} is not YAML: {e}"
            return
        for d in docs:
            if d.get("kind") != "CustomResourceDefinition":
                continue
            self.crds.append(d)
            spec = d.get("spec", {})
            for v in spec.get("versions", []):
                key = (spec.get("group"), v.get("name"), spec.get("names", {}).get("kind"))
                self.by_gvk[key] = (d, v)

    def lookup(self, obj):
        api = obj.get("apiVersion", "")
        group, _, version = api.partition("/")
        return self.by_gvk.get((group, version, obj.get("kind")))

    def kinds(self):
        return {k for (_, _, k) in self.by_gvk}


def to_jsonschema(node):
    """An openAPIV3Schema node as a draft-4 JSON Schema (nullable, int-or-string)."""
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in ("properties", "patternProperties"):
            out[k] = {name: to_jsonschema(s) for name, s in v.items()}
        elif k in ("items", "additionalProperties", "not"):
            out[k] = to_jsonschema(v)
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [to_jsonschema(s) for s in v]
        else:
            out[k] = v
    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else out["type"] + ["null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = out["enum"] + [None]
    return out


def unknown_fields(schema, value, path=""):
    """Fields the API server's strict field validation (kubectl's default) rejects."""
    out = []
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return out
    if isinstance(value, dict):
        props = schema.get("properties")
        addl = schema.get("additionalProperties")
        for k, v in value.items():
            sub = f"{path}.{k}" if path else k
            if props is not None and k in props:
                out += unknown_fields(props[k], v, sub)
            elif isinstance(addl, dict):
                out += unknown_fields(addl, v, sub)
            elif addl is True:
                pass
            elif props is not None or schema.get("type") == "object":
                out.append(sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            out += unknown_fields(schema["items"], v, f"{path}[{i}]")
    return out


def validate_metadata(meta):
    """ObjectMeta against Kubernetes' own schema (carried by a ConfigMap)."""
    try:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta},
                                     K8S_VERSIONS[0], strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"metadata.{'.'.join(str(p) for p in e.path)}: {e.message}"
    name = meta.get("name", "")
    if not DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
        return f"metadata.name {name!r} is not a DNS-1123 subdomain"
    return None


def validate_cr(crds, obj, namespace=NAMESPACE):
    """Errors of a cairn.io custom resource against its CRD (empty: valid)."""
    found = crds.lookup(obj)
    if not found:
        known = ", ".join(sorted(f"{g}/{v} {k}" for (g, v, k) in crds.by_gvk)) or "none"
        return [f"no CRD serves {obj.get('apiVersion')} {obj.get('kind')} (known: {known})"]
    crd, ver = found
    errors = []
    if not ver.get("served", False):
        errors.append(f"version {ver.get('name')} is not served")
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        return errors + ["metadata.name is missing"]
    err = validate_metadata(meta)
    if err:
        errors.append(err)
    scope = crd["spec"].get("scope")
    if scope == "Namespaced" and meta.get("namespace") not in (None, namespace):
        errors.append(f"metadata.namespace {meta.get('namespace')!r}: Cairn's resources live in {namespace}")
    if scope == "Cluster" and "namespace" in meta:
        errors.append("metadata.namespace set on a cluster-scoped resource")
    schema = ver.get("schema", {}).get("openAPIV3Schema")
    if not schema:
        return errors + ["the CRD version has no openAPIV3Schema"]
    body = {k: v for k, v in obj.items() if k != "metadata"}
    body_schema = copy.deepcopy(schema)
    body_schema.get("properties", {}).pop("metadata", None)
    validator = jsonschema.Draft4Validator(to_jsonschema(body_schema))
    for e in sorted(validator.iter_errors(body), key=lambda e: list(e.path)):
        errors.append(f"{'.'.join(str(p) for p in e.path) or '(root)'}: {e.message}")
    # apiVersion and kind are always known (the API server adds them to every schema)
    for f in unknown_fields(body_schema, {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}):
        errors.append(f"{f}: unknown field (strict field validation)")
    return errors


def cel_rules(node):
    n = 0
    if isinstance(node, dict):
        n += len(node.get("x-kubernetes-validations", []))
        for v in node.values():
            n += cel_rules(v)
    elif isinstance(node, list):
        for v in node:
            n += cel_rules(v)
    return n


JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
FORBIDDEN_IN_JUNCTOR = ("description", "type", "default", "additionalProperties", "nullable")
FORBIDDEN_ANYWHERE = ("$ref", "$schema", "id", "definitions", "$defs", "patternProperties",
                      "dependencies", "additionalItems")
TYPES = {"object", "array", "string", "integer", "number", "boolean"}


def structural_errors(node, path="", in_junctor=False, root=True):
    """Why an openAPIV3Schema is not structural (Kubernetes' rules), or []."""
    errs = []
    if not isinstance(node, dict):
        return [f"{path or '(root)'}: a schema must be an object"]
    where = path or "(root)"
    for k in FORBIDDEN_ANYWHERE:
        if k in node:
            errs.append(f"{where}: {k} is not allowed in a CRD schema")
    if node.get("uniqueItems") is True:
        errs.append(f"{where}: uniqueItems: true is not allowed")
    ios = node.get("x-kubernetes-int-or-string") is True
    pres = node.get("x-kubernetes-preserve-unknown-fields") is True
    if node.get("x-kubernetes-preserve-unknown-fields") is False:
        errs.append(f"{where}: x-kubernetes-preserve-unknown-fields must be true or absent")
    if in_junctor:
        for k in FORBIDDEN_IN_JUNCTOR:
            if k in node:
                errs.append(f"{where}: {k} inside allOf/anyOf/oneOf/not")
    else:
        t = node.get("type")
        if t is None and not (ios or pres):
            errs.append(f"{where}: no type (only x-kubernetes-int-or-string or "
                        "x-kubernetes-preserve-unknown-fields nodes may omit it)")
        elif t is not None and t not in TYPES:
            errs.append(f"{where}: type {t!r} is not one of {sorted(TYPES)}")
        if ios and t is not None:
            errs.append(f"{where}: x-kubernetes-int-or-string with a type")
        if root and t != "object":
            errs.append("(root): type must be object")
    if "properties" in node and "additionalProperties" in node:
        errs.append(f"{where}: properties and additionalProperties together")
    if node.get("additionalProperties") is False:
        errs.append(f"{where}: additionalProperties: false is not allowed")
    if "items" in node and not isinstance(node["items"], dict):
        errs.append(f"{where}: items must be one schema")
    if "type" in node and node.get("type") == "array" and "items" not in node and not in_junctor:
        errs.append(f"{where}: array without items")
    for i, v in enumerate(node.get("enum", []) or []):
        t = node.get("type")
        ok = (v is None and node.get("nullable")) or {
            "string": isinstance(v, str), "integer": isinstance(v, int) and not isinstance(v, bool),
            "number": isinstance(v, (int, float)) and not isinstance(v, bool),
            "boolean": isinstance(v, bool), "object": isinstance(v, dict), "array": isinstance(v, list),
        }.get(t, True)
        if not ok:
            errs.append(f"{where}: enum value {v!r} is not a {t}")
    outer_props = set((node.get("properties") or {}).keys())
    for j in JUNCTORS:
        if j not in node:
            continue
        members = node[j] if isinstance(node[j], list) else [node[j]]
        for i, m in enumerate(members):
            sub = f"{where}.{j}[{i}]"
            if ios and j == "anyOf" and m in ({"type": "integer"}, {"type": "string"}):
                continue  # the int-or-string pattern
            if isinstance(m, dict):
                for p in (m.get("properties") or {}):
                    if p not in outer_props:
                        errs.append(f"{sub}.properties.{p}: not specified outside the {j}")
                if "items" in m and "items" not in node:
                    errs.append(f"{sub}.items: not specified outside the {j}")
            errs += structural_errors(m, sub, in_junctor=True, root=False)
    for name, sub in (node.get("properties") or {}).items():
        errs += structural_errors(sub, f"{path}.{name}" if path else name, in_junctor, root=False)
    if isinstance(node.get("additionalProperties"), dict):
        errs += structural_errors(node["additionalProperties"], f"{where}.additionalProperties",
                                  in_junctor, root=False)
    if isinstance(node.get("items"), dict):
        errs += structural_errors(node["items"], f"{where}[]", in_junctor, root=False)
    return errs


def metadata_errors(schema):
    meta = (schema.get("properties") or {}).get("metadata")
    if meta is None:
        return []
    errs = []
    for k in meta:
        if k not in ("type", "properties", "description"):
            errs.append(f"metadata: only restrictions of name and generateName are allowed, not {k}")
    for p in (meta.get("properties") or {}):
        if p not in ("name", "generateName"):
            errs.append(f"metadata.properties.{p}: only name and generateName may be restricted")
    return errs


def schema_has_path(schema, json_path):
    """Whether a printer column's jsonPath (.a.b, .a[0].b, filters) exists in the schema."""
    simple = re.split(r"\[", json_path, maxsplit=1)[0]
    parts = [p for p in simple.split(".") if p]
    if parts[:1] == ["metadata"]:
        return True  # ObjectMeta, not in the CRD schema
    node = schema
    for p in parts:
        props = node.get("properties") or {}
        if p in props:
            node = props[p]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        elif node.get("x-kubernetes-preserve-unknown-fields"):
            return True
        else:
            return False
    return True


def k8s_validate(obj, strict=True):
    """Errors of a built-in object against Kubernetes' schemas; None when the kind is unknown."""
    errs = []
    for v in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, v, strict=strict)
        except kubernetes_validate.SchemaNotFoundError:
            return None
        except kubernetes_validate.ValidationError as e:
            errs.append(f"{v}: {'.'.join(str(p) for p in e.path)}: {e.message}")
        except kubernetes_validate.VersionNotSupportedError:
            errs.append(f"kubernetes-validate does not support {v}")
    return errs


def cmd_crds(args, c):
    crds = CrdSet(args.crds)
    if not c.check(crds.error is None, f"CRD file {os.path.relpath(args.crds, args.repo)} present",
                   crds.error):
        return
    docs = load_all(args.crds)
    c.check(len(crds.crds) == len(docs) and docs,
            "CRD file holds only CustomResourceDefinitions",
            f"{len(docs)} documents, {len(crds.crds)} CRDs")
    seen = set()
    for crd in crds.crds:
        name = crd.get("metadata", {}).get("name", "?")
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        kind = names.get("kind", "?")
        errs = k8s_validate(crd)
        c.check(errs == [], f"CRD {name}: valid CustomResourceDefinition (kubernetes-validate --strict "
                f"{' and '.join(K8S_VERSIONS)})", "; ".join(errs or ["schema not found"]))
        c.eq(spec.get("group"), "cairn.io", f"CRD {name}: group")
        c.eq(name, f"{names.get('plural')}.{spec.get('group')}", f"CRD {name}: name is plural.group")
        c.check(name not in seen, f"CRD {name}: defined once")
        seen.add(name)
        c.check(spec.get("scope") in ("Namespaced", "Cluster"), f"CRD {name}: scope",
                repr(spec.get("scope")))
        c.check(re.match(r"^[A-Z][A-Za-z0-9]*$", kind or "") is not None, f"CRD {name}: kind {kind} is CamelCase")
        c.eq(names.get("singular", kind.lower()), kind.lower(), f"CRD {name}: singular")
        if "listKind" in names:
            c.eq(names["listKind"], kind + "List", f"CRD {name}: listKind")
        versions = spec.get("versions", [])
        c.check(sum(1 for v in versions if v.get("storage")) == 1,
                f"CRD {name}: exactly one storage version")
        for v in versions:
            vn = f"CRD {name} {v.get('name')}"
            schema = v.get("schema", {}).get("openAPIV3Schema")
            if not c.check(isinstance(schema, dict), f"{vn}: has an openAPIV3Schema"):
                continue
            serrs = structural_errors(schema) + metadata_errors(schema)
            c.check(serrs == [], f"{vn}: structural schema", "; ".join(serrs[:12]) +
                    (f" (+{len(serrs) - 12} more)" if len(serrs) > 12 else ""))
            c.check("status" in (v.get("subresources") or {}), f"{vn}: status subresource")
            c.check("status" in (schema.get("properties") or {}), f"{vn}: schema has .status")
            c.check("spec" in (schema.get("properties") or {}), f"{vn}: schema has .spec")
            cols = v.get("additionalPrinterColumns") or []
            c.check(len(cols) > 0, f"{vn}: printer columns")
            for col in cols:
                jp = col.get("jsonPath", "")
                c.check(col.get("type") in ("integer", "number", "string", "boolean", "date")
                        and schema_has_path(schema, jp),
                        f"{vn}: column {col.get('name')} ({jp}) names a field of the schema",
                        f"type {col.get('type')!r}, path {jp!r}")
            n = cel_rules(schema)
            if n:
                print(f"note {vn}: {n} CEL rule(s) (x-kubernetes-validations) are not evaluated offline")


# ---------------------------------------------------------------- RBAC


def rbac_allows(objs, sa_ns, sa, verb, group, resource, namespace=None, name=None):
    """Whether ServiceAccount sa_ns/sa may `verb` group/resource (namespace None: cluster-wide)."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in objs if o.get("kind") in ("Role", "ClusterRole")}

    def rule_matches(rule):
        groups = rule.get("apiGroups", [])
        if "*" not in groups and group not in groups:
            return False
        if "*" not in rule.get("verbs", []) and verb not in rule.get("verbs", []):
            return False
        res, _, sub = resource.partition("/")
        ok = False
        for r in rule.get("resources", []):
            if r == "*" or r == resource or (sub and r == f"*/{sub}"):
                ok = True
        if not ok:
            return False
        names = rule.get("resourceNames") or []
        return not names or (name is not None and name in names)

    for b in objs:
        if b.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa and s.get("namespace") == sa_ns
                   for s in b.get("subjects", [])):
            continue
        ref = b["roleRef"]
        if b["kind"] == "RoleBinding":
            bns = b["metadata"].get("namespace")
            if namespace != bns:
                continue
            role = roles.get((ref["kind"], bns if ref["kind"] == "Role" else None, ref["name"]))
        else:
            role = roles.get((ref["kind"], None, ref["name"])) if ref["kind"] == "ClusterRole" else None
        if role and any(rule_matches(r) for r in role.get("rules", [])):
            return True
    return False


def check_rbac(objs, c, crds):
    ns = NAMESPACE

    def can(sa, verb, group, resource, namespace=None, name=None, want=True):
        where = f"in {namespace}" if namespace else "cluster-wide"
        res = f"{group or 'core'}/{resource}" + (f" {name}" if name else "")
        got = rbac_allows(objs, ns, sa, verb, group, resource, namespace, name)
        c.check(got == want, f"RBAC: {sa} {'can' if want else 'cannot'} {verb} {res} {where}")

    # bindings point at roles and accounts that exist
    for b in find_all(objs, "RoleBinding") + find_all(objs, "ClusterRoleBinding"):
        ref = b["roleRef"]
        rns = b["metadata"].get("namespace") if ref["kind"] == "Role" else None
        c.check(any(o.get("kind") == ref["kind"] and o["metadata"]["name"] == ref["name"]
                    and o["metadata"].get("namespace") == rns for o in objs),
                f"{ident(b)}: roleRef {ref['kind']}/{ref['name']} exists")
        for s in b.get("subjects", []):
            c.check(s.get("kind") == "ServiceAccount" and find(objs, "ServiceAccount", s["name"])
                    and s.get("namespace") == ns,
                    f"{ident(b)}: subject {s.get('kind')}/{s.get('name')} is a ServiceAccount of the chart")
    for o in find_all(objs, "Role") + find_all(objs, "ClusterRole"):
        wild = [x for r in o.get("rules", []) for x in r.get("verbs", []) + r.get("resources", []) + r.get("apiGroups", [])
                if "*" in x]
        c.check(not wild, f"{ident(o)}: no wildcards (verbs, resources, API groups)", f"{wild}")

    # cairn-node: cairn-controller
    plurals = [(crd["spec"]["names"]["plural"], crd["spec"].get("scope")) for crd in crds.crds] \
        if not crds.error else []
    if not plurals:
        c.check(False, "RBAC: cairn-node covers every cairn.io resource", crds.error or "no CRDs")
    for plural, scope in plurals:
        where = ns if scope == "Namespaced" else None
        for verb in ("get", "list", "watch", "create", "update", "patch"):
            can("cairn-node", verb, "cairn.io", plural, where)
        for verb in ("update", "patch"):
            can("cairn-node", verb, "cairn.io", f"{plural}/status", where)
    if any(p == "volumes" for p, _ in plurals) or not plurals:
        can("cairn-node", "update", "cairn.io", "volumes/finalizers",
            dict(plurals).get("volumes", "Namespaced") == "Namespaced" and ns or None)
    for res in ("nodes", "persistentvolumes", "persistentvolumeclaims"):
        for verb in ("get", "list", "watch"):
            can("cairn-node", verb, "", res)
    can("cairn-node", "update", "", "persistentvolumeclaims", want=False)
    can("cairn-node", "delete", "", "nodes", want=False)
    for group in ("", "events.k8s.io"):
        for verb in ("create", "patch"):
            can("cairn-node", verb, group, "events", ns)
    for verb in ("get", "create", "update"):
        can("cairn-node", verb, "coordination.k8s.io", "leases", ns)
    can("cairn-node", "get", "", "secrets", ns, "cairn-cluster-secret")
    can("cairn-node", "get", "", "secrets", "default", "cairn-cluster-secret", want=False)
    can("cairn-node", "list", "", "secrets", None, want=False)
    can("cairn-node", "create", "", "secrets", ns, want=False)

    # cairn-csi-controller: the sidecars
    sa = "cairn-csi-controller"
    for verb in ("get", "list", "watch", "create", "patch", "delete"):
        can(sa, verb, "", "persistentvolumes")
    for verb in ("get", "list", "watch", "update"):
        can(sa, verb, "", "persistentvolumeclaims")
    can(sa, "patch", "", "persistentvolumeclaims/status")
    for verb in ("get", "list", "watch"):
        for g, r in (("", "pods"), ("", "nodes"), ("storage.k8s.io", "storageclasses"),
                     ("storage.k8s.io", "csinodes"), ("storage.k8s.io", "volumeattachments"),
                     ("snapshot.storage.k8s.io", "volumesnapshotclasses"),
                     ("snapshot.storage.k8s.io", "volumesnapshotcontents"),
                     ("storage.k8s.io", "volumeattributesclasses")):
            can(sa, verb, g, r)
    for verb in ("get", "list"):
        can(sa, verb, "snapshot.storage.k8s.io", "volumesnapshots")
    can(sa, "patch", "storage.k8s.io", "volumeattachments")
    can(sa, "patch", "storage.k8s.io", "volumeattachments/status")
    for verb in ("create", "update", "patch"):
        can(sa, verb, "snapshot.storage.k8s.io", "volumesnapshotcontents")
    for verb in ("update", "patch"):
        can(sa, verb, "snapshot.storage.k8s.io", "volumesnapshotcontents/status")
    for verb in ("create", "patch"):
        can(sa, verb, "", "events")
    for verb in ("get", "list", "watch", "create", "update", "delete"):
        can(sa, verb, "coordination.k8s.io", "leases", ns)
    can(sa, "create", "coordination.k8s.io", "leases", "kube-system", want=False)
    can(sa, "get", "", "secrets", ns, "cairn-cluster-secret", want=False)

    # cairn-init: only the cluster Secret
    can("cairn-init", "create", "", "secrets", ns)
    can("cairn-init", "get", "", "secrets", ns, "cairn-cluster-secret")
    can("cairn-init", "get", "", "secrets", ns, "some-other-secret", want=False)
    can("cairn-init", "list", "", "secrets", ns, want=False)
    can("cairn-init", "update", "", "secrets", ns, "cairn-cluster-secret", want=False)
    can("cairn-init", "create", "", "secrets", "default", want=False)


# ---------------------------------------------------------------- renders

SNAPSHOT_CLASS_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "driver", "deletionPolicy"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "snapshot.storage.k8s.io/v1"},
        "kind": {"const": "VolumeSnapshotClass"},
        "metadata": {"type": "object", "required": ["name"]},
        "driver": {"type": "string", "minLength": 1},
        "deletionPolicy": {"enum": ["Delete", "Retain"]},
        "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                         r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "properties": {
                    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "matchExpressions": {"type": "array"}}, "additionalProperties": False},
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"},
                    "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"},
                        "targetPort": {"type": ["string", "integer"]},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": DURATION,
                        "scrapeTimeout": DURATION,
                        "honorLabels": {"type": "boolean"},
                        "relabelings": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False, "properties": {
                                "sourceLabels": {"type": "array", "items": {"type": "string"}},
                                "separator": {"type": "string"},
                                "targetLabel": {"type": "string"},
                                "regex": {"type": "string"},
                                "replacement": {"type": "string"},
                                "action": {"type": "string"},
                                "modulus": {"type": "integer"}}}},
                        "metricRelabelings": {"type": "array"},
                    },
                }},
            },
        },
    },
}


def validate_object(obj, crds, c):
    """Schema validation of one rendered object, by what knows its kind."""
    name = ident(obj)
    api = obj.get("apiVersion", "")
    if api.startswith("cairn.io/"):
        if crds.error:
            c.check(False, f"{name}: valid against its CRD", crds.error)
        else:
            errs = validate_cr(crds, obj)
            c.check(not errs, f"{name}: valid against its CRD ({api})", "; ".join(errs))
        return
    if obj.get("kind") == "VolumeSnapshotClass":
        errs = [e.message for e in jsonschema.Draft7Validator(SNAPSHOT_CLASS_SCHEMA).iter_errors(obj)]
        c.check(not errs, f"{name}: valid VolumeSnapshotClass (snapshot.storage.k8s.io/v1)", "; ".join(errs))
        return
    if obj.get("kind") == "ServiceMonitor":
        errs = [f"{'.'.join(map(str, e.path))}: {e.message}"
                for e in jsonschema.Draft7Validator(SERVICE_MONITOR_SCHEMA).iter_errors(obj)]
        c.check(not errs, f"{name}: valid ServiceMonitor (monitoring.coreos.com/v1)", "; ".join(errs))
        return
    errs = k8s_validate(obj)
    if errs is None:
        c.check(False, f"{name}: has a schema", f"no schema for {api} {obj.get('kind')}")
    else:
        c.check(not errs, f"{name}: valid {api} {obj.get('kind')} (kubernetes-validate --strict "
                f"{' and '.join(K8S_VERSIONS)})", "; ".join(errs))


def containers(obj):
    return {ct["name"]: ct for ct in obj["spec"]["template"]["spec"]["containers"]}


def env_names(ct):
    return {e["name"] for e in ct.get("env", [])}


def mounts(ct):
    return {m["mountPath"]: m for m in ct.get("volumeMounts", [])}


def check_pod_spec(obj, c, repo):
    """Internal consistency of a workload's pod template."""
    name = ident(obj)
    pod = obj["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    used = set()
    ports = []
    for ct in pod["containers"]:
        cn = f"{name} {ct['name']}"
        refs = set()
        for s in (ct.get("command") or []) + (ct.get("args") or []):
            refs |= set(ENV_REF.findall(s))
        missing = refs - env_names(ct)
        c.check(not missing, f"{cn}: every $(VAR) in its command is in its env", f"undefined {sorted(missing)}")
        for m in ct.get("volumeMounts", []):
            used.add(m["name"])
            c.check(m["name"] in vols, f"{cn}: mount {m['mountPath']} names a volume", m["name"])
            if m.get("mountPropagation") == "Bidirectional":
                c.check(ct.get("securityContext", {}).get("privileged") is True,
                        f"{cn}: Bidirectional mount {m['mountPath']} is in a privileged container")
        for p in ct.get("ports", []):
            pn = p.get("name", "")
            ports.append(pn)
            c.check(IANA_SVC_NAME.match(pn) and len(pn) <= 15 and re.search("[a-z]", pn) and "--" not in pn,
                    f"{cn}: port name {pn!r} is an IANA service name (<= 15 characters)")
        for probe in ("livenessProbe", "readinessProbe"):
            port = get_path(ct, f"{probe}.httpGet.port")
            if isinstance(port, str):
                c.check(port in {p.get("name") for p in ct.get("ports", [])},
                        f"{cn}: {probe} port {port} is one of its ports")
        if ct["image"].startswith("ghcr.io/cairn-storage/cairn:"):
            binary = (ct.get("command") or [""])[0]
            c.check(binary in CAIRN_BINARIES, f"{cn}: runs a binary of the image ({binary})")
        c.check(not ct["image"].endswith(":latest") and ":" in ct["image"].rsplit("/", 1)[-1],
                f"{cn}: image {ct['image']} has a pinned tag")
    c.check(len(ports) == len(set(ports)), f"{name}: port names unique in the pod")
    unused = set(vols) - used
    c.check(not unused, f"{name}: every volume is mounted", f"unused {sorted(unused)}")
    sel = obj["spec"].get("selector", {}).get("matchLabels")
    if sel is not None:
        labels = obj["spec"]["template"]["metadata"].get("labels", {})
        c.check(all(labels.get(k) == v for k, v in sel.items()), f"{name}: selector matches its pod labels")


def dockerfile_facts(repo, c):
    path = os.path.join(repo, "deploy", "Dockerfile")
    if not c.check(os.path.exists(path), "deploy/Dockerfile exists"):
        return
    text = open(path).read()
    c.check(re.search(r"^FROM debian:bookworm-slim\s*$", text, re.M), "Dockerfile: FROM debian:bookworm-slim")
    joined = text.replace("\\\n", " ")
    m = re.search(r"apt-get install -y --no-install-recommends\s+([^&\n]+)", joined)
    pkgs = m.group(1).split() if m else []
    c.eq(sorted(pkgs), sorted(DOCKER_PACKAGES), "Dockerfile: installs exactly the Debian packages named")
    m = re.search(r"^COPY\s+(.+)\s+/usr/local/bin/\s*$", text, re.M)
    srcs = m.group(1).split() if m else []
    c.eq(sorted(os.path.basename(s) for s in srcs), sorted(CAIRN_BINARIES),
         "Dockerfile: copies the four binaries to /usr/local/bin")
    c.check(all(s.startswith("target/release/") for s in srcs), "Dockerfile: copies from target/release (repo root context)")
    ign = os.path.join(repo, "deploy", "Dockerfile.dockerignore")
    if c.check(os.path.exists(ign), "deploy/Dockerfile.dockerignore exists"):
        lines = [l.strip() for l in open(ign) if l.strip() and not l.startswith("#")]
        c.check(lines[:1] == ["*"] and {f"!{s}" for s in srcs} == set(lines[1:]),
                "Dockerfile.dockerignore: the context is the copied binaries only")


def doc_names(path, heading=None):
    """Backticked names in the first column of a markdown table (after heading)."""
    text = open(path).read()
    if heading:
        i = text.find(heading)
        if i < 0:
            return set()
        text = text[i:]
    names = set()
    in_table = False
    for line in text.splitlines():
        if line.startswith("|"):
            in_table = True
            first = line.split("|")[1]
            names |= set(re.findall(r"`([^`]+)`", first))
        elif in_table:
            break
    return names


def values_documented(repo, c):
    """Every value of values.yaml has a row in docs/install.md's values table."""
    values = yaml.safe_load(open(os.path.join(repo, "deploy", "helm", "cairn", "values.yaml")))
    named = doc_names(os.path.join(repo, "docs", "install.md"), "| value |")

    def leaves(d, prefix=""):
        for k, v in d.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict) and v and not any(p in named for p in (path,)):
                yield from leaves(v, path + ".")
            else:
                yield path

    missing = []
    for path in leaves(values):
        parts = path.split(".")
        prefixes = {".".join(parts[:i]) for i in range(2, len(parts) + 1)} | {path}
        if not (prefixes & named or f".{parts[-1]}" in named):
            missing.append(path)
    c.check(not missing, "every value of values.yaml is in docs/install.md's values table", f"missing {missing}")


def check_render(args, c):
    objs = load_all(args.file)
    crds = CrdSet(args.crds)
    values = yaml.safe_load(open(args.values)) or {} if args.values else {}
    nd = args.profile == "non-default"
    repo = args.repo
    print(f"-- {args.profile} render: {len(objs)} objects")

    # every object is valid, in the right namespace, named once
    seen = set()
    for o in objs:
        validate_object(o, crds, c)
        key = (o.get("apiVersion", "").split("/")[0], o.get("kind"), o["metadata"].get("namespace"),
               o["metadata"]["name"])
        c.check(key not in seen, f"{ident(o)}: rendered once")
        seen.add(key)
        meta = o["metadata"]
        scope_cluster = o["kind"] in CLUSTER_SCOPED
        found = crds.lookup(o) if o.get("apiVersion", "").startswith("cairn.io/") else None
        if found:
            scope_cluster = found[0]["spec"].get("scope") == "Cluster"
        if scope_cluster:
            c.check("namespace" not in meta, f"{ident(o)}: cluster-scoped, no namespace")
        else:
            c.eq(meta.get("namespace"), NAMESPACE, f"{ident(o)}: namespace")
        ann = meta.get("annotations") or {}
        c.check(not any(k.startswith("helm.sh/hook") for k in ann), f"{ident(o)}: no helm hook (kubectl apply runs it too)")

    # --include-crds: the CRDs first, exactly the chart's crds/ file
    in_render = [o for o in objs if o.get("kind") == "CustomResourceDefinition"]
    if in_render:
        c.check(objs[:len(in_render)] == in_render, "CRDs come first (kubectl apply makes them before their users)")
        c.check(not crds.error and in_render == crds.crds, "rendered CRDs are the chart's crds/cairn.io.yaml",
                crds.error or "they differ")
    elif not nd:
        c.check(False, "default render (--include-crds) carries the CRDs", crds.error or "none rendered")

    image = f"ghcr.io/cairn-storage/cairn:{(values.get('image') or {}).get('tag') or '0.1.0'}"
    kubelet = values.get("kubeletDir", "/var/lib/kubelet")
    plugin = f"{kubelet}/plugins/{DRIVER}"

    # the objects there must be
    expected = [("Namespace", NAMESPACE), ("ServiceAccount", "cairn-node"),
                ("ServiceAccount", "cairn-csi-controller"), ("ServiceAccount", "cairn-init"),
                ("DaemonSet", "cairn-node"), ("Deployment", "cairn-csi-controller"), ("Job", "cairn-init"),
                ("CSIDriver", DRIVER), ("StorageClass", "cairn"), ("Service", "cairn-metrics")]
    for kind, name in expected:
        c.check(find(objs, kind, name), f"{args.profile}: renders {kind}/{name}")

    # CSIDriver
    drv = find(objs, "CSIDriver", DRIVER)
    if drv:
        c.eq(drv["spec"], {"attachRequired": True, "podInfoOnMount": True, "fsGroupPolicy": "File",
                           "volumeLifecycleModes": ["Persistent"]}, "CSIDriver csi.cairn.io: spec")

    # StorageClass
    sc = find(objs, "StorageClass", "cairn")
    if sc:
        c.eq(sc.get("provisioner"), DRIVER, "StorageClass cairn: provisioner")
        c.eq(sc.get("allowVolumeExpansion"), True, "StorageClass cairn: allowVolumeExpansion")
        c.eq(sc.get("reclaimPolicy"), "Delete", "StorageClass cairn: reclaimPolicy")
        c.eq(sc.get("volumeBindingMode"), "WaitForFirstConsumer", "StorageClass cairn: volumeBindingMode")
        c.eq(sc["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class"),
             "false" if nd else "true", "StorageClass cairn: is-default-class")
        want = {"numberOfReplicas": "3", "staleReplicaTimeout": "30", "dataLocality": "disabled",
                "csi.storage.k8s.io/fstype": "ext4"}
        if nd:
            want.update({"numberOfReplicas": "2", "dataLocality": "best-effort"})
        c.eq(sc.get("parameters"), want, "StorageClass cairn: parameters")
        accepted = doc_names(os.path.join(repo, "docs", "kubernetes.md"), "### StorageClass parameters")
        bad = [k for k in sc.get("parameters", {}) if k not in accepted and not k.startswith("csi.storage.k8s.io/")]
        c.check(accepted and not bad, "StorageClass cairn: parameters are the ones docs/kubernetes.md lists",
                f"not accepted by cairn-csi: {bad}" if accepted else "no parameter table found in docs/kubernetes.md")
        c.check(all(isinstance(v, str) for v in sc.get("parameters", {}).values()),
                "StorageClass cairn: parameter values are strings")

    # VolumeSnapshotClasses
    snap, bak = find(objs, "VolumeSnapshotClass", "cairn-snapshot"), find(objs, "VolumeSnapshotClass", "cairn-backup")
    if nd:
        c.check(snap is None and bak is None, "snapshotClasses.enabled=false: no VolumeSnapshotClass")
    else:
        for vsc, typ in ((snap, "snap"), (bak, "bak")):
            if c.check(vsc, f"renders VolumeSnapshotClass with type {typ}"):
                c.eq(vsc.get("driver"), DRIVER, f"{ident(vsc)}: driver")
                c.eq(vsc.get("deletionPolicy"), "Delete", f"{ident(vsc)}: deletionPolicy")
                c.eq(vsc.get("parameters"), {"type": typ}, f"{ident(vsc)}: parameters")
        if bak and snap:
            c.eq(bak["metadata"].get("labels", {}).get("velero.io/csi-volumesnapshot-class"), "true",
                 "VolumeSnapshotClass/cairn-backup: labelled for Velero")
            c.check("velero.io/csi-volumesnapshot-class" not in snap["metadata"].get("labels", {}),
                    "VolumeSnapshotClass/cairn-snapshot: not labelled for Velero (Velero needs backups)")

    # the node DaemonSet
    ds = find(objs, "DaemonSet", "cairn-node")
    if ds:
        check_pod_spec(ds, c, repo)
        pod = ds["spec"]["template"]["spec"]
        c.eq(pod.get("hostNetwork"), True, "DaemonSet cairn-node: hostNetwork")
        c.eq(pod.get("dnsPolicy"), "ClusterFirstWithHostNet", "DaemonSet cairn-node: dnsPolicy")
        c.eq(pod.get("priorityClassName"), "system-node-critical", "DaemonSet cairn-node: priorityClassName")
        c.eq(pod.get("serviceAccountName"), "cairn-node", "DaemonSet cairn-node: serviceAccountName")
        cts = containers(ds)
        c.eq(list(cts), ["cairnd", "cairn-controller", "cairn-csi", "node-driver-registrar", "liveness-probe"],
             "DaemonSet cairn-node: containers")
        cd = cts.get("cairnd", {})
        c.eq(cd.get("command"), ["cairnd"], "cairnd: command")
        c.eq(cd.get("args"), ["--data-dir=/var/lib/cairn", "--socket=/run/cairn/cairnd.sock",
                              "--node-id=$(NODE_NAME)", "--replica-listen=$(NODE_IP):9500",
                              "--cluster-secret=/etc/cairn/cluster/secret",
                              "--metrics-listen=$(NODE_IP):9420", "--log-level=info"], "cairnd: args")
        c.check(not any("--peer" in a for ct in cts.values() for a in ct.get("args", [])),
                "cairnd: no --peer (the controller feeds membership)")
        c.eq(cd.get("securityContext", {}).get("privileged"), True, "cairnd: privileged")
        env = {e["name"]: get_path(e, "valueFrom.fieldRef.fieldPath") for e in cd.get("env", [])}
        c.eq(env, {"NODE_NAME": "spec.nodeName", "NODE_IP": "status.hostIP"}, "cairnd: env from the downward API")
        vols = {v["name"]: v for v in pod.get("volumes", [])}

        def host(ct, path):
            m = mounts(ct).get(path)
            return (m and get_path(vols.get(m["name"], {}), "hostPath.path"), m)

        m = mounts(cd)
        c.eq(host(cd, "/dev")[0], "/dev", "cairnd: host /dev at /dev")
        c.eq(host(cd, "/var/lib/cairn")[0], "/var/lib/cairn", "cairnd: data dir at /var/lib/cairn")
        c.eq(host(cd, "/run/cairn")[0], "/run/cairn", "cairnd: socket dir at /run/cairn")
        c.check(host(cd, "/lib/modules")[0] == "/lib/modules" and m.get("/lib/modules", {}).get("readOnly"),
                "cairnd: /lib/modules read-only")
        sec = vols.get((m.get("/etc/cairn/cluster") or {}).get("name"), {}).get("secret", {})
        c.check(sec.get("secretName") == "cairn-cluster-secret" and {"key": "secret", "path": "secret"} in sec.get("items", [])
                and m.get("/etc/cairn/cluster", {}).get("readOnly"),
                "cairnd: Secret cairn-cluster-secret (key secret) read-only at /etc/cairn/cluster")
        c.eq(get_path(vols.get("socket-dir", {}), "hostPath.type"), "DirectoryOrCreate", "socket dir: DirectoryOrCreate")
        ctl = cts.get("cairn-controller", {})
        c.eq(ctl.get("command"), ["cairn-controller"], "cairn-controller: command")
        c.eq(ctl.get("args"), ["run", "--node-name=$(NODE_NAME)", "--namespace=$(POD_NAMESPACE)",
                               "--cairnd-socket=/run/cairn/cairnd.sock", "--replica-addr=$(NODE_IP):9500",
                               "--metrics-listen=$(NODE_IP):9502"], "cairn-controller: args")
        c.check(not ctl.get("securityContext", {}).get("privileged"), "cairn-controller: not privileged")
        c.eq(host(ctl, "/run/cairn")[0], "/run/cairn", "cairn-controller: socket dir at /run/cairn")
        csi = cts.get("cairn-csi", {})
        c.eq(csi.get("command"), ["cairn-csi"], "cairn-csi node: command")
        c.eq(csi.get("args"), ["--mode=node", "--endpoint=unix:///csi/csi.sock", "--node-id=$(NODE_NAME)",
                               "--cairnd-socket=/run/cairn/cairnd.sock", f"--driver-name={DRIVER}",
                               f"--kubelet-dir={kubelet}", "--log-level=info"], "cairn-csi node: args")
        c.eq(csi.get("securityContext", {}).get("privileged"), True, "cairn-csi node: privileged")
        c.eq(host(csi, "/csi")[0], plugin, "cairn-csi node: plugin dir at /csi")
        km = mounts(csi).get(kubelet, {})
        c.check(host(csi, kubelet)[0] == kubelet and km.get("mountPropagation") == "Bidirectional",
                f"cairn-csi node: {kubelet} at the same path, Bidirectional")
        c.eq(host(csi, "/dev")[0], "/dev", "cairn-csi node: /dev")
        c.eq(host(csi, "/run/cairn")[0], "/run/cairn", "cairn-csi node: socket dir")
        c.check(get_path(csi, "livenessProbe.httpGet.path") == "/healthz"
                and {p["name"]: p["containerPort"] for p in csi.get("ports", [])}.get("healthz") == 9808,
                "cairn-csi node: livenessProbe /healthz on port 9808")
        reg = cts.get("node-driver-registrar", {})
        c.eq(reg.get("image"), SIDECAR_IMAGES["node-driver-registrar"], "node-driver-registrar: image")
        c.eq(reg.get("args"), ["--csi-address=/csi/csi.sock", f"--kubelet-registration-path={plugin}/csi.sock"],
             "node-driver-registrar: args")
        c.eq(host(reg, "/registration")[0], f"{kubelet}/plugins_registry", "node-driver-registrar: registration dir")
        c.eq(host(reg, "/csi")[0], plugin, "node-driver-registrar: plugin dir")
        lp = cts.get("liveness-probe", {})
        c.eq(lp.get("image"), SIDECAR_IMAGES["liveness-probe"], "node liveness-probe: image")
        c.eq(lp.get("args"), ["--csi-address=/csi/csi.sock", "--health-port=9808"], "node liveness-probe: args")
        for n in ("cairnd", "cairn-controller", "cairn-csi"):
            c.eq(cts.get(n, {}).get("image"), image, f"{n}: image")
            c.eq(cts.get(n, {}).get("imagePullPolicy"), "IfNotPresent", f"{n}: imagePullPolicy")
        if nd:
            c.check(not any("/var/lib/kubelet" in yaml.safe_dump(o) for o in objs),
                    "k3s render: /var/lib/kubelet appears nowhere")
            c.eq(pod.get("tolerations"), values.get("tolerations"), "DaemonSet cairn-node: tolerations from values")

    # the CSI controller
    dep = find(objs, "Deployment", "cairn-csi-controller")
    if dep:
        check_pod_spec(dep, c, repo)
        pod = dep["spec"]["template"]["spec"]
        c.eq(dep["spec"].get("replicas"), 1 if nd else 2, "Deployment cairn-csi-controller: replicas")
        c.eq(pod.get("serviceAccountName"), "cairn-csi-controller", "Deployment cairn-csi-controller: serviceAccountName")
        terms = get_path(pod, "affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution") or []
        labels = dep["spec"]["template"]["metadata"]["labels"]
        c.check(any(t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname" and
                    all(labels.get(k) == v for k, v in t["podAffinityTerm"]["labelSelector"]["matchLabels"].items())
                    for t in terms), "Deployment cairn-csi-controller: preferred anti-affinity spreads its pods over nodes")
        if ds:
            c.eq((pod.get("nodeSelector"), pod.get("tolerations")),
                 (ds["spec"]["template"]["spec"].get("nodeSelector"), ds["spec"]["template"]["spec"].get("tolerations")),
                 "Deployment cairn-csi-controller: same nodeSelector and tolerations as the DaemonSet (needs its cairnd)")
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        cts = containers(dep)
        c.eq(list(cts), ["cairn-csi", "csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter",
                         "liveness-probe"], "Deployment cairn-csi-controller: containers")
        csi = cts.get("cairn-csi", {})
        c.eq(csi.get("args"), ["--mode=controller", "--endpoint=unix:///csi/csi.sock", "--node-id=$(NODE_NAME)",
                               "--cairnd-socket=/run/cairn/cairnd.sock", f"--driver-name={DRIVER}", "--log-level=info"],
             "cairn-csi controller: args")
        c.eq(csi.get("image"), image, "cairn-csi controller: image")
        sock = mounts(csi).get("/csi", {})
        c.check("emptyDir" in vols.get(sock.get("name"), {}), "cairn-csi controller: /csi is an emptyDir")
        c.eq(get_path(vols.get(mounts(csi).get("/run/cairn", {}).get("name"), {}), "hostPath.path"), "/run/cairn",
             "cairn-csi controller: the node's cairnd socket dir")
        common = ["--csi-address=/csi/csi.sock", "--leader-election", "--leader-election-namespace=$(POD_NAMESPACE)",
                  "--timeout=300s"]
        extra = {"csi-provisioner": ["--feature-gates=Topology=true", "--extra-create-metadata", "--default-fstype=ext4"],
                 "csi-attacher": [], "csi-resizer": ["--handle-volume-inuse-error=false"],
                 "csi-snapshotter": ["--extra-create-metadata"]}
        for n, ex in extra.items():
            ct = cts.get(n, {})
            c.eq(ct.get("image"), SIDECAR_IMAGES[n], f"{n}: image")
            c.eq(ct.get("args"), common + ex, f"{n}: args")
            c.eq(get_path(vols.get(mounts(ct).get("/csi", {}).get("name"), {}), "emptyDir"), {}, f"{n}: shares /csi")
        lp = cts.get("liveness-probe", {})
        c.eq(lp.get("image"), SIDECAR_IMAGES["liveness-probe"], "controller liveness-probe: image")
        c.check(get_path(csi, "livenessProbe.httpGet.path") == "/healthz", "cairn-csi controller: livenessProbe /healthz")

    # the init Job
    job = find(objs, "Job", "cairn-init")
    if job:
        check_pod_spec(job, c, repo)
        c.eq(job["spec"].get("backoffLimit"), 6, "Job cairn-init: backoffLimit")
        c.check("ttlSecondsAfterFinished" not in job["spec"], "Job cairn-init: no ttlSecondsAfterFinished (apply stays idempotent)")
        ct = job["spec"]["template"]["spec"]["containers"][0]
        c.eq(ct.get("command", []) + ct.get("args", []),
             ["cairn-controller", "init-secret", "--namespace=$(POD_NAMESPACE)", "--name=cairn-cluster-secret"],
             "Job cairn-init: command")
        c.eq(job["spec"]["template"]["spec"].get("serviceAccountName"), "cairn-init", "Job cairn-init: serviceAccountName")
        c.eq(ct.get("image"), image, "Job cairn-init: image")

    # every pod's account exists
    for w in find_all(objs, "DaemonSet") + find_all(objs, "Deployment") + find_all(objs, "Job"):
        sa = w["spec"]["template"]["spec"].get("serviceAccountName")
        c.check(find(objs, "ServiceAccount", sa), f"{ident(w)}: ServiceAccount {sa} is rendered")

    # metrics
    svc = find(objs, "Service", "cairn-metrics")
    if svc and ds:
        c.eq(svc["spec"].get("clusterIP"), "None", "Service cairn-metrics: headless")
        pl = ds["spec"]["template"]["metadata"]["labels"]
        c.check(all(pl.get(k) == v for k, v in svc["spec"]["selector"].items()), "Service cairn-metrics: selects the node pods")
        c.eq({p["name"]: p["port"] for p in svc["spec"]["ports"]}, {"cairnd-metrics": 9420, "controller-metrics": 9502},
             "Service cairn-metrics: ports")
        cport = {p["name"]: p["containerPort"] for ct in containers(ds).values() for p in ct.get("ports", [])}
        for p in svc["spec"]["ports"]:
            c.check(cport.get(p["targetPort"]) == p["port"], f"Service cairn-metrics: {p['name']} targets a node pod port")
    sm = find(objs, "ServiceMonitor")
    if nd:
        if c.check(sm, "metrics.serviceMonitor.enabled: renders a ServiceMonitor") and svc:
            sl = svc["metadata"]["labels"]
            c.check(all(sl.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()),
                    "ServiceMonitor: selects Service cairn-metrics")
            c.eq(sorted(e["port"] for e in sm["spec"]["endpoints"]), sorted(p["name"] for p in svc["spec"]["ports"]),
                 "ServiceMonitor: scrapes both metrics ports")
            c.eq(sm["metadata"]["labels"].get("release"), "prometheus", "ServiceMonitor: extra labels from values")
    else:
        c.check(sm is None, "default: no ServiceMonitor")

    # custom resources from values
    bt = find(objs, "BackupTarget")
    settings = find_all(objs, "Setting")
    if nd:
        btv = values.get("backupTarget", {})
        if c.check(bt, "backupTarget.url set: renders BackupTarget default"):
            c.eq(bt["metadata"]["name"], "default", "BackupTarget: name")
            c.eq(bt.get("apiVersion"), "cairn.io/v1alpha1", "BackupTarget: apiVersion")
            c.eq(bt.get("spec"), {"url": btv["url"], "credentialSecret": btv["credentialSecret"],
                                  "pollInterval": btv["pollInterval"]}, "BackupTarget: spec from values")
        want = {k: str(v) for k, v in (values.get("settings") or {}).items()}
        c.eq({s["metadata"]["name"]: s.get("spec", {}).get("value") for s in settings}, want,
             "Setting resources: one per settings entry, value as a string")
        known = doc_names(os.path.join(repo, "README.md"), "| setting |")
        unknown = sorted(set(want) - known)
        c.check(known and not unknown, "Setting resources: names from README's settings table", f"unknown {unknown}")
        c.check(all(s.get("apiVersion") == "cairn.io/v1alpha1" for s in settings), "Setting resources: apiVersion")
    else:
        c.check(bt is None and not settings, "default: no BackupTarget, no Setting (nothing needs the CRDs at apply time)")

    check_rbac(objs, c, crds)
    if not nd:
        dockerfile_facts(repo, c)
        values_documented(repo, c)


# ---------------------------------------------------------------- examples

# Inline examples for the rejection tests. Each base must be ACCEPTED by the
# CRDs (else the test proves nothing: fix the base to the CRD), and each
# mutation of it REJECTED. Cases whose kind has no CRD are skipped; at least
# one must run.
BASES = {
    "Volume": """
apiVersion: cairn.io/v1alpha1
kind: Volume
metadata:
  name: example
  namespace: cairn-system
spec:
  size: 10Gi
  numberOfReplicas: 3
""",
    "RecurringJob": """
apiVersion: cairn.io/v1alpha1
kind: RecurringJob
metadata:
  name: nightly-backup
  namespace: cairn-system
spec:
  task: backup
  cron: "0 3 * * *"
  retain: 7
  concurrency: 1
""",
    "Setting": """
apiVersion: cairn.io/v1alpha1
kind: Setting
metadata:
  name: auto-salvage
  namespace: cairn-system
spec:
  value: "true"
""",
}
BAD = [
    ("Volume", "spec.numberOfReplicas", 0, "a Volume with numberOfReplicas 0"),
    ("Volume", "spec.numberOfReplicas", "three", "a Volume with numberOfReplicas \"three\""),
    ("Volume", "spec.noSuchField", True, "a Volume with an unknown spec field"),
    ("RecurringJob", "spec.task", "delete", "a RecurringJob with task \"delete\""),
    ("Setting", "spec.value", 5, "a Setting whose value is a number, not a string"),
    ("Setting", "spec", None, "a Setting without spec"),
]


def yaml_blocks(path):
    text = open(path).read()
    for m in re.finditer(r"^```ya?ml[^\n]*\n(.*?)^```", text, re.M | re.S):
        line = text.count("\n", 0, m.start()) + 2
        yield line, m.group(1)


def set_path(obj, path, value):
    parts = path.split(".")
    cur = obj
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    if value is None:
        cur.pop(parts[-1], None)
    else:
        cur[parts[-1]] = value


def cmd_examples(args, c):
    crds = CrdSet(args.crds)
    if not c.check(crds.error is None, "CRDs available for the example checks", crds.error):
        return
    n = 0
    docs_examples = {}
    for doc in args.docs:
        rel = os.path.relpath(doc, args.repo)
        if not c.check(os.path.exists(doc), f"{rel} exists"):
            continue
        for line, block in yaml_blocks(doc):
            try:
                items = [d for d in yaml.safe_load_all(block) if d]
            except yaml.YAMLError as e:
                if "cairn.io/" in block:
                    c.check(False, f"{rel}:{line}: yaml block parses", str(e).splitlines()[0])
                continue
            for obj in items:
                if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
                    continue
                if not str(obj["apiVersion"]).startswith("cairn.io/"):
                    errs = k8s_validate(obj)
                    if errs is not None:
                        c.check(not errs, f"{rel}:{line}: example {ident(obj)} is a valid {obj['apiVersion']} "
                                f"{obj['kind']} (kubernetes-validate --strict)", "; ".join(errs))
                    continue
                n += 1
                errs = validate_cr(crds, obj)
                c.check(not errs, f"{rel}:{line}: example {ident(obj)} is valid against its CRD", "; ".join(errs))
                if not errs:
                    docs_examples.setdefault(obj["kind"], obj)
    print(f"note {n} cairn.io example(s) found in {', '.join(os.path.relpath(d, args.repo) for d in args.docs)}")

    ran = 0
    for kind, path, value, what in BAD:
        if kind not in crds.kinds():
            print(f"note skipped rejection test ({what}): no CRD of kind {kind}")
            continue
        bases = [("inline", yaml.safe_load(BASES[kind]))]
        if kind in docs_examples:
            bases.append(("docs", docs_examples[kind]))
        for origin, base in bases:
            errs = validate_cr(crds, base)
            if not c.check(not errs, f"{origin} {kind} example (base of the rejection test) is accepted",
                           "; ".join(errs) + " (make the inline base in scripts/chart_check.py match the CRD)"):
                continue
            bad = copy.deepcopy(base)
            set_path(bad, path, value)
            errs = validate_cr(crds, bad)
            ran += 1
            c.check(errs, f"REJECTED: {what} ({origin} example, {path}={value!r})",
                    "accepted, the CRD schema must refuse it")
            if errs:
                print(f"     because: {errs[0]}")
    c.check(ran > 0, "at least one rejection test ran", f"no CRD of kinds {sorted(BASES)}")


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render")
    r.add_argument("--repo", required=True)
    r.add_argument("--file", required=True)
    r.add_argument("--values")
    r.add_argument("--profile", choices=["default", "non-default"], required=True)
    r.add_argument("--crds")
    d = sub.add_parser("crds")
    d.add_argument("--repo", required=True)
    d.add_argument("--crds", required=True)
    e = sub.add_parser("examples")
    e.add_argument("--repo", required=True)
    e.add_argument("--crds", required=True)
    e.add_argument("docs", nargs="+")
    args = ap.parse_args()
    c = Checks()
    {"render": check_render, "crds": cmd_crds, "examples": cmd_examples}[args.cmd](args, c)
    return c.done()


if __name__ == "__main__":
    sys.exit(main())
