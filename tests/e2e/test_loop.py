"""The whole loop through Airflow's real scheduler and triggerer, as `make demo` runs it,
then the release's failure paths on the same stack.

Own TUNESHIP_HOME and its own ports, so it runs beside a `make up` stack. Asserts on what a
platform engineer would check afterwards: the DAG runs, the registry aliases, what the
gateway serves, the inference log, the Slack sink and the report.

After the demo's two promotions (`--keep` leaves the services up) three refusals run
through the REST API, the scheduler and the triggerer: a candidate that fails its gates, the
same candidate released by hand failing smoke, and a good version rolled back by the shadow
verdict. Each must fail its run once (try 1, never up_for_retry) with one Slack alert,
while live traffic and `@champion` stay where they were.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from envs import override_env

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

PORTS = {"AIRFLOW": 18080, "MLFLOW": 15000, "TRITON_HTTP": 18000, "TRITON_GRPC": 18001,
         "TRITON_METRICS": 18002, "GATEWAY": 18100}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e-home")
    # The triage task's whole loop on the real LLM (data cycle, drift cycle, failure paths);
    # `make demo` also runs the faq task's cycle (README, Figures): CI time is the budget.
    env = dict(os.environ, TUNESHIP_HOME=str(home), PYTHONUNBUFFERED="1", TUNESHIP_DEMO_TASKS="triage")
    env.update({f"TUNESHIP_PORT_{k}": str(v) for k, v in PORTS.items()})
    shared = os.environ["TUNESHIP_TEST_TRITON_HOME"]
    # Reuse the checkout's Triton install when there is one (no second download).
    if (Path(shared) / "triton" / "server" / "INSTALLED").exists():
        (home / "triton").mkdir(parents=True)
        for part in ("server", "pyenv"):
            (home / "triton" / part).symlink_to(Path(shared) / "triton" / part)
    subprocess.run([sys.executable, "-m", "tuneship.tritonserver", "install"], env=env, check=True, cwd=REPO)
    try:
        # --keep: the failure paths below run on the same services; the teardown stops them
        proc = subprocess.run([sys.executable, "-m", "tuneship.demo", "--shadow-hours", "0.008", "--timeout", "2400",
                               "--keep"], env=env, cwd=REPO, capture_output=True, text=True, timeout=2600)
        print(proc.stdout[-20000:])
        print(proc.stderr[-5000:])
        summary_path = home / "reports" / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        yield {"proc": proc, "home": home, "summary": summary, "env": env}
    finally:
        subprocess.run([sys.executable, "-m", "tuneship.services", "down"], env=env, cwd=REPO, timeout=120)


def cycle(demo, task: str, trigger: str) -> dict[str, Any]:
    """The demo's cycle for `task` started by `trigger` (llm_data_validation or llm_drift_monitor)."""
    (found,) = [c for c in demo["summary"]["cycles"] if c["task"] == task and c["trigger"] == trigger]
    return found


def test_demo_exits_zero_with_summary(demo):
    out = demo["proc"].stdout
    assert demo["proc"].returncode == 0, out[-6000:] + demo["proc"].stderr[-3000:]
    assert "Tuneship demo OK" in out and "live model (triage):" in out
    assert "drift score" in out
    reports = list((demo["home"] / "reports").glob("demo-*.html"))
    assert reports and "Evaluation gates" in reports[0].read_text()


@pytest.mark.parametrize("task, metric", [("triage", "triage/category_accuracy")])
def test_first_cycle_promoted_and_serving(demo, task, metric):
    """On the real LLM: the fine-tune beats the base model on the task's own gates, and the
    release promotes it after its shadow window."""
    c1 = cycle(demo, task, "llm_data_validation")
    assert c1["llm_data_validation"]["state"] == "success"
    assert c1["finetune"]["state"] == "success"
    gates = c1["finetune"]["gates"]
    assert gates["passed"] and gates["reference_name"] == "base model"
    assert gates["metrics"][metric] > gates["reference"][metric]
    # decided on intervals: every gate passed with its bounds, and the paired difference's too
    assert {r["verdict"] for r in gates["gates"]} == {"pass"}, gates["gates"]
    assert all(r["low"] <= r["value"] <= r["high"] for r in gates["gates"] if r["n"])  # n 0: nothing to keep
    assert any(r["rule"] == "kept >=" and "got no case right" in r["reason"] for r in gates["gates"])
    assert all(r["diff_low"] >= r["threshold"] if r["higher_is_better"] else r["diff_high"] <= r["threshold"]
               for r in gates["gates"] if r["rule"] == "vs reference")  # ECE, Brier: lower is better
    assert c1["release"]["decision"]["decision"] == "promoted"
    assert c1["release"]["verdict"]["requests"] >= 20 and c1["release"]["verdict"]["error_rate"] == 0.0
    # the serving gate measured the compiled SmolLM2 in Triton; nothing live yet: its ceilings only
    serving = c1["release"]["serving"]
    assert serving["passed"] and serving["live_model"] is None and serving["requests"] >= 30
    assert {r["metric"] for r in serving["rows"]} == {"cost_per_1k_tokens", "peak_memory_mb"}
    figures = serving["candidate"]
    assert figures["p95_ms_low"] <= figures["p95_ms"] <= figures["p95_ms_high"] and figures["tokens_per_s"] > 1
    assert 200 < figures["peak_memory_mb"] < 2048 and figures["processes"] == 2  # two fp32 SmolLM2 instances


