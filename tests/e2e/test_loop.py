"""The whole loop through Airflow's real scheduler and triggerer, as `make demo` runs it.

Own TUNESHIP_HOME and its own ports, so it runs beside a `make up` stack. Asserts on what a
platform engineer would check afterwards: the DAG runs, the registry aliases, what the
gateway serves, the inference log, the Slack sink and the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

PORTS = {"AIRFLOW": 18080, "MLFLOW": 15000, "TRITON_HTTP": 18000, "TRITON_GRPC": 18001,
         "TRITON_METRICS": 18002, "GATEWAY": 18100}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e-home")
    env = dict(os.environ, TUNESHIP_HOME=str(home), PYTHONUNBUFFERED="1")
    env.update({f"TUNESHIP_PORT_{k}": str(v) for k, v in PORTS.items()})
    shared = os.environ["TUNESHIP_TEST_TRITON_HOME"]
    # Reuse the checkout's Triton install when there is one (no second download).
    if (Path(shared) / "triton" / "server" / "INSTALLED").exists():
        (home / "triton").mkdir(parents=True)
        for part in ("server", "pyenv"):
            (home / "triton" / part).symlink_to(Path(shared) / "triton" / part)
    subprocess.run([sys.executable, "-m", "tuneship.tritonserver", "install"], env=env, check=True, cwd=REPO)
    proc = subprocess.run([sys.executable, "-m", "tuneship.demo", "--shadow-hours", "0.008", "--timeout", "1300"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=1500)
    print(proc.stdout[-20000:])
    print(proc.stderr[-5000:])
    summary_path = home / "reports" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {"proc": proc, "home": home, "summary": summary, "env": env}


def test_demo_exits_zero_with_summary(demo):
    out = demo["proc"].stdout
    assert demo["proc"].returncode == 0, out[-6000:] + demo["proc"].stderr[-3000:]
    assert "Tuneship demo OK" in out and "live model:" in out and "drift score" in out
    reports = list((demo["home"] / "reports").glob("demo-*.html"))
    assert reports and "Evaluation gates" in reports[0].read_text()


def test_first_cycle_promoted_and_serving(demo):
    c1 = demo["summary"]["cycles"][0]
    assert c1["llm_data_validation"]["state"] == "success"
    assert c1["finetune"]["state"] == "success"
    gates = c1["finetune"]["gates"]
    assert gates["passed"] and gates["reference_name"] == "base model"
    assert gates["metrics"]["category_accuracy"] > gates["reference"]["category_accuracy"]
    assert c1["release"]["state"] == "success"
    assert c1["release"]["decision"]["decision"] == "promoted"
    assert c1["release"]["verdict"]["requests"] >= 20 and c1["release"]["verdict"]["error_rate"] == 0.0


def test_drift_fired_and_second_decision(demo):
    c2 = demo["summary"]["cycles"][1]
    assert c2["drift"]["drifted"] and c2["drift"]["score"] >= c2["drift"]["threshold"]
    assert c2["finetune"]["state"] == "success"
    assert c2["finetune"]["model"]["version"] != demo["summary"]["cycles"][0]["finetune"]["model"]["version"]
    assert c2["finetune"]["gates"]["reference_name"].startswith("champion")
    assert c2["release"]["decision"]["decision"] == "promoted"
    assert c2["release"]["verdict"]["slot"] == "shadow"


def test_live_route_registry_and_traffic_agree(demo):
    live = demo["summary"]["live"]
    c2 = demo["summary"]["cycles"][1]
    promoted = c2["release"]["decision"]["version"]
    assert str(live["version"]) == str(promoted)
    assert demo["summary"]["traffic"]["failed"] == 0 and demo["summary"]["traffic"]["ok"] > 50
    env = demo["env"]
    code = ("from tuneship import registry; print(registry.by_alias('champion').version)")
    champ = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert champ.stdout.strip() == str(promoted), champ.stderr[-2000:]


def test_inference_log_and_slack_sink(demo):
    home = demo["home"]
    logs = list((home / "inference_log").rglob("*.jsonl"))
    assert logs
    records = [json.loads(line) for p in logs for line in p.read_text().splitlines() if line.strip()]
    assert any(r.get("shadow") for r in records), "no mirrored request was logged"
    sink = [json.loads(line) for line in (home / "notifications.jsonl").read_text().splitlines()]
    assert any("is live on" in m["text"] for m in sink)
    assert any("Drift on champion" in m["text"] for m in sink)


def test_post_switch_guard_held_and_previous_colour_retired(demo):
    """Both releases passed the post-switch guard (no automatic rollback), and after cycle 2's
    retention window the colour it replaced was unloaded and cleared from the routes."""
    home = demo["home"]
    routes = json.loads((home / "gateway" / "routes.json").read_text())
    promoted = demo["summary"]["cycles"][1]["release"]["decision"]
    assert str(routes["live"]["version"]) == str(promoted["version"])
    assert routes["live"]["colour"] == promoted["colour"]
    assert routes["previous"] is None and routes["shadow"] is None
    sink = [json.loads(line) for line in (home / "notifications.jsonl").read_text().splitlines()]
    assert not [m for m in sink if "post-switch" in m["text"] and m["level"] == "error"]
