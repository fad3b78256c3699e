"""Fixtures for integration tests: the real tritonserver and real gateway processes on loopback.

* `triton` (session): tritonserver on free ports with a tmp model repository holding copies
  of tests/fixtures/triton_models/echo_llm as llm_blue, llm_green, llm_slow (1 s delay) and
  llm_stream (decoupled: streams word by word behind a gate file), all loaded; a test adds
  more under other names with `triton.add_echo_model(name)` (a second task's colours). The binary is installed once into a shared, git-ignored home
  (env TUNESHIP_TEST_TRITON_HOME, set by tests/conftest.py to the checkout's home, where
  `make install` already put it) -- only a bare checkout downloads it (~55 MB) here.
* `start_gateway` (function): starts `python -m serving.gateway` subprocesses on free ports,
  each with its own (or a shared) TUNESHIP_HOME, and stops them (SIGTERM, so the inference
  log is flushed) at teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from ports import free_port

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `serving` lives at the repo root (not an installed package)
    sys.path.insert(0, str(REPO))

from triton_server import start_triton  # noqa: E402

from tuneship import tritonserver  # noqa: E402

ECHO_MODEL = REPO / "tests" / "fixtures" / "triton_models" / "echo_llm"
MODELS = {"llm_blue": 0, "llm_green": 0, "llm_slow": 1000, "llm_stream": 0, "llm_gated": 0}  # name -> delay_ms
DECOUPLED = {"llm_stream"}  # streams one word per response, like the compiled model
GATED = {"llm_stream", "llm_gated"}  # hold answers until the test creates `<model dir>/gate`


def copy_echo_model(repository: Path, name: str, delay_ms: int = 0, decoupled: bool = False,
                    gated: bool = False) -> Path:
    """A copy of the echo model; `decoupled` makes it stream like the compiled model. `gated`
    adds a gate file `<model dir>/gate`: until it exists a streaming model holds every word
    after the first, and a plain one holds its whole answer (for at most 20 s)."""
    dest = repository / name
    shutil.copytree(ECHO_MODEL, dest, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = dest / "config.pbtxt"
    text = cfg.read_text()
    if delay_ms:
        text = text.replace('string_value: "0"', f'string_value: "{delay_ms}"')
    if decoupled:
        text += (
            '\nmodel_transaction_policy { decoupled: true }\n'
            'input [ { name: "STREAM" data_type: TYPE_BOOL dims: [ 1 ] optional: true } ]\n'
        )
    if gated:
        text += f'\nparameters: {{ key: "gate_file" value: {{ string_value: "{dest / "gate"}" }} }}\n'
    cfg.write_text(text)
    return dest


@dataclass
class Triton:
    server: tritonserver.TritonServer

    @property
    def url(self) -> str:  # host:port
        return self.server.url

    def load(self, model: str) -> None:
        r = httpx.post(f"http://{self.url}/v2/repository/models/{model}/load", timeout=120)
        assert r.status_code == 200, r.text

    def add_echo_model(self, name: str) -> None:
        """Copy the echo model under another name (e.g. a second task's `faq_blue`) and load
        it; a model already there is only (re)loaded."""
        if not (self.server.repository / name).exists():
            copy_echo_model(self.server.repository, name)
        self.load(name)


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    repo = tmp_path_factory.mktemp("triton_repo")
    for name, delay in MODELS.items():
        copy_echo_model(repo, name, delay, decoupled=name in DECOUPLED, gated=name in GATED)
    server = start_triton(repo, tmp_path_factory.mktemp("triton_log") / "triton.log")
    t = Triton(server)
    try:
        threads = [threading.Thread(target=t.load, args=(m,)) for m in MODELS]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for m in MODELS:
            assert httpx.get(f"http://{t.url}/v2/models/{m}/ready").status_code == 200, m
        yield t
    finally:
        server.stop()


@dataclass
class Gateway:
    url: str
    home: Path
    port: int
    replica: str
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def admin_token(self) -> str:
        return self.env.get("TUNESHIP_GATEWAY_ADMIN_TOKEN") or (self.home / "gateway" / "admin_token").read_text().strip()

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    @property
    def log_root(self) -> Path:
        return self.home / "inference_log"

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        """SIGTERM (graceful: mirror drained, inference log flushed), then wait. uvicorn
        re-raises the signal after a clean shutdown, so the return code is -SIGTERM (or 0)."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def wait_live(self, timeout: float = 60) -> Gateway:
        return wait_live(self, timeout)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def keys_path(self) -> Path:
        return self.home / "gateway" / "api_keys.json"

    def create_key(self, name: str = "test", rpm: int = 0, burst: int | None = None) -> tuple[str, str]:
        """(key id, key) issued into this gateway's keys file (what the keys CLI does)."""
        from serving.gateway.keys import KeyStore

        rec, key = KeyStore(self.keys_path).create(name, rpm, burst)
        return rec.id, key

    def keys_cli(self, *args: str) -> subprocess.CompletedProcess:
        """`python -m serving.gateway.keys ARGS` against this gateway's home."""
        return subprocess.run([sys.executable, "-m", "serving.gateway.keys", *args], cwd=REPO,
                              env={**os.environ, "TUNESHIP_HOME": str(self.home)},
                              capture_output=True, text=True, timeout=60)


def spawn_gateway(triton: Triton, home: Path, log_dir: Path, replica: str, **env: str) -> Gateway:
    """Start `python -m serving.gateway` on a free port; returns before it is live."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = log_dir / f"gateway-{replica}-{port}.log"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNESHIP_", "OPENAI_"))}
    extra = {
        "TUNESHIP_HOME": str(home),
        "TUNESHIP_TRITON_URL": triton.url,
        "TUNESHIP_GATEWAY_REPLICA_ID": replica,
        "TUNESHIP_GATEWAY_SHADOW_DRAIN_S": "3",
        **env,
    }
    child_env.update(extra)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving.gateway", "--port", str(port), "--log-level", os.environ.get("TUNESHIP_TEST_GATEWAY_LOG_LEVEL", "warning")],
            cwd=REPO, env=child_env, stdout=log, stderr=subprocess.STDOUT,
        )
    return Gateway(f"http://127.0.0.1:{port}", home, port, replica, proc, log_path, extra)


def wait_live(gw: Gateway, timeout: float = 60) -> Gateway:
    """Block until the gateway answers /health/live (fails fast if the process exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gw.proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {gw.proc.returncode}:\n{gw.logs()}")
        try:
            if httpx.get(f"{gw.url}/health/live", timeout=1).status_code == 200:
                return gw
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"gateway not live on {gw.url}:\n{gw.logs()}")


def _stop_all(gateways: list[Gateway]) -> None:
    for gw in gateways:
        gw.terminate()
    for gw in gateways:
        gw.stop()


@pytest.fixture
def start_gateway(triton: Triton, tmp_path: Path) -> Iterator:
    """Factory: start_gateway(home=None, replica=None, wait=True, **env) -> Gateway.
    With wait=False, call `gw.wait_live()` yourself (lets several start in parallel)."""
    started: list[Gateway] = []

    def start(home: Path | None = None, replica: str | None = None, wait: bool = True, **env: str) -> Gateway:
        gw = spawn_gateway(triton, home or tmp_path / "home", tmp_path, replica or f"gw{len(started)}", **env)
        started.append(gw)
        return wait_live(gw) if wait else gw

    yield start
    _stop_all(started)


@pytest.fixture
def gateway(start_gateway) -> Gateway:
    """A fresh gateway with a fresh home (no routes yet)."""
    return start_gateway()


@pytest.fixture(scope="module")
def shared_gateway(triton: Triton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway for the tests that set the whole routing state themselves and look only at
    their own requests (metric deltas, log records by request id): saves process starts."""
    d = tmp_path_factory.mktemp("shared_gw")
    gw = wait_live(spawn_gateway(triton, d / "home", d, "shared"))
    yield gw
    _stop_all([gw])


@pytest.fixture
def release_stack(triton, start_gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Factory: release_stack(registered_model) -> (gateway, TritonControl, [v1, v2]): a fresh
    home and gateway on the session's Triton, and two registered versions to release. The
    echo models a test unloads are loaded again afterwards, as the other tests expect."""
    from tuneship import registry
    from tuneship.triton_control import TritonControl

    control = TritonControl(triton.url)

    def make(name: str) -> tuple[Gateway, TritonControl, list[str]]:
        home = tmp_path / "home"
        monkeypatch.setenv("TUNESHIP_HOME", str(home))
        monkeypatch.setenv("TUNESHIP_TRITON_REPOSITORY", str(triton.server.repository))
        gw = start_gateway(home=home)
        versions = []
        for key in (f"{name}-v1", f"{name}-v2"):
            run_id = registry.start_run(key, run_name=key)
            versions.append(registry.register(run_id, key, tags={}, name=name).version)
        return gw, control, versions

    yield make
    for model in ("llm_blue", "llm_green", "llm_slow"):
        if not control.is_ready(model):
            control.load(model)
