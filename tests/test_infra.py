"""Offline checks of infra/: nothing here starts Ray, moto or talks to a cluster.

* KubeRay objects (RayCluster / RayJob / RayCronJob, also a RayJob embedded in a ConfigMap) are validated
  against the KubeRay v1.7.0 CRDs in ../shared/schemas/kuberay-v1.7.0, made as strict as the API server's
  structural schema: an unknown field is an error, `x-kubernetes-int-or-string` takes an int or a string.
* Core kinds (CronJob, ServiceAccount, Role, RoleBinding, ConfigMap) get a required-fields check.
* Every jobs/*.py, jobs/*.yaml and pipelines/*.yaml that infra/ names must exist in the repo.
* GPU worker groups limit nvidia.com/gpu; no literal AWS secrets; the AWS launcher config uses spot GPUs.
* The image: every manifest runs the same latte-ray image, whose tag and rayVersion follow pyproject.toml's
  version and Ray pin, and nothing installs packages at run time; the Dockerfile and .dockerignore build it from
  the wheel with that Ray version and the pinned torch (Docker itself cannot run here: static checks only).
* The shell scripts pass `bash -n`; start-head.sh is run against a fake `ray` to check its flags.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
AWS_CLUSTER = INFRA / "aws" / "cluster.yaml"
LOCAL = INFRA / "local"
# CI runs the tests in a fresh clone with shared/ as a sibling of the repo root (LATTE_RAY_SHARED elsewhere).
SCHEMAS = Path(os.environ.get("LATTE_RAY_SHARED") or Path(__file__).resolve().parents[2] / "shared") / "schemas"
CRD_DIR = SCHEMAS / "kuberay-v1.7.0"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
CORE_KINDS = {
    "CronJob": "batch/v1",
    "ServiceAccount": "v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "ConfigMap": "v1",
}
DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
GPU = "nvidia.com/gpu"

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------------------------- loading


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBERAY.glob("*") if p.suffix in (".yaml", ".yml"))


@functools.lru_cache(maxsize=None)
def load_docs(path: Path) -> tuple:
    """All non-empty documents of a (multi-document) YAML file."""
    with open(path, encoding="utf-8") as f:
        return tuple(d for d in yaml.load_all(f, Loader=Loader) if d is not None)


def _safe_docs(path: Path) -> tuple:
    try:
        return load_docs(path)
    except yaml.YAMLError:
        return ()  # test_manifest_parses reports it


def all_objects() -> list[tuple[str, dict, bool]]:
    """(label, object, embedded) for every manifest document, plus YAML objects inside ConfigMap data."""
    out = []
    for path in manifest_files():
        for i, doc in enumerate(_safe_docs(path)):
            if not isinstance(doc, dict):
                continue
            label = f"{path.name}#{i}:{doc.get('kind')}/{_name(doc)}"
            out.append((label, doc, False))
            if doc.get("kind") == "ConfigMap":
                for key, value in (doc.get("data") or {}).items():
                    if not key.endswith((".yaml", ".yml")) or not isinstance(value, str):
                        continue
                    try:
                        inner = [d for d in yaml.load_all(value, Loader=Loader) if d is not None]
                    except yaml.YAMLError:
                        inner = []  # test_configmap_yaml_parses reports it
                    for j, sub in enumerate(inner):
                        if isinstance(sub, dict):
                            out.append((f"{label}[{key}]#{j}:{sub.get('kind')}/{_name(sub)}", sub, True))
    return out


def _name(doc: dict) -> str:
    meta = doc.get("metadata") or {}
    return str(meta.get("name") or meta.get("generateName") or "?")


def objects_of(*kinds: str) -> list[tuple[str, dict, bool]]:
    return [o for o in all_objects() if o[1].get("kind") in kinds]


def _params(objs):
    return [pytest.param(doc, embedded, id=label) for label, doc, embedded in objs]


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: a RayCluster's spec, a RayJob's rayClusterSpec, a RayCronJob's template's."""
    out = []
    for label, doc, _ in all_objects():
        spec = doc.get("spec") or {}
        kind = doc.get("kind")
        if kind == "RayCluster":
            out.append((label, spec))
        elif kind == "RayJob" and "rayClusterSpec" in spec:
            out.append((label, spec["rayClusterSpec"]))
        elif kind == "RayCronJob" and "rayClusterSpec" in (spec.get("jobTemplate") or {}):
            out.append((label, spec["jobTemplate"]["rayClusterSpec"]))
    return out


def rayjob_specs() -> list[tuple[str, dict]]:
    out = []
    for label, doc, _ in all_objects():
        if doc.get("kind") == "RayJob":
            out.append((label, doc.get("spec") or {}))
        elif doc.get("kind") == "RayCronJob":
            out.append((label + ".jobTemplate", (doc.get("spec") or {}).get("jobTemplate") or {}))
    return out


# ------------------------------------------------------------------------- CRD -> strict JSON Schema

# ObjectMeta is not spelled out in the CRDs (`metadata: {type: object}`); the API server checks it itself.
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": DNS_NAME.pattern, "maxLength": 253},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "pattern": DNS_NAME.pattern},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
}