def promoted_version(demo) -> str:
    """What should be live after the demo: the retrain if it was promoted, else cycle 1's."""
    c2 = cycle(demo, "triage", "llm_drift_monitor")
    if c2.get("decision") == "promoted":
        return str(c2["release"]["decision"]["version"])
    return str(cycle(demo, "triage", "llm_data_validation")["release"]["decision"]["version"])


def test_drift_fired_and_second_decision(demo):
    """Drift fires a retrain, which is judged against the champion on the same cases. On a
    real model with a short recipe that is a close call, so both decisions are the loop
    working: promoted after a shadow window, or refused by its gates (one alert, the
    finetune failed at try 1, no release, the champion still live)."""
    c2 = cycle(demo, "triage", "llm_drift_monitor")
    assert c2["drift"]["drifted"] and c2["drift"]["score"] >= c2["drift"]["threshold"]
    v1 = cycle(demo, "triage", "llm_data_validation")["finetune"]["model"]["version"]
    assert c2["finetune"]["model"]["version"] != v1
    # triage.yaml's drift.retrain.warm_start: the retrain continued from the champion's adapter
    assert c2["finetune"]["model"]["init_from"] == f"champion v{v1}", c2["finetune"]["model"]
    assert cycle(demo, "triage", "llm_data_validation")["finetune"]["model"]["init_from"] is None
    assert c2["decision"] in ("promoted", "refused by its gates"), c2
    if c2["decision"] == "promoted":
        assert c2["finetune"]["state"] == "success"
        assert c2["finetune"]["gates"]["reference_name"].startswith("champion")
        assert c2["release"]["verdict"]["slot"] == "shadow"
        # measured against the champion in the same Triton, on the same requests
        serving = c2["release"]["serving"]
        assert serving["passed"] and serving["live_model"].startswith("triage_")
        assert serving["live_model"] != serving["model"]  # the other colour: cycle 1's champion
        ratios = {r["metric"]: r for r in serving["rows"] if r["rule"].startswith("ratio")}
        assert set(ratios) == {"p95_ms", "tokens_per_s", "peak_memory_mb"}
        assert ratios["tokens_per_s"]["diff_low"] >= 0.67 and ratios["p95_ms"]["diff_high"] <= 1.5
    else:
        assert c2["finetune"]["state"] == "failed" and "release" not in c2
        alert = c2["gates_alert"] or ""
        assert "against champion v" in alert and ("FAIL" in alert or "INCONCLUSIVE" in alert), c2


def test_live_route_registry_and_traffic_agree(demo):
    live = demo["summary"]["live"]["triage"]
    promoted = promoted_version(demo)
    assert str(live["version"]) == str(promoted)
    for task, t in demo["summary"]["traffic"].items():
        assert t["failed"] == 0 and t["ok"] > 30, (task, t)
    assert live["served_model"] == "triage" and live["model"] == "tuneship-triage", live
    assert live["triton_model"].startswith("triage_") and live["metadata"]["prompt_format"] == "plain", live
    env = demo["env"]
    code = ("from tuneship import registry; print(registry.by_alias('champion', 'tuneship-triage').version)")
    champ = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert champ.stdout.strip() == str(promoted), champ.stderr[-2000:]


def test_inference_log_and_slack_sink(demo):
    home = demo["home"]
    logs = list((home / "inference_log").rglob("*.jsonl"))
    assert logs
    records = [json.loads(line) for p in logs for line in p.read_text().splitlines() if line.strip()]
    if cycle(demo, "triage", "llm_drift_monitor")["decision"] == "promoted":  # cycle 1 had no live to shadow
        assert any(r.get("shadow") for r in records), "no mirrored request was logged"
    sink = [json.loads(line) for line in (home / "notifications.jsonl").read_text().splitlines()]
    assert any("is live on" in m["text"] for m in sink)
    assert any("Drift on triage champion" in m["text"] for m in sink)


