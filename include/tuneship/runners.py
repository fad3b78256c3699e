"""How the trainer is launched on each runner, and the specs we hand to Kubernetes and Docker.

The trainer has one entrypoint (`python -m tuneship.train ...`) and this module is the only
place that spells it, so the local subprocess, the Docker container and the Kubernetes pod
run byte-identical argv. Everything here is pure: it renders dicts (a Pod, an Engine API
ContainerCreate body) and validates them against the real schemas, so the production runners
are checked by contract on a machine without a cluster or a Docker engine.

No Airflow imports: the operators in `plugins/` call these functions, and pass the results to
KubernetesPodOperator (`pod_template_dict=`) or DockerOperator.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

TRAINER_MODULE = "tuneship.train"

#: KubernetesPodOperator looks for (and merges into) the container with this name.
BASE_CONTAINER_NAME = "base"

#: Engine API version the vendored ContainerCreate schema is taken from (docker-py's default).
DOCKER_API_VERSION = "1.45"

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"

# Env var names that must never carry a literal value in a rendered spec: they come from a
# Kubernetes Secret (secretKeyRef/envFrom) or DockerOperator's private_environment instead.
_SECRETISH = re.compile(
    r"(SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I
)

_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
# resource.Quantity grammar from k8s.io/apimachinery (the OpenAPI schema only says "string").
_QUANTITY = re.compile(
    r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)


class SpecInvalid(ValueError):
    """A rendered Pod / manifest / container spec that the target API would reject."""


# --------------------------------------------------------------------------- trainer argv


def trainer_command(
    recipe_path: str | Path,
    data_uri: str | Path,
    base_ref: str,
    output_uri: str | Path,
    overrides: Mapping[str, Any] | None = None,
) -> list[str]:
    """The trainer argv, identical on every runner.

    Overrides are emitted sorted by key so the same inputs always give the same argv (and so
    the same pod spec on a retry). Booleans render as `true`/`false` (YAML-style), None as `null`.
    """
    cmd = [
        "python",
        "-m",
        TRAINER_MODULE,
        "--recipe",
        str(recipe_path),
        "--data",
        str(data_uri),
        "--base",
        str(base_ref),
        "--output",
        str(output_uri),
    ]
    for key in sorted(overrides or {}):
        if not _OVERRIDE_KEY.match(key):
            raise ValueError(f"override key {key!r} is not a dotted identifier")
        cmd += ["--set", f"{key}={_render_value(overrides[key])}"]  # type: ignore[index]
    return cmd


def _render_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


# --------------------------------------------------------------------------- names


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def dns1123_name(raw: str, max_len: int = 63) -> str:
    """Sanitise any string into an RFC 1123 label (lowercase alnum and '-', <= max_len).

    A string that is already valid is returned unchanged; otherwise a short hash of the raw
    string is appended so that two inputs that sanitise alike (`a_b` / `a.b`) or share a long
    prefix never collide.
    """
    if _DNS1123_LABEL.match(raw) and len(raw) <= max_len:
        return raw
    cleaned = re.sub(r"[^a-z0-9-]+", "-", raw.lower())
    cleaned = re.sub(r"-{2,}", "-", cleaned).strip("-")
    suffix = _short_hash(raw)
    head = cleaned[: max_len - len(suffix) - 1].rstrip("-")
    return f"{head}-{suffix}" if head else f"x-{suffix}"


def label_value(raw: str) -> str:
    """Sanitise a string into a Kubernetes label value (<= 63, alnum at both ends)."""
    if _LABEL_VALUE.match(raw) and len(raw) <= 63:
        return raw
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", raw)
    suffix = _short_hash(raw)
    head = cleaned[: 63 - len(suffix) - 1].strip("-_.")
    return f"{head}-{suffix}" if head else suffix


def trainer_pod_name(dag_id: str, run_id: str, attempt_key: str, task_id: str = "train") -> str:
    """Deterministic pod name for one training attempt of one DAG run.

    `attempt_key` must be stable across Airflow retries of the same logical attempt (e.g. a
    hash of recipe + dataset version + base + overrides, never the try number), so a retried
    task computes the same name and finds (reattaches to) the pod it already launched instead
    of starting a second one. The hash covers the full key, so truncation never merges runs.
    """
    raw = f"{dag_id}|{task_id}|{run_id}|{attempt_key}"
    stem = re.sub(r"[^a-z0-9-]+", "-", f"{dag_id}-{task_id}".lower()).strip("-")
    suffix = _short_hash(raw, 16)
    head = stem[: 63 - len(suffix) - 1].rstrip("-")
    return f"{head}-{suffix}" if head else f"x-{suffix}"


# --------------------------------------------------------------------------- Kubernetes


def secret_ref(secret_name: str, key: str, *, optional: bool = False) -> dict[str, Any]:
    """An env `valueFrom` pointing at a Kubernetes Secret key (never the value itself)."""
    ref: dict[str, Any] = {"name": secret_name, "key": key}
    if optional:
        ref["optional"] = True
    return {"secretKeyRef": ref}


def env_entry(name: str, value: Any) -> dict[str, Any]:
    if not _ENV_NAME.match(name):
        raise SpecInvalid(f"env var name {name!r} is not a valid C identifier-ish name")
    if isinstance(value, Mapping):
        if not ({"secretKeyRef", "configMapKeyRef", "fieldRef", "resourceFieldRef"} & set(value)):
            raise SpecInvalid(f"env {name}: a mapping value must be a valueFrom source")
        return {"name": name, "valueFrom": dict(value)}
    if _SECRETISH.search(name):
        raise SpecInvalid(
            f"env {name} looks like a secret: pass it as secret_ref(...) (secretKeyRef), "
            "never as a literal"
        )
    return {"name": name, "value": _render_value(value)}


def _load_yaml(path: str | Path) -> Any:
    import yaml  # local: keeps `import tuneship.runners` cheap

    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def load_manifests(path: str | Path) -> list[dict[str, Any]]:
    """All non-empty documents of a (multi-document) Kubernetes YAML file."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