def structural_to_jsonschema(node):
    """An OpenAPI v3 structural schema as a JSON Schema with the API server's strictness.

    `x-kubernetes-*` keys are dropped; `x-kubernetes-int-or-string` becomes "integer or string";
    `nullable` adds "null"; an object with `properties` and neither `additionalProperties` nor
    `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`, so an unknown field is an
    error (the operator's CRD would prune or, with strict field validation, reject it).
    """
    if isinstance(node, list):
        return [structural_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "description"):
            continue
        if key == "properties":
            out[key] = {name: structural_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = structural_to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [structural_to_jsonschema(sub) for sub in value]
        else:
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if not node.get("x-kubernetes-preserve-unknown-fields") and "properties" in node:
        out.setdefault("additionalProperties", False)
    return out


def _schemas_dir() -> Path:
    if not CRD_DIR.is_dir():
        pytest.fail(f"KubeRay CRD schemas not found at {CRD_DIR} (shared/ must sit beside the repo root)")
    return CRD_DIR


@functools.lru_cache(maxsize=None)
def load_crd(kind: str) -> dict:
    path = _schemas_dir() / CRD_FILES[kind]
    with open(path, encoding="utf-8") as f:
        crd = yaml.load(f, Loader=Loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind, path
    return crd


@functools.lru_cache(maxsize=None)
def crd_validator(api_version: str, kind: str):
    """The validator of the CRD served version that `apiVersion` names."""
    crd = load_crd(kind)
    group, _, version = api_version.rpartition("/")
    assert group == crd["spec"]["group"], f"{kind}: apiVersion group {group!r} != CRD group {crd['spec']['group']!r}"
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in versions, f"{kind}: version {version!r} not in the CRD ({sorted(versions)})"
    v = versions[version]
    assert v.get("served"), f"{kind} {version} is not served"
    schema = structural_to_jsonschema(v["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema), bool(v.get("deprecated"))


def crd_errors(doc: dict) -> list[str]:
    validator, _ = crd_validator(doc["apiVersion"], doc["kind"])
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors]


# ----------------------------------------------------------------------------------------- manifests


def test_manifests_present():
    names = {p.name for p in manifest_files()}
    assert {
        "raycluster.yaml",
        "rayjob-generate.yaml",
        "raycronjob-backfill.yaml",
        "cronjob-backfill.yaml",
    } <= names


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_parses(path):
    docs = load_docs(path)
    assert docs, f"{_rel(path)} holds no YAML documents"
    for i, doc in enumerate(docs):
        assert isinstance(doc, dict), f"{_rel(path)}#{i} is not a mapping"
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], f"{_rel(path)}#{i}: apiVersion"
        kind = doc.get("kind")
        assert kind in CRD_FILES or kind in CORE_KINDS, f"{_rel(path)}#{i}: unexpected kind {kind!r}"
        name = (doc.get("metadata") or {}).get("name")
        assert isinstance(name, str) and DNS_NAME.match(name), f"{_rel(path)}#{i}: metadata.name {name!r}"


@pytest.mark.parametrize("doc,embedded", _params(objects_of(*CRD_FILES)))
def test_kuberay_object_matches_crd(doc, embedded):
    errors = crd_errors(doc)
    assert not errors, "does not validate against the KubeRay v1.7.0 CRD:\n  " + "\n  ".join(errors[:20])
    _, deprecated = crd_validator(doc["apiVersion"], doc["kind"])
    assert not deprecated, f"{doc['apiVersion']} {doc['kind']} is a deprecated version; use ray.io/v1"
    meta = doc["metadata"]
    if embedded:  # created with `kubectl create`, so generateName is fine
        assert meta.get("name") or meta.get("generateName"), "needs metadata.name or generateName"
    else:
        assert meta.get("name"), "needs metadata.name"


def test_configmap_embeds_a_rayjob():
    """The CronJob's RayJob lives in a ConfigMap; it must be among the CRD-validated objects."""
    embedded = [label for label, doc, emb in all_objects() if emb and doc.get("kind") == "RayJob"]
    assert embedded, "no RayJob found inside a ConfigMap"


def test_configmap_yaml_parses():
    for _, doc, _ in objects_of("ConfigMap"):
        for key, value in (doc.get("data") or {}).items():
            if key.endswith((".yaml", ".yml")):
                list(yaml.load_all(value, Loader=Loader))


# ----------------------------------------------------------------------- CRD validation really bites


def _raycluster() -> dict:
    return copy.deepcopy(load_docs(KUBERAY / "raycluster.yaml")[0])


def _assert_rejected(doc: dict, fragment: str):
    validator, _ = crd_validator(doc["apiVersion"], doc["kind"])
    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate(doc, validator.schema, cls=type(validator))
    assert fragment in str(info.value), str(info.value)[:500]


def test_validation_accepts_the_raycluster():
    assert crd_errors(_raycluster()) == []


def test_validation_rejects_unknown_spec_field():
    doc = _raycluster()
    doc["spec"]["workerGroupSpec"] = []  # typo of workerGroupSpecs
    _assert_rejected(doc, "workerGroupSpec")


def test_validation_rejects_unknown_nested_field():
    doc = _raycluster()
    doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["gpus"] = 1
    _assert_rejected(doc, "gpus")


def test_validation_rejects_wrong_types():
    doc = _raycluster()
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "16"
    _assert_rejected(doc, "'16' is not of type 'integer'")
    doc = _raycluster()
    doc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be the string "0"
    _assert_rejected(doc, "0 is not of type 'string'")
    doc = _raycluster()
    doc["spec"]["enableInTreeAutoscaling"] = "true"
    _assert_rejected(doc, "is not of type 'boolean'")


def test_validation_rejects_missing_required_field():
    doc = _raycluster()
    del doc["spec"]["workerGroupSpecs"][0]["groupName"]
    _assert_rejected(doc, "'groupName' is a required property")
    doc = _raycluster()
    del doc["spec"]["headGroupSpec"]
    _assert_rejected(doc, "'headGroupSpec' is a required property")


def test_validation_int_or_string_quantities():
    doc = _raycluster()
    limits = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    for ok in (1, "1", "500m", "48Gi"):
        limits[GPU] = ok
        assert crd_errors(doc) == [], ok
    for bad in (1.5, True, ["1"]):
        limits[GPU] = bad
        _assert_rejected(doc, "resources")


def test_validation_rejects_bad_metadata():
    doc = _raycluster()
    doc["metadata"]["lables"] = {"a": "b"}
    _assert_rejected(doc, "lables")
    doc = _raycluster()
    doc["metadata"]["labels"]["count"] = 3
    _assert_rejected(doc, "3 is not of type 'string'")


def test_validation_rejects_unknown_rayjob_and_raycronjob_fields():
    job = copy.deepcopy(load_docs(KUBERAY / "rayjob-generate.yaml")[0])
    job["spec"]["shutdownAfterJobFinish"] = True
    _assert_rejected(job, "shutdownAfterJobFinish")
    cron = copy.deepcopy(load_docs(KUBERAY / "raycronjob-backfill.yaml")[0])
    cron["spec"]["concurrencyPolicy"] = "Forbid"  # not a RayCronJob field in v1.7.0
    _assert_rejected(cron, "concurrencyPolicy")


# --------------------------------------------------------------------------------------- core kinds


def _get(doc, dotted: str):
    cur = doc
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def core_problems(doc: dict) -> list[str]:
    kind = doc.get("kind")
    problems = []
    if doc.get("apiVersion") != CORE_KINDS[kind]:
        problems.append(f"apiVersion {doc.get('apiVersion')!r}, expected {CORE_KINDS[kind]!r}")
    name = _get(doc, "metadata.name")
    if not (isinstance(name, str) and DNS_NAME.match(name)):
        problems.append(f"metadata.name {name!r}")
    if kind == "CronJob":
        schedule = _get(doc, "spec.schedule")
        if not (isinstance(schedule, str) and (len(schedule.split()) == 5 or schedule.startswith("@"))):
            problems.append(f"spec.schedule {schedule!r}")
        if _get(doc, "spec.concurrencyPolicy") not in (None, "Allow", "Forbid", "Replace"):
            problems.append("spec.concurrencyPolicy")
        pod = _get(doc, "spec.jobTemplate.spec.template.spec")
        if not isinstance(pod, dict):
            problems.append("spec.jobTemplate.spec.template.spec missing")
        else:
            containers = pod.get("containers")
            if not containers or not all(isinstance(c, dict) and c.get("name") and c.get("image") for c in containers):
                problems.append("pod containers need name and image")
            if pod.get("restartPolicy") not in ("OnFailure", "Never"):
                problems.append("a Job pod's restartPolicy must be OnFailure or Never")
    elif kind == "Role":
        rules = doc.get("rules")
        if not rules:
            problems.append("rules missing")
        for rule in rules or []:
            if not rule.get("verbs") or "apiGroups" not in rule or not rule.get("resources"):
                problems.append(f"rule {rule} needs apiGroups, resources and verbs")
    elif kind == "RoleBinding":
        ref = doc.get("roleRef") or {}
        if ref.get("apiGroup") != "rbac.authorization.k8s.io" or ref.get("kind") not in ("Role", "ClusterRole") or not ref.get("name"):
            problems.append(f"roleRef {ref}")
        subjects = doc.get("subjects")
        if not subjects:
            problems.append("subjects missing")
        for s in subjects or []:
            if not s.get("kind") or not s.get("name"):
                problems.append(f"subject {s} needs kind and name")
            if s.get("kind") == "ServiceAccount" and not s.get("namespace"):
                problems.append(f"ServiceAccount subject {s.get('name')} needs a namespace")
    elif kind == "ConfigMap":
        data = doc.get("data")
        if not isinstance(data, dict) or not data:
            problems.append("data missing")
        for key, value in (data or {}).items():
            if not re.match(r"^[-._a-zA-Z0-9]+$", str(key)) or not isinstance(value, str):
                problems.append(f"data[{key!r}] must be a string under a valid key")
    return problems


@pytest.mark.parametrize("doc,embedded", _params(objects_of(*CORE_KINDS)))
def test_core_object_required_fields(doc, embedded):
    assert core_problems(doc) == []


def test_cronjob_backfill_wiring():
    """The CronJob's ServiceAccount, Role, ConfigMap and script all exist and fit together."""
    docs = load_docs(KUBERAY / "cronjob-backfill.yaml")
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    (cron,) = by_kind["CronJob"].values()
    assert cron["spec"]["concurrencyPolicy"] == "Forbid", "two backfills must never overlap"
    assert cron["spec"]["jobTemplate"]["spec"].get("backoffLimit") == 0, "a retried pod would create a 2nd RayJob"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    sa = pod["serviceAccountName"]
    assert sa in by_kind["ServiceAccount"]
    bindings = [b for b in by_kind["RoleBinding"].values() if any(s["name"] == sa for s in b["subjects"])]
    assert bindings, f"no RoleBinding for ServiceAccount {sa}"
    role = by_kind["Role"][bindings[0]["roleRef"]["name"]]
    assert any(
        "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"]
    ), "the Role must allow creating rayjobs"
    namespaces = {d["metadata"].get("namespace") for d in docs} | {
        s.get("namespace") for b in bindings for s in b["subjects"]
    }
    assert len(namespaces) == 1, f"objects and the RoleBinding subject must share one namespace: {namespaces}"
    # Volumes -> ConfigMaps in this file; /config/<key> paths in the command -> keys of that ConfigMap.
    mounts = {}
    for c in pod["containers"]:
        for m in c.get("volumeMounts", []):
            mounts[m["name"]] = m["mountPath"].rstrip("/")
    for vol in pod.get("volumes", []):
        if "configMap" in vol:
            cm = by_kind["ConfigMap"].get(vol["configMap"]["name"])
            assert cm is not None, f"ConfigMap {vol['configMap']['name']} is not in the file"
            root = mounts[vol["name"]]
            texts = [" ".join(c.get("command", []) + c.get("args", [])) for c in pod["containers"]]
            texts += [v for v in cm["data"].values()]
            for text in texts:
                for key in re.findall(re.escape(root) + r"/([-._a-zA-Z0-9]+)", text):
                    assert key in cm["data"], f"{root}/{key} is not a key of ConfigMap {cm['metadata']['name']}"
    script = by_kind["ConfigMap"]["latte-backfill"]["data"]["submit.sh"]
    assert "kubectl create" in script
    subprocess.run(["sh", "-n"], input=script, text=True, check=True)


# ------------------------------------------------------------------------------- cluster and jobs


@pytest.mark.parametrize("spec", [pytest.param(s, id=label) for label, s in cluster_specs()])
def test_cluster_shape(spec):
    assert spec.get("enableInTreeAutoscaling") is True
    head = spec["headGroupSpec"]
    params = head.get("rayStartParams", {})
    assert params.get("num-cpus") == "0", "the head must advertise no CPUs so no work lands on it"
    assert params.get("dashboard-host") == "0.0.0.0"
    for c in head["template"]["spec"]["containers"]:
        res = c.get("resources", {})
        assert GPU not in res.get("limits", {}) and GPU not in res.get("requests", {}), "the head is CPU-only"
    groups = spec.get("workerGroupSpecs") or []
    assert groups, "no worker groups"
    ray_version = spec.get("rayVersion")
    for g in groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
        pod = g["template"]["spec"]
        ray_container = pod["containers"][0]
        limits = ray_container.get("resources", {}).get("limits", {})
        requests = ray_container.get("resources", {}).get("requests", {})
        assert GPU in limits and int(limits[GPU]) >= 1, f"worker group {g['groupName']} must limit {GPU}"
        assert str(requests.get(GPU, limits[GPU])) == str(limits[GPU]), "GPU requests must equal limits"
        assert any(t.get("key") == GPU for t in pod.get("tolerations", [])), "GPU pods need the GPU toleration"
        env = {e["name"]: e for e in ray_container.get("env", [])}
        assert env.get("LATTE_RAY_CACHE", {}).get("value") == "/cache"
        mounts = {m["mountPath"]: m["name"] for m in ray_container.get("volumeMounts", [])}
        assert "/cache" in mounts, "model cache must be mounted at /cache"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert {"emptyDir", "hostPath"} & set(volumes[mounts["/cache"]]), "cache must be node-local"
    for c in [*head["template"]["spec"]["containers"], *(x for g in groups for x in g["template"]["spec"]["containers"])]:
        assert f"-ray{ray_version}-" in c["image"].split(":")[-1], f"{c['image']} != rayVersion {ray_version}"


ENTRYPOINT_FLAGS = {
    "run": {"--pipeline", "--prompts", "--output"},
    "backfill": {"--pipeline", "--prompts", "--output"},
    "synth": {"--recipe", "--output"},
}
RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "pip", "uv", "conda", "env_vars", "excludes", "image_uri", "config", "py_executable"}
INSTALLS_AT_RUN_TIME = {"pip", "uv", "conda", "working_dir"}


