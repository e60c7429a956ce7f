"""Deployment files: KubeRay manifests, the `ray up` launcher config, the job configs, the image.

KubeRay manifests (cluster/kuberay/) are validated STRICTLY against the CRDs of ../shared/k8s/crds
(KubeRay v1.7; set SPICE_SHARED to the shared/ folder to point elsewhere), the way
`kubectl apply --validate=strict` would: the v1 `openAPIV3Schema` of each kind is copied and every
object schema that declares neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields`
is closed (`additionalProperties: false`), `x-kubernetes-int-or-string` becomes integer-or-string,
`nullable` admits null, and the result is checked with jsonschema (Draft 7) for unknown fields,
types, enums, patterns, required fields, int32/int64 ranges and list-type uniqueness. CEL rules
(`x-kubernetes-validations`) are not evaluated: a manifest that sets a field carrying one fails
unless the rule is the create-time no-op `self == oldSelf`. Operator-side rules of KubeRay
(name lengths, submission-mode constraints, TTL/shutdown, ...) are checked by hand below.

Everything here is parsing and schema checks: no cluster, no cloud, no docker.
"""

from __future__ import annotations

import copy
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
JOBS = REPO / "jobs"
SHARED = Path(os.environ["SPICE_SHARED"]) if os.environ.get("SPICE_SHARED") else REPO.parent / "shared"
CRD_DIR = SHARED / "k8s" / "crds"

IMAGE = "ghcr.io/spice-ray/spice-ray:0.1.0"
RAY_VERSION = "2.60.0"
SHARED_MOUNT = "/mnt/shared"
ENTRYPOINT = "python -m spice_ray run --config jobs/qwen2_7b.yaml"

CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
# Kinds outside ray.io that may appear in cluster/kuberay/; each is checked by hand below.
CORE_KINDS = {
    ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"),
    ("v1", "PersistentVolumeClaim"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("batch/v1", "CronJob"),
}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


# --------------------------------------------------------------------------------------------------
# Manifests: every document of cluster/kuberay/*.yaml, plus RayJobs embedded in ConfigMaps.
# --------------------------------------------------------------------------------------------------


def _embedded_rayjobs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """RayJob manifests held as text in a ConfigMap's data (the CronJob fallback's template)."""
    if doc.get("kind") != "ConfigMap":
        return
    for key, text in (doc.get("data") or {}).items():
        inner = yaml.load(text, Loader=_Loader)
        if isinstance(inner, dict) and inner.get("apiVersion", "").startswith("ray.io/"):
            yield key, inner


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _load_all(path):
            ident = f"{path.name}:{doc.get('kind')}/{_name(doc)}"
            out.append((ident, doc))
            for key, inner in _embedded_rayjobs(doc):
                out.append((f"{ident}:data[{key}]", inner))
    return out


def _name(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return meta.get("name") or (meta.get("generateName", "") + "*")


MANIFESTS = _manifests()
RAY_MANIFESTS = [(i, d) for i, d in MANIFESTS if str(d.get("apiVersion", "")).startswith("ray.io/")]


def _one(kind: str, file: str | None = None) -> dict[str, Any]:
    found = [d for i, d in MANIFESTS if d.get("kind") == kind and (file is None or i.startswith(file + ":"))]
    assert len(found) == 1, f"expected one {kind} in {file or 'cluster/kuberay'}, found {len(found)}"
    return found[0]


def _rayjob_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayJob spec: RayJob manifests (top level and embedded) and RayCronJob templates."""
    specs = [(i, d["spec"]) for i, d in RAY_MANIFESTS if d["kind"] == "RayJob"]
    specs += [(i + ":jobTemplate", d["spec"]["jobTemplate"]) for i, d in RAY_MANIFESTS if d["kind"] == "RayCronJob"]
    return specs


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [(i, d["spec"]) for i, d in RAY_MANIFESTS if d["kind"] == "RayCluster"]
    specs += [(i, s["rayClusterSpec"]) for i, s in _rayjob_specs()]
    return specs


def _pod_specs(cluster_spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    pods = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster_spec.get("workerGroupSpecs", [])]
    return pods


# --------------------------------------------------------------------------------------------------
# Strict CRD validation.
# --------------------------------------------------------------------------------------------------

# The API server validates a custom resource's ObjectMeta itself (the CRD schema says only
# `type: object`); these are the fields a manifest may set in it.
OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": False,
}


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a structural OpenAPI v3 schema in which every object is closed.

    An object schema is left open only where it says so: `x-kubernetes-preserve-unknown-fields:
    true`, or an `additionalProperties` of its own (kept as declared, and itself made strict).
    """
    s = dict(schema)
    if s.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if s.get("nullable"):
        if "type" in s:
            s["type"] = [s["type"], "null"] if isinstance(s["type"], str) else [*s["type"], "null"]
        if "enum" in s:
            s["enum"] = [*s["enum"], None]
    if "properties" in s:
        s["properties"] = {k: strict_schema(v) for k, v in s["properties"].items()}
    if isinstance(s.get("items"), dict):
        s["items"] = strict_schema(s["items"])
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict_schema(s["additionalProperties"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in s:
            s[key] = [strict_schema(x) for x in s[key]]
    if isinstance(s.get("not"), dict):
        s["not"] = strict_schema(s["not"])
    is_object = s.get("type") == "object" or "properties" in s
    if is_object and not s.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in s:
        s["additionalProperties"] = False
    return s


def _list_type(validator, list_type, instance, schema):
    """`x-kubernetes-list-type`: set items are unique; map items are unique by their map keys."""
    if not isinstance(instance, list):
        return
    if list_type == "set":
        seen = [repr(x) for x in instance]
        if len(seen) != len(set(seen)):
            yield jsonschema.ValidationError(f"duplicate items in a list-type=set list: {instance!r}")
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = [tuple(item.get(k) for k in keys) for item in instance if isinstance(item, dict)]
        dupes = {k for k in seen if seen.count(k) > 1}
        if dupes:
            yield jsonschema.ValidationError(f"duplicate map keys {keys}={sorted(dupes)} in a list-type=map list")


def _cel_rules(validator, rules, instance, schema):
    """CEL rules are not evaluated here: a manifest may only set fields whose rules are no-ops on create."""
    for rule in rules:
        if rule.get("rule", "").replace(" ", "") != "self==oldSelf":
            yield jsonschema.ValidationError(
                f"field carries a CEL rule this test does not evaluate: {rule.get('rule')!r} "
                f"({rule.get('message', '')})"
            )


StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules},
)

FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


def crd_dir() -> Path:
    if not all((CRD_DIR / f).is_file() for f in CRD_FILES.values()):
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (set SPICE_SHARED to the shared/ folder)")
    return CRD_DIR


@lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    crd = yaml.load((crd_dir() / CRD_FILES[kind]).read_text(), Loader=_Loader)
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"], f"{kind} v1 is not served"
    schema = copy.deepcopy(v1["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    del schema["properties"]["status"]  # written by the operator through the status subresource only
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/v1"}
    schema["properties"]["kind"] = {"const": kind}
    strict = strict_schema(schema)
    StrictValidator.check_schema(strict)
    return StrictValidator(strict, format_checker=FORMATS)


def crd_error_list(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(dotted path, message) of every strict-validation error of a ray.io manifest."""
    validator = crd_validator(doc["kind"])
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    return [(".".join(str(p) for p in e.absolute_path), e.message) for e in errors]


def crd_errors(doc: dict[str, Any]) -> list[str]:
    return [f"{path or '<root>'}: {message}" for path, message in crd_error_list(doc)]


@pytest.mark.parametrize("ident,doc", RAY_MANIFESTS, ids=[i for i, _ in RAY_MANIFESTS])
def test_ray_manifest_is_valid_for_its_crd(ident, doc):
    assert doc["apiVersion"] == "ray.io/v1", ident
    assert doc["kind"] in CRD_FILES, f"{ident}: no CRD for kind {doc['kind']}"
    errors = crd_errors(doc)
    assert not errors, f"{ident} does not validate strictly against its CRD:\n" + "\n".join(errors)


def test_every_kind_has_a_check():
    kinds = {(d.get("apiVersion"), d.get("kind")) for _, d in MANIFESTS}
    unknown = {k for k in kinds if k[0] != "ray.io/v1" and k not in CORE_KINDS}
    assert not unknown, f"manifests of kinds this test does not check: {unknown}"
    assert {k for _, k in kinds} >= {"RayCluster", "RayJob", "RayCronJob", "CronJob"}
    assert (KUBERAY / "raycluster.yaml").is_file() and (KUBERAY / "rayjob.yaml").is_file()
    assert (KUBERAY / "raycronjob.yaml").is_file() and (KUBERAY / "cronjob-fallback.yaml").is_file()


def _raycluster() -> dict[str, Any]:
    return copy.deepcopy(_one("RayCluster", "raycluster.yaml"))


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node = doc
    *parents, last = path.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


_DELETE = object()
HEAD_C = "spec.headGroupSpec.template.spec.containers.0"
WORKER_C = "spec.workerGroupSpecs.0.template.spec.containers.0"
BROKEN = {
    "unknown field in headGroupSpec": ("spec.headGroupSpec.bogus", 1),
    "unknown top-level spec field": ("spec.bogus", True),
    "unknown field deep in the pod template": (f"{HEAD_C}.volumeMount", []),
    "unknown field in a volume source": ("spec.headGroupSpec.template.spec.volumes.0.persistentVolumeClaim.size", "1Ti"),
    "unknown metadata field": ("metadata.nmae", "x"),
    "wrong type (int32 field)": ("spec.workerGroupSpecs.0.minReplicas", "one"),
    "int32 out of range": ("spec.workerGroupSpecs.0.maxReplicas", 2**40),
    "rayStartParams values are strings": ("spec.headGroupSpec.rayStartParams.num-cpus", 0),
    "enum violation": ("spec.autoscalerOptions.upscalingMode", "Fast"),
    "int-or-string given a list": (f"{WORKER_C}.resources.limits.cpu", [80]),
    "quantity pattern": (f"{WORKER_C}.resources.limits.memory", "600 gigs"),
    "missing required template": ("spec.headGroupSpec.template", _DELETE),
    "missing required container name": (f"{HEAD_C}.name", _DELETE),
    "missing required groupName": ("spec.workerGroupSpecs.0.groupName", _DELETE),
    "duplicate list-map key": ("spec.headGroupSpec.template.spec.containers.1", {"name": "ray-head", "image": "x"}),
    "wrong apiVersion": ("apiVersion", "ray.io/v1alpha1"),
    "status set": ("status", {"state": "ready"}),
    "field with a CEL rule": ("spec.managedBy", "ray.io/kuberay-operator"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_strict_validation_rejects_broken_raycluster(case):
    crd_dir()
    path, value = BROKEN[case]
    doc = _raycluster()
    if case.startswith("duplicate"):
        doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"].append({})
    _set(doc, path, value)
    errors = crd_error_list(doc)
    assert errors, f"{case}: the broken manifest still validates"
    # ... and it fails where it was broken (at the field, or at the object missing/holding it).
    assert any(f"{path}.".startswith(f"{where}.") or not where for where, _ in errors), errors


def test_strict_validation_rejects_broken_rayjob_and_raycronjob():
    crd_dir()
    job = copy.deepcopy(_one("RayJob", "rayjob.yaml"))
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["bogus"] = 1
    assert any("bogus" in e for e in crd_errors(job))
    job = copy.deepcopy(_one("RayJob", "rayjob.yaml"))
    job["spec"]["preRunningDeadlineSeconds"] = 0  # minimum: 1
    assert crd_errors(job)
    cron = copy.deepcopy(_one("RayCronJob"))
    cron["spec"]["jobTemplate"]["entrypointt"] = "x"
    assert any("entrypointt" in e for e in crd_errors(cron))
    cron = copy.deepcopy(_one("RayCronJob"))
    del cron["spec"]["schedule"]
    assert crd_errors(cron)


def test_strict_schema_respects_open_objects_int_or_string_and_nullable():
    schema = strict_schema(
        {
            "type": "object",
            "properties": {
                "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "map": {"type": "object", "additionalProperties": {"type": "object", "properties": {"a": {"type": "string"}}}},
                "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
                "port": {"x-kubernetes-int-or-string": True},
                "maybe": {"type": "string", "nullable": True},
            },
        }
    )
    v = StrictValidator(schema, format_checker=FORMATS)
    assert not list(v.iter_errors({"open": {"anything": {"goes": 1}}, "port": 8265, "maybe": None}))
    assert not list(v.iter_errors({"map": {"k": {"a": "x"}}, "port": "dashboard"}))
    assert list(v.iter_errors({"map": {"k": {"b": "x"}}}))  # additionalProperties' own schema is closed
    assert list(v.iter_errors({"closed": {"b": 1}}))
    assert list(v.iter_errors({"port": 1.5}))
    assert list(v.iter_errors({"port": [1]}))
    assert list(v.iter_errors({"extra": 1}))


# --------------------------------------------------------------------------------------------------
# KubeRay operator rules (ray-operator/controllers/ray/utils/validation.go) and this project's choices.
# --------------------------------------------------------------------------------------------------

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 47 - 6}  # RayCronJob adds "-xxxxx"
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


@pytest.mark.parametrize("ident,doc", RAY_MANIFESTS, ids=[i for i, _ in RAY_MANIFESTS])
def test_ray_resource_names(ident, doc):
    meta = doc["metadata"]
    name = meta.get("name") or meta["generateName"] + "abcde"
    assert DNS1035.match(name), f"{ident}: {name!r} is not a DNS-1035 label"
    assert len(name) <= MAX_NAME[doc["kind"]], f"{ident}: name longer than {MAX_NAME[doc['kind']]}"


@pytest.mark.parametrize("ident,spec", _rayjob_specs(), ids=[i for i, _ in _rayjob_specs()])
def test_rayjob_spec_rules(ident, spec):
    mode = spec.get("submissionMode", "K8sJobMode")
    assert mode in {"HTTPMode", "SidecarMode"}, f"{ident}: submissionMode {mode!r}"
    assert mode in SUBMISSION_MODES
    if mode == "SidecarMode":
        assert "submitterPodTemplate" not in spec and "submitterConfig" not in spec, ident
        head_policy = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].get("restartPolicy", "")
        assert head_policy in {"", "Never"}, f"{ident}: SidecarMode needs head restartPolicy Never or unset"
    assert spec["entrypoint"] == ENTRYPOINT
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 60
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["preRunningDeadlineSeconds"] >= 1
    assert spec["backoffLimit"] >= 0
    assert "rayClusterSpec" in spec and not spec.get("clusterSelector"), f"{ident}: needs its own cluster"
    assert "deletionStrategy" not in spec  # needs the RayJobDeletionPolicy gate; TTL + shutdown suffice
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
    assert isinstance(runtime_env, dict), f"{ident}: runtimeEnvYAML must be a YAML mapping"
    assert not _pins_ray(runtime_env), f"{ident}: runtimeEnvYAML installs ray"
    config = spec["entrypoint"].split("--config", 1)[1].split()[0]
    assert (REPO / config).is_file(), f"{ident}: entrypoint config {config} does not exist"


def test_raycronjob_schedule_and_feature_gate_comment():
    cron = _one("RayCronJob")
    fields = cron["spec"]["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(r"[0-9*/,\-A-Za-z]+", f) for f in fields), cron["spec"]["schedule"]
    assert "RayCronJob" in (KUBERAY / "raycronjob.yaml").read_text().split("apiVersion:")[0]  # gate named
    # No concurrencyPolicy in RayCronJob: one run (plus its pending time) must fit in the period.
    job = cron["spec"]["jobTemplate"]
    weekly = fields[2:] == ["*", "*", fields[4]] and fields[4] != "*"
    assert weekly, "the deadline check below assumes a weekly schedule"
    assert (job["activeDeadlineSeconds"] + job["preRunningDeadlineSeconds"]) * (1 + job["backoffLimit"]) < 7 * 86400


@pytest.mark.parametrize("ident,spec", _cluster_specs(), ids=[i for i, _ in _cluster_specs()])
def test_ray_cluster_spec_rules(ident, spec):
    assert spec.get("rayVersion") == RAY_VERSION, ident
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", f"{ident}: head must not schedule work"
    groups = [head, *spec.get("workerGroupSpecs", [])]
    for group in groups:
        params = group.get("rayStartParams", {})
        assert "labels" not in params
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            assert not group.get("resources"), f"{ident}: resources in both rayStartParams and resources"
        assert group["template"]["spec"]["containers"], ident
    gpu_groups = [g for g in spec["workerGroupSpecs"] if _gpus(g) > 0]
    assert gpu_groups, f"{ident}: no GPU worker group"
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], ident
    for name, pod in _pod_specs(spec):
        ray_container = pod["containers"][0]
        assert ray_container["image"] == IMAGE, f"{ident}/{name}: image {ray_container['image']}"
        mounts = {m["name"]: m["mountPath"] for m in ray_container.get("volumeMounts", [])}
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        shared = [v for v, path in mounts.items() if path == SHARED_MOUNT]
        assert shared and shared[0] in claims, f"{ident}/{name}: no shared PVC at {SHARED_MOUNT}"
        assert claims[shared[0]] == _one("PersistentVolumeClaim")["metadata"]["name"]


def _gpus(group: dict[str, Any]) -> int:
    total = 0
    for c in group["template"]["spec"]["containers"]:
        limits = c.get("resources", {}).get("limits", {})
        total += int(limits.get("nvidia.com/gpu", 0))
    return total


def test_shared_pvc_is_read_write_many():
    pvc = _one("PersistentVolumeClaim")
    assert pvc["apiVersion"] == "v1" and pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"]


# --------------------------------------------------------------------------------------------------
# The CronJob fallback (core kinds: essentials by hand).
# --------------------------------------------------------------------------------------------------


def test_cronjob_fallback_essentials():
    docs = _load_all(KUBERAY / "cronjob-fallback.yaml")
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    for d in docs:
        assert (d["apiVersion"], d["kind"]) in CORE_KINDS, d["kind"]
        assert DNS1035.match(d["metadata"]["name"]) or re.fullmatch(r"[a-z0-9][-a-z0-9.]*", d["metadata"]["name"])
    namespaces = {d["metadata"].get("namespace") for d in docs}
    assert len(namespaces) == 1, f"fallback objects span namespaces {namespaces}"

    sa, role, binding = by_kind["ServiceAccount"], by_kind["Role"], by_kind["RoleBinding"]
    granted = {
        verb
        for rule in role["rules"]
        if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted >= {"create", "get", "list", "watch", "delete"}, granted
    for rule in role["rules"]:  # least privilege: nothing but rayjobs in ray.io
        assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"], rule
        assert "*" not in rule["verbs"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]} in binding[
        "subjects"
    ]

    cron = by_kind["CronJob"]
    assert len(cron["metadata"]["name"]) <= 52
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    (container,) = pod["containers"]
    script = " ".join(container.get("command", []) + container.get("args", []))
    assert "kubectl create -f" in script

    # The RayJob the script creates: the ConfigMap key it reads, mounted where the script looks.
    configmap = by_kind["ConfigMap"]
    volume = next(v for v in pod["volumes"] if v.get("configMap", {}).get("name") == configmap["metadata"]["name"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    ((key, inner),) = list(_embedded_rayjobs(configmap))
    assert f"{mount['mountPath']}/{key}" in script
    assert inner["kind"] == "RayJob" and inner["metadata"].get("generateName"), "each run needs a fresh name"
    # The Job outlives the RayJob it waits for only by a margin (so Forbid blocks overlapping runs).
    spec = inner["spec"]
    per_attempt = spec["activeDeadlineSeconds"] + spec["preRunningDeadlineSeconds"]
    assert per_attempt * (1 + spec["backoffLimit"]) <= job["activeDeadlineSeconds"] < 7 * 86400


# --------------------------------------------------------------------------------------------------
# No credentials in any deployment file.
# --------------------------------------------------------------------------------------------------

SENSITIVE_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|CREDENTIAL", re.I)
SECRET_LITERALS = re.compile(
    r"hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9]{20,}|-----BEGIN [A-Z ]*PRIVATE KEY"
)


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_no_secrets_in_manifests():
    for ident, doc in MANIFESTS:
        assert doc.get("kind") != "Secret", f"{ident}: Secrets are created out of band, never committed"
        for node in _walk(doc):
            for env in node.get("env", []) if isinstance(node.get("env"), list) else []:
                if SENSITIVE_ENV.search(env.get("name", "")):
                    assert "value" not in env and "valueFrom" in env, f"{ident}: {env['name']} must come from a Secret"
            for src in node.get("envFrom", []) if isinstance(node.get("envFrom"), list) else []:
                assert set(src) <= {"secretRef", "configMapRef", "prefix"}, src
    for path in [*CLUSTER.rglob("*"), JOBS / "runtime_env.yaml"]:
        if path.is_file():
            assert not SECRET_LITERALS.search(path.read_text()), f"{path}: looks like a credential"


# --------------------------------------------------------------------------------------------------
# `ray up` launcher config against the Ray wheel's schema.
# --------------------------------------------------------------------------------------------------


def _ray_cluster_config() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


def test_ray_cluster_yaml_validates_against_ray_schema():
    util = pytest.importorskip("ray.autoscaler._private.util")
    cfg = _ray_cluster_config()
    util.validate_config(copy.deepcopy(cfg))  # the file as written, against ray/autoscaler/ray-schema.json
    # What `ray up` validates before it contacts the cloud: the config merged with the provider's
    # defaults.yaml (prepare_config reads only local files).
    util.validate_config(util.prepare_config(copy.deepcopy(cfg)))

    assert cfg["provider"]["type"] == "aws"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert any("ray start --head" in c and "--num-cpus=0" in c for c in cfg["head_start_ray_commands"])
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert any(v["resources"].get("GPU", 0) > 0 and v["max_workers"] >= v["min_workers"] for v in workers.values())
    assert cfg["docker"]["image"] == IMAGE


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(bogus=1),
        lambda c: c["available_node_types"][c["head_node_type"]].update(bogus=1),
        lambda c: c["docker"].update(imagee="x"),
        lambda c: c["available_node_types"][c["head_node_type"]]["resources"].update(CPU=-1),
        lambda c: c.pop("provider"),
    ],
    ids=["unknown-top-level", "unknown-node-type-key", "unknown-docker-key", "negative-cpu", "no-provider"],
)
def test_ray_cluster_yaml_schema_rejects_broken_copies(mutate):
    util = pytest.importorskip("ray.autoscaler._private.util")
    cfg = _ray_cluster_config()
    mutate(cfg)
    with pytest.raises(jsonschema.ValidationError):
        util.validate_config(cfg)


# --------------------------------------------------------------------------------------------------
# Job configs, runtime env, image.
# --------------------------------------------------------------------------------------------------

JOB_MODELS = {
    "qwen2_7b": ("Qwen/Qwen2-7B", "Qwen/Qwen2-0.5B"),
    "llama2_7b": ("meta-llama/Llama-2-7b-hf", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"),
}


@pytest.mark.parametrize("name", sorted(JOB_MODELS))
def test_job_config_loads(name):
    from spice_ray.config import load_config
    from spice_ray.sketch.projection import factor_dim

    cfg = load_config(JOBS / f"{name}.yaml")
    target, proxy = JOB_MODELS[name]
    assert (cfg.model.target, cfg.model.proxy) == (target, proxy)
    assert (cfg.model.lora_r, cfg.model.lora_alpha) == (16, 32)
    d_out, d_in = factor_dim(cfg.sketch.dim)
    assert d_out * d_in == cfg.sketch.dim and d_out > 1, cfg.sketch.dim
    assert (cfg.select.method, cfg.select.fraction, cfg.select.lam) == ("spice", 0.1, 0.1)
    t = cfg.train
    assert (t.lr, t.epochs, t.num_workers, t.use_gpu, t.lora) == (5e-5, 3, 8, True, True)
    assert cfg.run.root == f"{SHARED_MOUNT}/spice-runs/{name}"
    assert cfg.corpus.paths and all(p.startswith(f"{SHARED_MOUNT}/corpus/") for p in cfg.corpus.paths)


def _pins_ray(runtime_env: dict[str, Any]) -> bool:
    for key in ("pip", "uv", "conda"):
        spec = runtime_env.get(key)
        if isinstance(spec, dict):
            spec = spec.get("packages", spec.get("dependencies", []))
        if isinstance(spec, str):
            spec = [spec]
        for pkg in spec or []:
            if isinstance(pkg, str) and re.match(r"^\s*ray(\[[^\]]*\])?\s*($|[=<>!~@;])", pkg):
                return True
            if isinstance(pkg, dict) and _pins_ray({"pip": pkg.get("pip")}):
                return True
    return False


def test_runtime_env_is_code_only():
    env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert not _pins_ray(env), "runtime_env.yaml must not install ray"
    assert "pip" not in env and "uv" not in env and "conda" not in env, "dependencies live in the image"
    assert {"runs/", ".venv/", ".git/", "tests/"} <= set(env["excludes"])
    assert env["env_vars"] == {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    assert _pins_ray({"pip": ["ray[default]==2.60.0"]}) and _pins_ray({"pip": {"packages": ["ray"]}})
    assert not _pins_ray({"pip": ["rayon-tools", "torch"]})


def test_dockerfile_builds_the_referenced_image():
    text = (CLUSTER / "Dockerfile").read_text()
    steps = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert any(s.startswith("FROM ") and ("gpu" in s or "cuda" in s) for s in steps), "needs a CUDA base"
    assert any(re.search(r"pip install .*torch==", s) for s in steps), "torch must be pinned"
    assert any(re.search(r"pip install .*\s\.(\s|$)", s) for s in steps), "installs the package"
    assert any(s.startswith("COPY") and "jobs/" in s for s in steps), "ships jobs/"
    assert IMAGE in text, "the Dockerfile names the tag the manifests use"
    readme = (CLUSTER / "README.md").read_text()
    for name in ["ray-cluster.yaml", "raycluster.yaml", "rayjob.yaml", "raycronjob.yaml", "cronjob-fallback.yaml", "Dockerfile"]:
        assert name in readme, f"cluster/README.md does not mention {name}"


def test_scheduled_rayjobs_match_rayjob_yaml():
    """raycronjob.yaml's jobTemplate and the fallback's embedded RayJob are copies of rayjob.yaml's spec."""
    spec = _one("RayJob", "rayjob.yaml")["spec"]
    assert _one("RayCronJob")["spec"]["jobTemplate"] == spec
    embedded = [d for i, d in RAY_MANIFESTS if d["kind"] == "RayJob" and ":data[" in i]
    assert len(embedded) == 1 and embedded[0]["spec"] == spec
