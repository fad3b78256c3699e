"""The `tuneship` console script, run as a subprocess (.venv/bin/tuneship) the way a CI job
runs it, against a real gateway (status, rollback, client keys) and a real Airflow (trigger
and wait: the API server, scheduler and dag-processor of the embedded default on free ports).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from envs import override_env
from ports import free_port

pytestmark = pytest.mark.integration

TUNESHIP = str(Path(sys.executable).parent / "tuneship")
PROMPT = "Ticket: I was charged twice for my order\nTriage:"


def route(colour: str, version: str) -> dict:
    return {"colour": colour, "model": f"llm_{colour}", "version": version, "registered_model": "triage-llm",
            "deployed_at": "2025-01-02T03:04:05+00:00"}


def cli(*args: str, env: dict[str, str], timeout: float = 120, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`tuneship ARGS` with only the given TUNESHIP_* variables (no user config, no local home)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TUNESHIP_", "AIRFLOW"))}
    return subprocess.run([TUNESHIP, *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=timeout, input=stdin if stdin is not None else "")


@pytest.fixture
def gw_env(gateway, tmp_path: Path) -> dict[str, str]:
    return {"TUNESHIP_GATEWAY_URL": gateway.url, "TUNESHIP_GATEWAY_ADMIN_TOKEN": gateway.admin_token,
            "TUNESHIP_HOME": str(tmp_path / "cli-home"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}


def put(gateway, body: dict) -> None:
    r = httpx.put(f"{gateway.url}/admin/routes", headers=gateway.admin, json=body, timeout=10)
    assert r.status_code == 200, r.text


def test_status_and_rollback(gateway, gw_env):
    # Nothing kept for rollback yet: a clear refusal (3), nothing changes.
    put(gateway, {"live": route("blue", "1")})
    r = cli("rollback", "--yes", env=gw_env)
    assert r.returncode == 3 and "nothing to roll back to" in r.stderr

    put(gateway, {"live": route("green", "2"), "shadow": route("blue", "3"), "canary_weight": 10})
    r = cli("status", env=gw_env)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.strip()}
    assert "green" in lines["live"] and "v2" in lines["live"]
    assert "blue" in lines["shadow"] and "v3" in lines["shadow"]
    assert "blue" in lines["rollback"] and "v1" in lines["rollback"]
    assert "canary 10%" in r.stdout
    status = json.loads(cli("status", "--json", env=gw_env).stdout)
    assert status["routes"]["live"]["colour"] == "green" and status["routes"]["previous"]["version"] == "1"
    assert status["version"]["version"] == "2" and status["version"]["shadow"] == {"colour": "blue", "version": "3"}

    # Not a terminal and no --yes: refuse (2) rather than hang on a question.
    r = cli("rollback", env=gw_env)
    assert r.returncode == 2 and "--yes" in r.stderr
    assert httpx.get(f"{gateway.url}/version").json()["colour"] == "green"

    r = cli("rollback", "--yes", "--json", env={**gw_env, "TUNESHIP_ACTOR": "ops-ana"})
    assert r.returncode == 0, r.stderr
    new = json.loads(r.stdout)
    assert new["live"]["colour"] == "blue" and new["previous"]["colour"] == "green"
    assert httpx.get(f"{gateway.url}/version").json()["version"] == "1"
    # Traffic follows.
    answer = httpx.post(f"{gateway.url}/v1/completions", json={"model": "tuneship", "prompt": PROMPT}, timeout=30)
    assert "[llm_blue]" in answer.json()["choices"][0]["text"]
    # A person's rollback is in the gateway's audit trail, under their name (the CLI says who)
    from tuneship import audit

    trail = gateway.home / "audit" / "audit.jsonl"
    (rec,) = audit.read(path=trail)
    assert (rec["action"], rec["actor"], rec["version"]) == ("rollback", "ops-ana", "1"), rec
    assert "by hand" in rec["reason"] and audit.verify(trail).ok


def test_wrong_admin_token_is_a_service_refusal(gateway, gw_env):
    r = cli("status", env={**gw_env, "TUNESHIP_GATEWAY_ADMIN_TOKEN": "x" * 32})
    assert r.returncode == 3 and "HTTP 401" in r.stderr
    r = cli("status", env={**gw_env, "TUNESHIP_GATEWAY_URL": f"http://127.0.0.1:{free_port()}"})
    assert r.returncode == 3 and "no answer" in r.stderr


def test_keys_create_list_revoke(gateway, gw_env):
    put(gateway, {"live": route("blue", "1")})
    r = cli("keys", "create", "--name", "ci-bot", "--rpm", "0", env=gw_env)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    m = re.fullmatch(r"sk-ts-([0-9a-f]{8})-[A-Za-z0-9_-]{43}", key)
    assert m, r.stdout
    key_id = m.group(1)
    assert key_id in r.stderr and key not in r.stderr  # the key only once, on stdout

    # The gateway's own KeyStore wrote it: hashed on disk, never in clear.
    stored = json.loads(gateway.keys_path.read_text())["keys"][key_id]
    assert stored["name"] == "ci-bot" and key.split("-")[-1] not in gateway.keys_path.read_text()

    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)
    assert client.completions.create(model="tuneship", prompt=PROMPT).choices[0].text

    listed = json.loads(cli("keys", "list", "--json", env=gw_env).stdout)
    assert [(k["id"], k["name"], k["rpm"], k["disabled"]) for k in listed] == [(key_id, "ci-bot", 0, False)]
    assert all("sha256" not in k and "key" not in k for k in listed)
    text = cli("keys", "list", env=gw_env).stdout
    assert key_id in text and "active" in text and stored["sha256"] not in text

    r = cli("keys", "revoke", key_id, env=gw_env)
    assert r.returncode == 0 and "revoked" in r.stderr
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="tuneship", prompt=PROMPT)
    assert json.loads(cli("keys", "list", "--json", env=gw_env).stdout)[0]["disabled"] is True
    r = cli("keys", "revoke", "ffffffff", env=gw_env)
    assert r.returncode == 3 and "No client key with id ffffffff" in r.stderr


def test_admin_keys_api_needs_the_admin_token(gateway):
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("DELETE", "/admin/keys/abcdef01")):
        r = httpx.request(method, f"{gateway.url}{path}", json={"name": "x"} if method == "POST" else None)
        assert r.status_code == 401, (method, path, r.text)
    r = httpx.post(f"{gateway.url}/admin/keys", headers=gateway.admin, json={"name": "x", "rpm": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rpm"
    assert not gateway.keys_path.exists()


# -- trigger / wait against a real Airflow ---------------------------------------------------------
AIRFLOW = ["airflow-api-server", "airflow-scheduler", "airflow-dag-processor"]


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Airflow of the embedded default in its own home on a free port; the CLI finds it (URL
    and admin password) the way it finds `make up`'s. Retries wait 1 s instead of 5 min."""
    from tuneship import services
    from tuneship.airflow_api import AirflowAPI
    from tuneship.runwatch import RunWatcher

    home = tmp_path_factory.mktemp("cli-airflow")
    env = {"TUNESHIP_HOME": str(home), "TUNESHIP_PORT_AIRFLOW": str(free_port()),
           "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "1", "XDG_CONFIG_HOME": str(home / "xdg")}
    with override_env(**env):
        try:
            services.start(AIRFLOW, timeout=240)
            api = AirflowAPI(f"http://127.0.0.1:{env['TUNESHIP_PORT_AIRFLOW']}", services.ADMIN_USER,
                             services.admin_password())
            watcher = RunWatcher(api, 240, emit=lambda _: None, poll_s=1.0)
            while "llm_data_validation" not in api.dags():
                assert not api.import_errors(), api.import_errors()
                watcher.tick("llm_data_validation to be parsed")
            yield env
        finally:
            services.stop(AIRFLOW)


def test_trigger_failing_run_exits_1_with_the_tasks_reason(airflow_env, tmp_path):
    missing = tmp_path / "no-such-batch"
    r = cli("trigger", "llm_data_validation", "--task", "triage", "--param", f"dataset_uri={missing}", "--unpause",
            "--poll", "1", "--timeout", "240", "--json", env=airflow_env, timeout=300)
    assert r.returncode == 1, r.stderr
    result = json.loads(r.stdout)
    assert result["state"] == "failed" and result["run_id"] in r.stderr
    # Progress lines as the task changed state (a try that fails within one poll is never seen
    # running; its final state always is), then the reason: the failing task and its log.
    assert "llm_data_validation.validate_and_version: failed" in r.stderr
    assert "FAILED task validate_and_version (try 2)" in r.stderr
    [failed] = result["failed_tasks"]
    assert failed["task_id"] == "validate_and_version"
    assert any(str(missing) in line for line in failed["log_tail"]), failed["log_tail"]


def test_trigger_no_wait_then_runs_wait_succeeds_with_a_token(airflow_env):
    from tuneship import services

    with override_env(**airflow_env):
        password = services.admin_password()
    url = f"http://127.0.0.1:{airflow_env['TUNESHIP_PORT_AIRFLOW']}"
    token = httpx.post(f"{url}/auth/token", json={"username": "admin", "password": password}).json()["access_token"]
    # A CI job with only a URL and a token (no local home to read a password from).
    env = {"TUNESHIP_AIRFLOW_URL": url, "TUNESHIP_AIRFLOW_TOKEN": token, "XDG_CONFIG_HOME": airflow_env["XDG_CONFIG_HOME"]}
    # Empty incoming location: the task skips and the run succeeds.
    r = cli("trigger", "llm_data_validation", "--unpause", "--no-wait", env=env)
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip()
    assert run_id and "\n" not in run_id
    r = cli("runs", "wait", "llm_data_validation", run_id, "--poll", "1", "--timeout", "240", "--json",
            env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "success"
    assert "validate_and_version: skipped" in r.stderr


def test_trigger_unknown_dag_and_paused_dag_are_refused(airflow_env):
    r = cli("trigger", "llm_no_such_dag", env=airflow_env)
    assert r.returncode == 3 and "no DAG 'llm_no_such_dag'" in r.stderr
    r = cli("trigger", "llm_drift_monitor", env=airflow_env)  # paused at creation
    assert r.returncode == 3 and "is paused" in r.stderr and "--unpause" in r.stderr