@pytest.mark.parametrize("spec", [pytest.param(s, id=label) for label, s in rayjob_specs()])
def test_rayjob_settings(spec):
    """The image holds the package: the entrypoint is `python -m latte_ray COMMAND` with a built-in spec name,
    and no runtime env installs or uploads anything."""
    from latte_ray.spec import resolve_pipeline_path

    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "latte_ray"] and argv[3] in ENTRYPOINT_FLAGS, argv[:4]
    missing = ENTRYPOINT_FLAGS[argv[3]] - set(argv)
    assert not missing, f"latte_ray {argv[3]} needs {sorted(missing)}"
    if "--pipeline" in argv:
        resolve_pipeline_path(argv[argv.index("--pipeline") + 1])  # a built-in spec the package ships
    assert spec.get("shutdownAfterJobFinishes") is True
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int)
    assert spec.get("submissionMode") == "K8sJobMode"
    assert isinstance(spec.get("backoffLimit"), int)
    # The K8sJobMode submitter runs `ray job submit --runtime-env-json "<json>" -- <entrypoint>` in a shell:
    # a `$VAR` in either would be expanded there (to nothing), not on the Ray cluster.
    assert "$" not in spec["entrypoint"], "entrypoint must not contain $: the submitter's shell expands it"
    if "runtimeEnvYAML" in spec:
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert isinstance(env, dict), "runtimeEnvYAML must be a mapping"
        assert set(env) <= RUNTIME_ENV_KEYS, f"unknown runtime_env keys {set(env) - RUNTIME_ENV_KEYS}"
        assert not INSTALLS_AT_RUN_TIME & set(env), "the image has the package: install nothing at run time"
        assert "$" not in json.dumps(env), "runtimeEnvYAML must not contain $: the submitter's shell expands it"
        if importlib.util.find_spec("ray") is not None:
            from ray.runtime_env import RuntimeEnv

            RuntimeEnv(**env)  # Ray's own checks