def test_every_version_has_a_model_card_and_every_decision_is_in_the_trail(demo):
    """Each registered triage version got a card from its lineage; the audit trail's chain
    holds and records the loop's decisions, each with its actor."""
    home, env = demo["home"], demo["env"]
    code = ("from tuneship import registry; print(registry.latest_version('tuneship-triage'))")
    latest = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    versions = range(1, int(latest.stdout.strip()) + 1)
    for v in versions:
        card = (home / "reports" / f"model-card-triage-v{v}.html").read_text()
        assert "Intended use" in card and "Gates (95% intervals): passed against" in card, v
    verify = subprocess.run([sys.executable, "-m", "tuneship.audit", "verify"], env=env, capture_output=True,
                            text=True, cwd=REPO)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    records = [json.loads(line) for line in (home / "audit" / "audit.jsonl").read_text().splitlines()]
    actions = {(r["task"], r["action"]) for r in records}
    for action in ("dataset_accepted", "version_registered", "gates_passed", "switch"):
        assert ("triage", action) in actions, (action, sorted(actions))
    switches = [r for r in records if r["action"] == "switch"]
    assert all(r["actor"] == "airflow:llm_release/decide" for r in switches)


def test_post_switch_guard_held_and_previous_colour_retired(demo):
    """Both releases passed the post-switch guard (no automatic rollback), and after cycle 2's
    retention window the colour it replaced was unloaded and cleared from the routes."""
    home = demo["home"]
    routes = json.loads((home / "gateway" / "routes" / "triage.json").read_text())
    assert str(routes["live"]["version"]) == promoted_version(demo)
    assert routes["previous"] is None and routes["shadow"] is None
    sink = [json.loads(line) for line in (home / "notifications.jsonl").read_text().splitlines()]
    assert not [m for m in sink if "post-switch" in m["text"] and m["level"] == "error"]


# ---------------------------------------------------------------- failure paths, same stack


def _champion(env: dict[str, str]) -> str | None:
    code = "from tuneship import registry; c = registry.by_alias('champion', 'tuneship-triage'); print(c.version if c else '')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip() or None


def _sink(home: Path) -> list[dict]:
    return [json.loads(line) for line in (home / "notifications.jsonl").read_text().splitlines() if line.strip()]


def _ready(env: dict[str, str], model: str) -> bool:
    r = httpx.get(f"http://127.0.0.1:{env['TUNESHIP_PORT_TRITON_HTTP']}/v2/models/{model}/ready", timeout=10)
    return r.status_code == 200


def _refusal(api: Any, loop: Any, env: dict[str, str], home: Path, dag_id: str, conf: dict,
             traffic: Any = None) -> dict[str, Any]:
    """Trigger `dag_id` through the REST API, wait for the run, and record what a person would
    check: task states and tries, the routes before/after, @champion, new Slack messages, and
    which release runs exist."""
    routes_file = home / "gateway" / "routes" / "triage.json"  # the triage task's served model
    before = {"routes": routes_file.read_bytes(), "champion": _champion(env), "sink": len(_sink(home)),
              "releases": {r["dag_run_id"] for r in api.runs("llm_release")}}
    if traffic is not None:
        traffic.start()
    try:
        run_id = api.trigger(dag_id, conf)
        run = loop.wait_run(dag_id, run_id)
    finally:
        if traffic is not None:
            traffic.stop()
    tis = {t["task_id"]: t for t in api.task_instances(dag_id, run_id)}
    return {"run_id": run_id, "state": run["state"], "before": before, "routes": routes_file.read_bytes(),
            "tis": {k: (t["state"], t["try_number"]) for k, t in tis.items()},
            "champion": _champion(env), "messages": _sink(home)[before["sink"]:],
            "releases": {r["dag_run_id"] for r in api.runs("llm_release")} - before["releases"] - {run_id}}


@pytest.fixture(scope="module")
def failures(demo) -> dict[str, dict[str, Any]]:
    assert demo["proc"].returncode == 0, "the demo failed; its failure paths cannot run on its stack"
    return run_failure_paths(demo)


