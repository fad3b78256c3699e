"""Where Tuneship keeps its state and which loopback ports its local services use.

One home for every path and port so the DAGs, the gateway, the trainer and the tests
agree without passing them around. Everything is overridable by environment variable,
which is how tests run a second, isolated stack next to a running demo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def home() -> Path:
    """TUNESHIP_HOME, default `<repo>/.tuneship` (git-ignored)."""
    return Path(os.environ.get("TUNESHIP_HOME", REPO_ROOT / ".tuneship")).resolve()


def artifacts() -> Path:
    """Root of the artifact store (object storage in production)."""
    return Path(os.environ.get("TUNESHIP_ARTIFACTS", home() / "artifacts"))


def models_dir() -> Path:
    """Where base models live (the tiny builder's output, converted packaged models, names
    that `resolve_base_ref` looks up): TUNESHIP_MODELS, default `home()/models`."""
    return Path(os.environ.get("TUNESHIP_MODELS", home() / "models"))


def incoming() -> Path:
    """Where new training-data batches land (one directory per batch; `_SUCCESS` marks a
    batch complete for the event-driven watcher)."""
    return Path(os.environ.get("TUNESHIP_INCOMING", home() / "incoming"))


def _port(name: str, default: int) -> int:
    return int(os.environ.get(f"TUNESHIP_PORT_{name.upper()}", default))


@dataclass(frozen=True)
class Ports:
    airflow: int
    mlflow: int
    triton_http: int
    triton_grpc: int
    triton_metrics: int
    gateway: int
    # Not 9090: Debian's `prometheus` package runs its own system Prometheus there.
    prometheus: int = 9190

    @classmethod
    def from_env(cls) -> Ports:
        return cls(
            airflow=_port("airflow", 8080),
            mlflow=_port("mlflow", 5000),
            triton_http=_port("triton_http", 8000),
            triton_grpc=_port("triton_grpc", 8001),
            triton_metrics=_port("triton_metrics", 8002),
            gateway=_port("gateway", 8100),
            prometheus=_port("prometheus", 9190),
        )


def mlflow_tracking_uri() -> str:
    """The MLflow server when one is configured, else the embedded SQLite store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{home() / 'mlflow' / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    return os.environ.get("TUNESHIP_MLFLOW_ARTIFACTS", str(home() / "mlflow" / "artifacts"))


def gateway_url() -> str:
    return os.environ.get("TUNESHIP_GATEWAY_URL", f"http://127.0.0.1:{Ports.from_env().gateway}")


def triton_url() -> str:
    """host:port of Triton's HTTP endpoint (tritonclient style, no scheme)."""
    return os.environ.get("TUNESHIP_TRITON_URL", f"127.0.0.1:{Ports.from_env().triton_http}")


def triton_repository() -> Path:
    return Path(os.environ.get("TUNESHIP_TRITON_REPOSITORY", home() / "triton" / "models"))


CLOCK_SCHEDULES = "TUNESHIP_CLOCK_SCHEDULES"


def clock_schedules() -> bool:
    """Whether the DAGs' clock schedules create runs (the nightly validation and batch
    inference, the hourly drift check): TUNESHIP_CLOCK_SCHEDULES=on (the default) or off.
    `make demo` turns them off in the stack it starts, since it triggers every run itself: an
    hour boundary crossed mid-demo would otherwise add a drift check of every task beside its
    critical path, and unpausing would start the latest nightly and hourly intervals at once.
    Asset triggers (landed data, validated datasets, retrain requests, candidates) are
    unaffected. Read where the DAG files are parsed."""
    value = os.environ.get(CLOCK_SCHEDULES, "on").strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"{CLOCK_SCHEDULES} must be 'on' or 'off', got {value!r}")
    return value == "on"