def test_backfill_entrypoints():
    found = 0
    for label, spec in rayjob_specs():
        if "backfill" in label:
            found += 1
            argv = shlex.split(spec["entrypoint"])
            assert argv[:4] == ["python", "-m", "latte_ray", "backfill"], label
            assert argv[argv.index("--prompts") + 1] == "s3://BUCKET/prompts/date=*/", label
    assert found == 2, "the RayCronJob and the CronJob's RayJob"


def test_raycronjob_runs_cannot_overlap():
    (cron,) = load_docs(KUBERAY / "raycronjob-backfill.yaml")
    minute, hour, dom, month, dow = cron["spec"]["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and dom == month == dow == "*", "expected a daily schedule"
    assert cron["spec"]["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600


def test_raycronjob_explains_feature_gate():
    text = (KUBERAY / "raycronjob-backfill.yaml").read_text()
    header = text.split("apiVersion:")[0]
    assert "feature gate" in header and "RayCronJob=true" in header and "v1.7.0" in header
    assert "cronjob-backfill.yaml" in header, "point to the portable CronJob"


# ------------------------------------------------------------------------------- referenced paths

PATH_RE = re.compile(r"(?<![\w./-])((?:jobs|pipelines)/[\w.-]+\.(?:py|ya?ml))\b")


def infra_text_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".sh", ".md"))