def run_failure_paths(demo: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The three refusals, one after the other, on the demo's stack (kept running)."""
    from tuneship import demo as demo_mod
    from tuneship.tasks import load_task

    home, env = demo["home"], demo["env"]
    good = str(cycle(demo, "triage", "llm_data_validation")["finetune"]["model"]["version"])  # since retired
    out: dict[str, dict[str, Any]] = {}
    # this process talks to the demo's stack (config reads TUNESHIP_HOME and the ports)
    with override_env(**{k: v for k, v in env.items() if k.startswith("TUNESHIP_")}):
        api = demo_mod.api_client()
        loop = demo_mod.Loop(api, timeout=1500)
        # a candidate no better than the base model: below the floor and behind the champion
        out["gates"] = _refusal(api, loop, env, home, "llm_finetune",
                                {"task": "triage", "max_steps": 2, "learning_rate": 1e-6})
        bad = str(api.xcom("llm_finetune", out["gates"]["run_id"], "register")["version"])
        out["gates"]["version"] = bad
        # the same candidate released by hand (compiled on demand): it answers garbage
        out["smoke"] = _refusal(api, loop, env, home, "llm_release", {"task": "triage", "version": bad})
        out["smoke"]["colour"] = api.xcom("llm_release", out["smoke"]["run_id"], "plan")["colour"]
        # a good model held to an impossible p95 while clients send traffic: the verdict rolls back
        traffic = demo_mod.Traffic(task=load_task("triage"),
                                   api_key=(home / "gateway" / "client_key").read_text().strip())
        out["shadow"] = _refusal(api, loop, env, home, "llm_release",
                                 {"task": "triage", "version": good, "max_p95_ms": 0.001, "min_requests": 5},
                                 traffic=traffic)
        out["shadow"]["colour"] = api.xcom("llm_release", out["shadow"]["run_id"], "plan")["colour"]
        out["shadow"]["verdict"] = api.xcom("llm_release", out["shadow"]["run_id"], "shadow_window")
        out["shadow"]["traffic"] = {"sent": traffic.sent, "ok": traffic.ok, "failed": traffic.failed}
        for path in ("smoke", "shadow"):
            out[path]["candidate_loaded"] = _ready(env, f"triage_{out[path]['colour']}")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("before", "routes")}
                      for k, v in out.items()}, indent=1, default=str)[-8000:])
    return out


def _failed_once(path: dict[str, Any], task_id: str) -> None:
    assert path["state"] == "failed", path["tis"]
    assert path["tis"][task_id] == ("failed", 1), path["tis"]  # try 1: never up_for_retry
    assert not [t for t, (state, _) in path["tis"].items() if state == "up_for_retry"], path["tis"]


def _errors(path: dict[str, Any]) -> list[dict]:
    assert not [m for m in path["messages"] if m["level"] == "success"], path["messages"]
    return [m for m in path["messages"] if m["level"] == "error"]


def test_failed_gates_fail_the_finetune_once_and_nothing_is_released(failures):
    path = failures["gates"]
    _failed_once(path, "evaluate")
    assert path["tis"]["compile_model"][0] == "upstream_failed"
    assert path["releases"] == set()  # no release_candidate, no llm_release run
    assert path["routes"] == path["before"]["routes"]  # the routes file byte for byte
    assert path["champion"] == path["before"]["champion"]
    (alert,) = _errors(path)
    assert f"v{path['version']} failed its gates" in alert["text"] and "category_accuracy" in alert["text"]


def test_failed_smoke_fails_the_release_once_and_live_never_moves(failures):
    path = failures["smoke"]
    _failed_once(path, "smoke")
    assert path["tis"]["start_shadow"][0] == "upstream_failed"
    assert path["routes"] == path["before"]["routes"]
    assert path["champion"] == path["before"]["champion"]
    assert not path["candidate_loaded"]  # refused and unloaded; live's colour untouched
    (alert,) = _errors(path)
    assert f"v{failures['gates']['version']} failed smoke" in alert["text"] and "live traffic untouched" in alert["text"]


def test_shadow_rollback_fails_the_release_once_and_live_never_moves(failures):
    path = failures["shadow"]
    verdict = path["verdict"]
    assert verdict["verdict"] == "rollback" and verdict["requests"] >= 5, verdict
    assert any("p95" in r for r in verdict["reasons"]), verdict
    assert path["traffic"]["failed"] == 0 and path["traffic"]["ok"] > 0
    _failed_once(path, "decide")
    assert path["tis"]["smoke"][0] == "success" and path["tis"]["post_switch_window"][0] == "upstream_failed"
    before, after = json.loads(path["before"]["routes"]), json.loads(path["routes"])
    assert json.dumps(after["live"], sort_keys=True) == json.dumps(before["live"], sort_keys=True)
    assert after["shadow"] is None and after["previous"] == before["previous"]
    assert path["champion"] == path["before"]["champion"]
    assert not path["candidate_loaded"]
    (alert,) = _errors(path)
    assert "rolled back after the shadow window" in alert["text"] and "p95" in alert["text"]
