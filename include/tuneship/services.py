"""Start, check and stop the local services of the embedded default.

Airflow (api-server, scheduler, dag-processor, triggerer: what `airflow standalone` runs,
started one by one so each has its own log and pid), the MLflow UI, Triton, the gateway and
Prometheus (Debian's `prometheus` binary, when installed: scraping the gateway and Triton with
the rules in serving/prometheus/rules).
Each runs detached, with a pid file and a log under TUNESHIP_HOME, so `make up` can leave
them running and `make down` (or the end of `make demo`) stops exactly what was started.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneship import config

AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
ADMIN_USER = "admin"
PROMETHEUS_DIR = config.REPO_ROOT / "serving" / "prometheus"  # compose's prometheus.yml and the rules


def run_dir() -> Path:
    return config.home() / "run"


def log_dir() -> Path:
    return config.home() / "logs"


def airflow_home() -> Path:
    return config.home() / "airflow"


def _secret(name: str) -> str:
    """A per-home secret generated once (JWT signing, Airflow secret key)."""
    path = config.home() / "secrets" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def airflow_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every Airflow process of the embedded default."""
    home = config.home()
    ports = config.Ports.from_env()
    ah = airflow_home()
    env = dict(os.environ)
    env.update(
        {
            "TUNESHIP_HOME": str(home),
            "AIRFLOW_HOME": str(ah),
            # TUNESHIP_DAGS_FOLDER: the tests' own DAGs (tests/fixtures/dags) around the plugin's operators
            "AIRFLOW__CORE__DAGS_FOLDER": os.environ.get("TUNESHIP_DAGS_FOLDER", str(config.REPO_ROOT / "dags")),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(config.REPO_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # LocalExecutor whose workers inherit torch, transformers, peft and MLflow already
            # imported (plugins/tuneship_airflow/executor.py): about 9 s less per task that loads a model
            "AIRFLOW__CORE__EXECUTOR": "tuneship_airflow.executor.PreloadingLocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__FERNET_KEY": "",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{ports.airflow}/execution/",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(ah / "passwords.json"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{ah / 'airflow.db'}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(ports.airflow),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{ports.airflow}",
            "AIRFLOW__API__SECRET_KEY": _secret("api_secret_key"),
            "AIRFLOW__API_AUTH__JWT_SECRET": _secret("jwt_secret"),
            "AIRFLOW__API__WORKERS": "1",
            # Pick up new and changed DAG files quickly; this is a one-machine dev stack.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "600",
            "AIRFLOW__TRIGGERER__DEFAULT_CAPACITY": "50",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(ah / "logs"),
            "AIRFLOW__WEBSERVER__EXPOSE_CONFIG": "False",
            "MLFLOW_TRACKING_URI": config.mlflow_tracking_uri(),
            "GX_ANALYTICS_ENABLED": "False",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "NO_PROXY": "*",
            # The tasks' PyTorch (the local trainer, evaluate, compile) shares this machine with
            # the services and Triton. GNU OpenMP's threads spin at each barrier by default, so a
            # thread that another process preempts stalls its partner: beside one busy process a
            # 2-thread fine-tune ran 50 tokens/s by default and 85 with passive waits, which cost
            # up to 15 % alone (`python -m bench.contention`; README, Fine-tuning).
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        }
    )
    env.update(extra or {})
    return env


def admin_password() -> str:
    """The simple auth manager writes the generated password on first start."""
    path = airflow_home() / "passwords.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({ADMIN_USER: secrets.token_urlsafe(12)}))
        path.chmod(0o600)
    return json.loads(path.read_text())[ADMIN_USER]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


# -- Prometheus -------------------------------------------------------------------------------
def prometheus_binary() -> str | None:
    """TUNESHIP_PROMETHEUS_BIN, else `prometheus` on PATH (Debian's package `prometheus`)."""
    return os.environ.get("TUNESHIP_PROMETHEUS_BIN") or shutil.which("prometheus")


def prometheus_config(targets: dict[str, str], rules_dir: Path = PROMETHEUS_DIR / "rules") -> dict[str, Any]:
    """Compose's serving/prometheus/prometheus.yml with each job's target replaced (`targets`:
    job name -> host:port) and the rule files read from `rules_dir`: one scrape configuration,
    two deployments."""
    import yaml

    source = PROMETHEUS_DIR / "prometheus.yml"
    cfg = yaml.safe_load(source.read_text())
    jobs = {job["job_name"] for job in cfg["scrape_configs"]}
    if set(targets) != jobs:
        raise ValueError(f"{source}: scrape jobs {sorted(jobs)}; targets were given for {sorted(targets)}: "
                         "give one host:port per job")
    for job in cfg["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    cfg["rule_files"] = [str(Path(rules_dir) / "*.yml")]
    return cfg


def prometheus_home() -> Path:
    return config.home() / "prometheus"


def write_prometheus_config(ports: config.Ports | None = None) -> Path:
    """The embedded default's configuration: the gateway and Triton's metrics port on loopback."""
    import yaml

    ports = ports or config.Ports.from_env()
    cfg = prometheus_config({"tuneship-gateway": f"127.0.0.1:{ports.gateway}",
                             "triton": f"127.0.0.1:{ports.triton_metrics}"})
    path = prometheus_home() / "prometheus.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    ready_url: str | None
    env: dict[str, str]


def services() -> dict[str, Service]:
    ports = config.Ports.from_env()
    aenv = airflow_env()
    base_env = dict(os.environ, TUNESHIP_HOME=str(config.home()))
    mlflow_dir = config.home() / "mlflow"
    out: dict[str, Service] = {}
    for comp in AIRFLOW_COMPONENTS:
        ready = f"http://127.0.0.1:{ports.airflow}/api/v2/monitor/health" if comp == "api-server" else None
        out[f"airflow-{comp}"] = Service(f"airflow-{comp}", [_bin("airflow"), comp], ready, aenv)
    out["mlflow"] = Service(
        "mlflow",
        [
            _bin("mlflow"), "server",
            "--backend-store-uri", config.mlflow_tracking_uri(),
            "--default-artifact-root", config.mlflow_artifact_root(),
            "--host", "127.0.0.1", "--port", str(ports.mlflow), "--workers", "1",
        ],
        f"http://127.0.0.1:{ports.mlflow}/health",
        # No server jobs (GenAI scorers, prompt optimisation): Tuneship runs none, and their six
        # huey consumer processes cost about 30 s of CPU at start-up, beside the first fine-tune
        dict(base_env, MLFLOW_HOME=str(mlflow_dir), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
    )
    out["triton"] = Service(
        "triton",
        [sys.executable, "-m", "tuneship.tritonserver", "serve"],
        f"http://127.0.0.1:{ports.triton_http}/v2/health/live",
        base_env,
    )
    out["gateway"] = Service(
        "gateway",
        [sys.executable, "-m", "serving.gateway"],
        f"http://127.0.0.1:{ports.gateway}/health/live",
        dict(base_env, PYTHONPATH=str(config.REPO_ROOT)),
    )
    out["prometheus"] = Service(
        "prometheus",
        [
            prometheus_binary() or "prometheus",
            f"--config.file={prometheus_home() / 'prometheus.yml'}",
            f"--storage.tsdb.path={prometheus_home() / 'data'}",
            "--storage.tsdb.retention.time=15d",
            f"--web.listen-address=127.0.0.1:{ports.prometheus}",
        ],
        f"http://127.0.0.1:{ports.prometheus}/-/ready",
        base_env,
    )
    return out


def _pidfile(name: str) -> Path:
    return run_dir() / f"{name}.pid"


def pid_of(name: str) -> int | None:
    path = _pidfile(name)
    if not path.exists():
        return None
    pid = int(path.read_text().strip() or 0)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        path.unlink(missing_ok=True)
        return None
    return pid


def _http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(check: Callable[[], bool], what: str, timeout: float, proc_name: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc_name and pid_of(proc_name) is None:
            raise RuntimeError(f"{proc_name} exited while starting; see {log_dir() / (proc_name + '.log')}")
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s; see {log_dir()}")


def prepare_airflow() -> None:
    """Create or migrate the metadata DB (idempotent)."""
    airflow_home().mkdir(parents=True, exist_ok=True)
    admin_password()
    subprocess.run([_bin("airflow"), "db", "migrate"], env=airflow_env(), check=True,
                   stdout=subprocess.DEVNULL)


def start(names: list[str], timeout: float = 180.0) -> None:
    run_dir().mkdir(parents=True, exist_ok=True)
    log_dir().mkdir(parents=True, exist_ok=True)
    table = services()
    if any(n.startswith("airflow-") for n in names):
        prepare_airflow()
    if "prometheus" in names:
        if prometheus_binary() is None:
            print("[services] Prometheus is not installed, so nothing scrapes the gateway and Triton: "
                  "`make promtool` (or `apt-get install prometheus`) installs it; starting the others", flush=True)
            names = [n for n in names if n != "prometheus"]
        else:
            write_prometheus_config()
    if "triton" in names and pid_of("triton") is None:
        from tuneship import tritonserver

        if not tritonserver.is_installed():  # a new or wiped TUNESHIP_HOME: `make install` ran for another
            print(f"[services] Triton is not installed under {tritonserver.triton_home()}: installing it "
                  "(once per TUNESHIP_HOME, a few minutes)", flush=True)
            tritonserver.install()
    started = []
    for name in names:
        svc = table[name]
        if pid_of(name) is not None:
            continue
        log = open(log_dir() / f"{name}.log", "ab")
        proc = subprocess.Popen(svc.argv, env=svc.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=str(config.REPO_ROOT))
        log.close()
        _pidfile(name).write_text(str(proc.pid))
        started.append(name)
    for name in names:
        svc = table[name]
        if svc.ready_url:
            url = svc.ready_url
            wait_for(lambda url=url: _http_ok(url), name, timeout, proc_name=name)
    if started:
        print(f"[services] started: {', '.join(started)}", flush=True)


def _alive(pid: int) -> bool:
    """Whether `pid` still runs. A service this process started is its child: once it exits
    it stays a zombie (which still answers `kill(pid, 0)`) until reaped here."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child: someone else reaps it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop(names: list[str] | None = None, timeout: float = 30.0) -> list[str]:
    names = names or list(services())
    stopped = []
    for name in names:
        pid = pid_of(name)
        if pid is None:
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        stopped.append((name, pid))
    deadline = time.monotonic() + timeout
    for name, pid in stopped:
        while time.monotonic() < deadline:
            if not _alive(pid):
                break
            time.sleep(0.2)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _pidfile(name).unlink(missing_ok=True)
    return [n for n, _ in stopped]


ALL = [*(f"airflow-{c}" for c in AIRFLOW_COMPONENTS), "mlflow", "triton", "gateway", "prometheus"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneship.services")
    parser.add_argument("action", choices=["up", "down", "status", "env"])
    parser.add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    if args.action == "up":
        start(args.names or ALL)
    elif args.action == "down":
        stopped = stop(args.names or None)
        print(f"[services] stopped: {', '.join(stopped) or 'nothing was running'}")
    elif args.action == "status":
        for name in services():
            pid = pid_of(name)
            print(f"{name:24s} {'running pid ' + str(pid) if pid else 'stopped'}")
    else:
        for key, value in airflow_env().items():
            if key.startswith(("AIRFLOW", "TUNESHIP", "MLFLOW")):
                print(f"export {key}={value!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