def referenced_paths() -> dict[str, list[str]]:
    refs: dict[str, list[str]] = {}
    for path in infra_text_files():
        for match in PATH_RE.findall(path.read_text(encoding="utf-8")):
            refs.setdefault(match, [])
            if _rel(path) not in refs[match]:
                refs[match].append(_rel(path))
    return refs


def test_core_paths_are_referenced():
    """infra/README.md still explains the checkout path (`--working-dir .` with the jobs/ wrappers)."""
    refs = referenced_paths()
    for path in ("jobs/generate.py", "jobs/runtime_env.yaml"):
        assert path in refs, f"{path} is named nowhere under infra/"


@pytest.mark.parametrize("path", sorted(referenced_paths()))
def test_referenced_path_exists(path):
    where = ", ".join(referenced_paths()[path])
    assert (REPO / path).is_file(), f"{path} (named in {where}) does not exist in the repo"


# ------------------------------------------------------------------------------------------ secrets

AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
SECRET_ASSIGN = re.compile(
    r"(aws_secret_access_key|aws_session_token|secretaccesskey)\s*[:=]\s*[\"']?([^\s\"',}#]+)", re.IGNORECASE
)
PLACEHOLDER = re.compile(r"^(\.\.\.|testing|<[^>]*>|\$\{?\w+\}?)$")
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


@pytest.mark.parametrize("path", infra_text_files(), ids=_rel)
def test_no_literal_aws_secrets(path):
    text = path.read_text(encoding="utf-8")
    assert not AWS_KEY_ID.search(text), f"{_rel(path)} contains an AWS access key id"
    for key, value in SECRET_ASSIGN.findall(text):
        assert PLACEHOLDER.match(value), f"{_rel(path)}: {key} is set to a literal value"


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_aws_env_comes_from_secrets():
    found = 0
    for label, doc, _ in all_objects():
        for node in _walk(doc):
            for env in node.get("env", []) if isinstance(node.get("env"), list) else []:
                if env.get("name") in SECRET_ENV:
                    found += 1
                    assert "value" not in env, f"{label}: {env['name']} has a literal value"
                    assert _get(env, "valueFrom.secretKeyRef.name"), f"{label}: {env['name']} must use secretKeyRef"
    assert found, "no AWS credential env found: pods could not reach S3 with static keys"


# ------------------------------------------------------------------------------------ AWS launcher