def render_trainer_pod(
    template_path: str | Path,
    *,
    name: str,
    image: str,
    command: Sequence[str],
    labels: Mapping[str, str] | None = None,
    env: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The trainer Pod: the platform team's template with this run's image/argv/env filled in.

    - `name` is sanitised to an RFC 1123 label (pass `trainer_pod_name(...)` for the
      retry-stable name); labels are merged over the template's and sanitised to label values.
    - The container named `base` (KubernetesPodOperator's convention; else the first one)
      gets `image`, `command` (the full trainer argv, overriding the image ENTRYPOINT) and no
      `args`.
    - `env` values are literals or `secret_ref(...)` mappings; they replace template entries
      of the same name and keep the template's others (and its envFrom) in place. Names that
      look like secrets are refused as literals.
    The result is what KubernetesPodOperator should get as `pod_template_dict`.
    """
    template = _load_yaml(template_path)
    if not isinstance(template, dict) or template.get("kind") != "Pod":
        raise SpecInvalid(f"{template_path}: expected a single Pod document")
    pod = copy.deepcopy(template)
    meta = pod.setdefault("metadata", {})
    meta["name"] = dns1123_name(name)
    meta.pop("generateName", None)
    merged_labels = dict(meta.get("labels") or {})
    merged_labels.update({k: label_value(str(v)) for k, v in (labels or {}).items()})
    meta["labels"] = merged_labels

    containers = pod.get("spec", {}).get("containers") or []
    if not containers:
        raise SpecInvalid(f"{template_path}: the template has no containers")
    container = next((c for c in containers if c.get("name") == BASE_CONTAINER_NAME), containers[0])
    container["image"] = image
    container["command"] = [str(a) for a in command]
    container.pop("args", None)

    new_env = [env_entry(k, v) for k, v in (env or {}).items()]
    replaced = {e["name"] for e in new_env}
    container["env"] = [
        e for e in container.get("env") or [] if e.get("name") not in replaced
    ] + new_env
    return pod


def _pod_specs(obj: Mapping[str, Any]) -> Iterable[tuple[str, Mapping[str, Any]]]:
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        yield "spec", spec
    elif kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        yield "spec.template.spec", (spec.get("template") or {}).get("spec") or {}
    elif kind == "CronJob":
        job = (spec.get("jobTemplate") or {}).get("spec") or {}
        yield "spec.jobTemplate.spec.template.spec", (job.get("template") or {}).get("spec") or {}


def _check_quantities(where: str, pod_spec: Mapping[str, Any]) -> None:
    def check(path: str, q: Any) -> None:
        if (
            isinstance(q, bool)
            or not isinstance(q, str | int | float)
            or not _QUANTITY.match(str(q))
        ):
            raise SpecInvalid(f"{path}: {q!r} is not a Kubernetes resource quantity")

    for group in ("initContainers", "containers", "ephemeralContainers"):
        for i, c in enumerate(pod_spec.get(group) or []):
            for section in ("limits", "requests"):
                for res, q in ((c.get("resources") or {}).get(section) or {}).items():
                    check(f"{where}.{group}[{i}].resources.{section}.{res}", q)
    for res, q in (pod_spec.get("overhead") or {}).items():
        check(f"{where}.overhead.{res}", q)
    for i, v in enumerate(pod_spec.get("volumes") or []):
        size = (v.get("emptyDir") or {}).get("sizeLimit")
        if size is not None:
            check(f"{where}.volumes[{i}].emptyDir.sizeLimit", size)


def _check_metric_targets(obj: Mapping[str, Any]) -> None:
    """An HPA's metric targets (`value`, `averageValue`) are quantities too; the schema types them
    only as strings, so `averageValue: 100ms` would pass it and be refused on admission."""
    if obj.get("kind") != "HorizontalPodAutoscaler":
        return
    for i, metric in enumerate((obj.get("spec") or {}).get("metrics") or []):
        kind = metric.get("type") or ""
        key = kind[:1].lower() + kind[1:]  # Pods -> pods, ContainerResource -> containerResource
        target = (metric.get(key) or {}).get("target") or {}
        for field in ("value", "averageValue"):
            q = target.get(field)
            if q is not None and (
                isinstance(q, bool) or not isinstance(q, str | int | float) or not _QUANTITY.match(str(q))
            ):
                raise SpecInvalid(
                    f"HorizontalPodAutoscaler spec.metrics[{i}].{key}.target.{field}: {q!r} is not "
                    "a Kubernetes quantity"
                )


def validate_manifest(obj: Mapping[str, Any], k8s_version: str = "1.31") -> None:
    """Validate one Kubernetes object against the strict OpenAPI schema of `k8s_version`.

    Strict mode rejects unknown fields. On top of the schema (which types quantities only as
    "string") we check resource quantities against apimachinery's grammar and the name
    against RFC 1123, which the API server would do on admission.
    """
    import kubernetes_validate

    try:
        kubernetes_validate.validate(dict(obj), k8s_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path) or "<root>"
        raise SpecInvalid(f"{obj.get('kind')} {path}: {exc.message}") from exc
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise SpecInvalid(exc.message) from exc
    name = (obj.get("metadata") or {}).get("name")
    if name is not None and not (_DNS1123_LABEL.match(name) and len(name) <= 63):
        raise SpecInvalid(f"{obj.get('kind')} metadata.name {name!r} is not an RFC 1123 label")
    for where, pod_spec in _pod_specs(obj):
        _check_quantities(where, pod_spec)
    _check_metric_targets(obj)


def validate_pod(pod: Mapping[str, Any], k8s_version: str = "1.31") -> None:
    """Validate a rendered Pod (strict schema + quantities + name); raises SpecInvalid."""
    if pod.get("kind") != "Pod" or pod.get("apiVersion") != "v1":
        raise SpecInvalid("expected apiVersion v1, kind Pod")
    validate_manifest(pod, k8s_version)


# --------------------------------------------------------------------------- Docker

_BYTE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_bytes(size: int | str) -> int:
    """`16g` / `512m` / `1024` -> bytes (binary units, as the docker CLI and docker-py)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([bkmgt]?)b?\s*", size.lower())
    if not m:
        raise ValueError(f"cannot parse a byte size from {size!r}")
    return int(float(m.group(1)) * _BYTE_UNITS[m.group(2)])


def _mount(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """`source:target[:ro]` (docker -v style) or a dict with source/target/type/read_only."""
    if isinstance(spec, str):
        parts = spec.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise ValueError(f"mount {spec!r}: expected SOURCE:TARGET[:ro|rw]")
        source, target = parts[0], parts[1]
        read_only = len(parts) == 3 and parts[2] == "ro"
        kind = "bind" if source.startswith(("/", ".")) else "volume"
    else:
        source, target = spec["source"], spec["target"]
        read_only = bool(spec.get("read_only", False))
        kind = spec.get("type") or ("bind" if str(source).startswith("/") else "volume")
    return {"Target": target, "Source": source, "Type": kind, "ReadOnly": read_only}


def docker_container_spec(
    image: str,
    command: Sequence[str],
    *,
    gpus: int | str | Sequence[str] | None = "all",
    mounts: Sequence[str | Mapping[str, Any]] = (),
    env: Mapping[str, Any] | None = None,
    shm_size: int | str = "16g",
    labels: Mapping[str, str] | None = None,
    working_dir: str | None = None,
) -> dict[str, Any]:
    """The Engine API ContainerCreate body DockerOperator would submit for the trainer.

    Mirrors docker-py's rendering of DockerOperator's arguments: `entrypoint` = argv[0],
    `command` = the rest (so the image ENTRYPOINT is overridden, like a pod's `command`),
    `mounts` as HostConfig.Mounts, GPUs as a HostConfig.DeviceRequests entry (the
    `--gpus` equivalent: `"all"` -> Count -1, an int -> Count n, a list -> DeviceIDs),
    `shm_size` in bytes (PyTorch DataLoader workers need more than Docker's 64 MiB).
    Secrets are refused here: DockerOperator's `private_environment` carries them and they
    never appear in a rendered spec.
    """
    argv = [str(a) for a in command]
    if not argv:
        raise ValueError("command must not be empty")
    env_list = []
    for name, value in sorted((env or {}).items()):
        if isinstance(value, Mapping) or _SECRETISH.search(name):
            raise SpecInvalid(
                f"env {name}: secrets go through DockerOperator private_environment, "
                "not the rendered spec"
            )
        env_list.append(f"{name}={_render_value(value)}")

    host: dict[str, Any] = {
        "AutoRemove": False,
        "ShmSize": parse_bytes(shm_size),
        "Mounts": [_mount(m) for m in mounts],
    }
    if gpus not in (None, 0, "none", ()):
        req: dict[str, Any] = {"Driver": "nvidia", "Capabilities": [["gpu"]], "Options": {}}
        if gpus == "all":
            req.update(Count=-1, DeviceIDs=[])
        elif isinstance(gpus, int):
            if gpus < 0:
                raise ValueError("gpus must be 'all', a positive count or device ids")
            req.update(Count=gpus, DeviceIDs=[])
        elif isinstance(gpus, str):
            raise ValueError(f"gpus={gpus!r}: use 'all', a count, or a list of device ids")
        else:
            req.update(Count=0, DeviceIDs=[str(d) for d in gpus])
        host["DeviceRequests"] = [req]

    spec: dict[str, Any] = {
        "Image": image,
        "Entrypoint": argv[:1],
        "Cmd": argv[1:],
        "Env": env_list,
        "Labels": {str(k): str(v) for k, v in (labels or {}).items()},
        "AttachStdout": True,
        "AttachStderr": True,
        "Tty": False,
        "HostConfig": host,
    }
    if working_dir:
        spec["WorkingDir"] = working_dir
    return spec


@lru_cache(maxsize=1)
def _container_create_schema() -> dict[str, Any]:
    with open(SCHEMA_DIR / "docker_container_create.json", encoding="utf-8") as fh:
        return json.load(fh)


def validate_container_spec(spec: Mapping[str, Any]) -> None:
    """Validate a ContainerCreate body against the vendored Engine API v1.45 subset."""
    import jsonschema

    schema = _container_create_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(dict(spec)), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        path = ".".join(str(p) for p in first.path) or "<root>"
        raise SpecInvalid(f"ContainerCreate {path}: {first.message} ({len(errors)} error(s))")