def _aws() -> dict:
    return load_docs(AWS_CLUSTER)[0]


def test_aws_launcher_config():
    cfg = _aws()
    assert cfg["provider"]["type"] == "aws" and cfg["provider"].get("region")
    assert isinstance(cfg.get("idle_timeout_minutes"), (int, float))
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head should take no work"
    assert "InstanceMarketOptions" not in head["node_config"], "keep the head on demand"
    gpu_types = {n: t for n, t in types.items() if re.match(r"^(g\d|p\d)", t["node_config"].get("InstanceType", ""))}
    assert gpu_types, "no GPU worker node type"
    for name, t in gpu_types.items():
        assert t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot", f"{name} not spot"
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= cfg["max_workers"], name
    assert not cfg.get("setup_commands"), "the image has the package: nothing is installed at run time"
    assert not any("pip install" in c for c in cfg.get("head_setup_commands", []) + cfg.get("worker_setup_commands", []))


def test_aws_launcher_has_no_credentials():
    bad = {"aws_access_key_id", "aws_secret_access_key", "aws_session_token", "accesskeyid", "secretaccesskey"}
    for node in _walk(_aws()):
        assert not (bad & {str(k).lower() for k in node}), f"credential key in {_rel(AWS_CLUSTER)}: {node}"


def test_aws_launcher_matches_ray_schema():
    spec = importlib.util.find_spec("ray")
    if spec is None or spec.origin is None:
        pytest.skip("ray is not installed")
    schema_path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    if not schema_path.is_file():
        pytest.skip(f"{schema_path} not found")
    jsonschema.validate(_aws(), json.loads(schema_path.read_text()))


# ------------------------------------------------------------------------------------ local scripts

LOCAL_SCRIPTS = ["start-head.sh", "stop-head.sh", "start-s3.sh", "stop-s3.sh"]


@pytest.mark.parametrize("name", LOCAL_SCRIPTS)
def test_local_script_syntax(name):
    path = LOCAL / name
    assert path.is_file(), f"{_rel(path)} missing"
    subprocess.run(["bash", "-n", str(path)], check=True, capture_output=True, text=True)
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert os.access(path, os.X_OK), f"{_rel(path)} is not executable"


def test_start_head_flags_with_fake_ray(tmp_path):
    """Run start-head.sh / stop-head.sh against a fake `ray` that records its arguments and, like `ray start`,
    leaves a daemon behind that names the head's temp dir (with a child of its own). stop-head.sh must stop
    those two and nothing else: never `ray stop`, and not a process of some other Ray."""
    log = tmp_path / "calls"
    fake = tmp_path / "ray"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "RAY_AUTH_MODE=$RAY_AUTH_MODE $*" >> {shlex.quote(str(log))}\n'
        'if [[ "$1" == start ]]; then\n'
        '  while [[ "$1" != --temp-dir ]]; do shift; done\n'
        '  setsid bash -c "sleep 300 & exec -a \\"gcs_server --log_dir=$2/session_x/logs\\" sleep 300" '
        "</dev/null >/dev/null 2>&1 &\n"
        "fi\n")
    fake.chmod(0o755)
    (tmp_path / "python").symlink_to(sys.executable)  # the script runs the python next to `ray`
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    temp_dir = tmp_path / "head-tmp"
    env.update(RAY_BIN=str(fake), RAY_PORT="0", RAY_DASHBOARD_PORT="0", RAY_TEMP_DIR=str(temp_dir),
               LATTE_RAY_LOCAL_STATE=str(tmp_path / "state"))
    bystander = subprocess.Popen(["bash", "-c", f"exec -a 'raylet --session_dir={tmp_path}/other-ray' sleep 300"])
    family = []
    try:
        out = subprocess.run(["bash", str(LOCAL / "start-head.sh")], env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        def head_family():
            head = [p for p in psutil.process_iter(["cmdline"])
                    if (p.info["cmdline"] or [""])[0].startswith("gcs_server") and str(temp_dir) in p.info["cmdline"][0]]
            family = head + [c for p in head for c in p.children(recursive=True)]
            return family if len(family) == 2 else []

        family = _wait_for(head_family)
        assert len(family) == 2, "the fake daemon and its child should be running"
        stop = subprocess.run(["bash", str(LOCAL / "stop-head.sh")], env=env, capture_output=True, text=True,
                              timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert "stopped Ray head" in stop.stderr and "2 processes" in stop.stderr, stop.stderr
        gone, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, alive
        assert bystander.poll() is None, "stop-head.sh must not touch another Ray's processes"
    finally:
        bystander.kill()
        for proc in family:  # left running only if the script failed to stop them
            if proc.is_running():
                proc.kill()
    (start,) = log.read_text().splitlines()  # stop-head.sh never runs `ray stop`
    argv = shlex.split(start)
    assert argv[0] == "RAY_AUTH_MODE=disabled" and argv[1:3] == ["start", "--head"]
    assert argv[argv.index("--node-ip-address") + 1] == "127.0.0.1"
    assert argv[argv.index("--dashboard-host") + 1] == "127.0.0.1"
    assert argv[argv.index("--temp-dir") + 1] == str(temp_dir)
    assert "--include-dashboard=true" in argv
    port = argv[argv.index("--dashboard-port") + 1]
    assert f"http://127.0.0.1:{port}" in out.stdout, "print the dashboard address to submit to"
    again = subprocess.run(["bash", str(LOCAL / "stop-head.sh")], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "no Ray head started" in again.stderr


def _wait_for(found, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (result := found()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return result


def test_moto_server_entry_point_name():
    """start-s3.sh runs `moto_server`, the console script moto[server] installs next to python."""
    if importlib.util.find_spec("moto") is None:
        pytest.skip("moto is not installed")
    assert "moto_server" in (LOCAL / "start-s3.sh").read_text()
    bin_dir = Path(sys.executable).parent
    assert shutil.which("moto_server", path=str(bin_dir)) or importlib.util.find_spec("moto.server"), bin_dir


# ------------------------------------------------------------------------------------------- the image

PYPROJECT = REPO / "pyproject.toml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CONSTRAINTS = REPO / "requirements" / "constraints.txt"
IMAGE_REPOSITORY = "REGISTRY/latte-ray"  # REGISTRY: the placeholder users replace, like BUCKET


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads(PYPROJECT.read_text())


def ray_pin() -> str:
    """The one Ray version: pyproject.toml's `ray[...]==X.Y.Z` dependency."""
    deps = [d for d in _pyproject()["project"]["dependencies"] if re.match(r"^ray\s*(\[|=|$)", d)]
    assert len(deps) == 1, deps
    match = re.fullmatch(r"ray\[[a-z,]+\]==(\d+\.\d+\.\d+)", deps[0].replace(" ", ""))
    assert match, f"pyproject.toml must pin Ray exactly (ray[data,default]==X.Y.Z), got {deps[0]!r}"
    return match.group(1)


def constraint(name: str) -> str:
    pins = dict(re.findall(r"(?m)^([A-Za-z0-9_.-]+)==(\S+)", CONSTRAINTS.read_text()))
    return pins[name]


def expected_image(variant: str = "gpu") -> str:
    return f"{IMAGE_REPOSITORY}:{_pyproject()['project']['version']}-ray{ray_pin()}-{variant}"


def ray_containers() -> list[tuple[str, dict]]:
    """Every container of every Ray head and worker group, in every manifest (ConfigMap-embedded RayJob too)."""
    out = []
    for label, spec in cluster_specs():
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs") or []]
        for pod in pods:
            for c in pod["spec"]["containers"]:
                out.append((f"{label}:{c['name']}", c))
    return out


def test_ray_version_is_pinned_once():
    assert constraint("ray") == ray_pin(), "requirements/constraints.txt and pyproject.toml disagree on Ray"
    for label, spec in cluster_specs():
        assert spec.get("rayVersion") == ray_pin(), f"{label}: rayVersion {spec.get('rayVersion')!r}"


def test_every_manifest_runs_the_same_image():
    """RayCluster, RayJob, RayCronJob, the CronJob's RayJob and the `ray up` config all run one image, whose tag
    carries pyproject.toml's version and Ray pin; REGISTRY is the one thing a user sets."""
    images = {label: c["image"] for label, c in ray_containers()}
    files = {label.split("#")[0] for label in images}
    assert files == {"raycluster.yaml", "rayjob-generate.yaml", "raycronjob-backfill.yaml", "cronjob-backfill.yaml"}
    aws = _aws()["docker"]
    images[_rel(AWS_CLUSTER)] = aws["image"]
    for key in ("head_image", "worker_image"):
        if key in aws:
            images[f"{_rel(AWS_CLUSTER)}:{key}"] = aws[key]
    for node_type, t in _aws()["available_node_types"].items():
        if "docker" in t:
            images[f"{_rel(AWS_CLUSTER)}:{node_type}"] = t["docker"].get("image") or t["docker"].get("worker_image")
    wrong = {label: image for label, image in images.items() if image != expected_image()}
    assert not wrong, f"expected {expected_image()} everywhere, got {wrong}"


def test_manifests_say_where_to_set_the_image():
    for path in [*manifest_files(), AWS_CLUSTER]:
        text = path.read_text()
        header = text.split("\napiVersion:")[0] if path.parent == KUBERAY else text.split("\ndocker:")[0]
        assert "IMAGE:" in header and "REGISTRY" in header, f"{_rel(path)}: explain the image in the header"
        assert "s#REGISTRY#" in text, f"{_rel(path)}: show how to set the registry"


def test_nothing_is_installed_at_run_time():
    """No runtime env installs packages or uploads code (see test_rayjob_settings), `ray up` runs no setup
    commands, and every Ray node sets PIP_NO_DEPS=1 so that a job shipping its own latte-ray wheel with
    `py_modules` installs only that wheel (Ray runs `pip install <wheel> --target`, which would otherwise
    fetch torch & co. again; tests/test_wheel.py submits such a job to a real head)."""
    for label, c in ray_containers():
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("PIP_NO_DEPS") == "1", f"{label}: set PIP_NO_DEPS=1"
    assert "-e PIP_NO_DEPS=1" in _aws()["docker"]["run_options"]
    assert not _aws().get("setup_commands")
    for path in infra_text_files():
        assert "latte-ray[s3]==" not in path.read_text(), f"{_rel(path)} installs latte-ray from a package index"


def test_make_image_tags_what_the_manifests_run():
    if shutil.which("make") is None:
        pytest.fail("make is needed (the README's two set-up commands use it)")
    for variant in ("gpu", "cpu"):
        # A clean environment: under the suite's own `make test`, MAKEFLAGS/MAKELEVEL would make this a
        # sub-make that prints "Entering/Leaving directory" lines around the recipe.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
        done = subprocess.run(["make", "--no-print-directory", "-n", "image", "REGISTRY=REGISTRY",
                               f"VARIANT={variant}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        argv = shlex.split(done.stdout.strip().splitlines()[-1])
        assert argv[:2] == ["docker", "build"] and argv[-1] == "."
        assert argv[argv.index("-t") + 1] == expected_image(variant)
        args = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--build-arg")
        assert args == {"RAY_VERSION": ray_pin(), "VARIANT": variant}


def _dockerfile() -> tuple[dict, list[str], str]:
    """(ARG defaults, FROM lines, the whole text with line continuations joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", "\n".join(lines), re.M))
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    return args, froms, "\n".join(lines)


def test_dockerfile_builds_the_wheel_then_installs_it_into_the_pinned_ray_image():
    args, froms, text = _dockerfile()
    assert args["RAY_VERSION"] == ray_pin(), "the base image's Ray must be pyproject.toml's pin"
    assert args["VARIANT"] == "gpu", "the default image is the production (CUDA) one"
    assert args["TORCH_VERSION"] == constraint("torch"), "torch as requirements/constraints.txt pins it"
    assert re.fullmatch(r"cu\d{3}", args["TORCH_CUDA"]), args["TORCH_CUDA"]
    assert len(froms) == 2, froms
    assert re.fullmatch(r"FROM python:3\.11-slim AS wheel", froms[0]), froms[0]
    assert froms[1] == "FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}", froms[1]
    # Stage 1 gets what the wheel is built from: pyproject's package-dir sources, and its readme.
    setuptools = _pyproject()["tool"]["setuptools"]
    sources = {"latte_ray", *setuptools["package-dir"].values(), "pyproject.toml", _pyproject()["project"]["readme"]}
    stage1 = text.split(froms[1])[0]
    copied = {p.rstrip("/") for ln in stage1.splitlines() if ln.startswith("COPY ") for p in ln.split()[1:-1]}
    assert sources <= copied, f"the wheel stage lacks {sources - copied}"
    assert re.search(r"pip wheel .*--no-deps", stage1)
    # Stage 2: one pip install of the wheel (with [s3]) and the pinned torch build, under the constraints.
    stage2 = text.split(froms[1])[1]
    (install,) = [ln for ln in stage2.splitlines() if "pip install" in ln]
    assert "--constraint /tmp/constraints.txt" in install and "source=requirements/constraints.txt" in install
    assert '"torch==${TORCH_VERSION}+${build}"' in install
    assert re.search(r'latte_ray-\*\.whl\)\[s3\]"', install), "install the wheel with its [s3] extra"
    assert "https://download.pytorch.org/whl/${build}" in install
    assert re.search(r"gpu\) build=\"\$TORCH_CUDA\"", install) and "cpu) build=cpu" in install
    assert "python -m latte_ray --version" in install, "the build smoke-tests the installed package"
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(ln for ln in stage2.splitlines() if ln.startswith("ENV "))))
    assert env.get("LATTE_RAY_CACHE") == "/cache"
    assert not [k for k in env if re.match(r"^(AWS_|HF_TOKEN|.*SECRET)", k)], "no secrets in the image"
    assert "PIP_NO_DEPS" not in env, "derived images' pip installs would silently lose dependencies"


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches the path or one of its parents decides."""
    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        rx = regex(pattern.lstrip("!").strip("/"))
        if any(rx.match(p) for p in prefixes):
            ignored = not negated
    return ignored


def test_dockerignore_sends_only_what_the_image_is_built_from():
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    needed = ["pyproject.toml", "README.md", "requirements/constraints.txt",
              *(p.relative_to(REPO).as_posix() for d in ("latte_ray", "pipelines", "examples")
                for p in (REPO / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts)]
    assert len(needed) > 40, needed
    left_out = [p for p in needed if _docker_ignored(p, patterns)]
    assert not left_out, f".dockerignore leaves out {left_out}"
    for junk in (".venv/bin/python", ".git/HEAD", "tests/test_infra.py", "outputs/demo/run.json", "dist/x.whl",
                 "build/lib/latte_ray/cli.py", "latte_ray/__pycache__/cli.cpython-311.pyc", "jobs/generate.py",
                 "latte_ray.egg-info/PKG-INFO", ".cache/x", "infra/aws/cluster.yaml"):
        assert _docker_ignored(junk, patterns), f".dockerignore lets {junk} into the build context"


def test_docs_say_how_to_build_and_push_the_image():
    """docs/operations.md (linked from the README) shows the build and the push."""
    assert "](docs/operations.md)" in (REPO / "README.md").read_text()
    text = (REPO / "docs" / "operations.md").read_text()
    assert "make image" in text and "docker push" in text and "VARIANT=cpu" in text
