"""llm_drift_monitor's check (`tuneship.stages.check_drift`) on a real registry (MLflow on
SQLite), a real inference log and the real all-MiniLM-L6-v2: the embedding and answer tests
fire on drifted traffic and not on traffic like the training data, the governor holds a
second request until the drift clears, and every decision is in the task's decision log."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tuneship import audit, monitor, registry
from tuneship.inference_log import format_ts, parse_ts, partition_file
from tuneship.profile import text_profile
from tuneship.stages import check_drift
from tuneship.tasks import load_task


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path))
    return tmp_path


def write_requests(task, version: str, prompts: list[str], answer: str, *, start: float,
                   feedback=None) -> None:
    """Request lines one second apart; `feedback(i)`: (the answer's confidence, the user's task
    success) for request i, written as the gateway logs them (same client key), or None."""
    for i, prompt in enumerate(prompts):
        ts = parse_ts(start + i)
        path = partition_file(Path(monitor.log_root()), ts, "gw0", task.served_model)
        path.parent.mkdir(parents=True, exist_ok=True)
        live = {"colour": "blue", "version": version, "completion": answer, "latency_ms": 300.0, "status": 200}
        verdict = feedback(i) if feedback else None
        if verdict is not None:
            live["confidence"] = verdict[0]
        rid = f"{start}-{i}"
        with open(path, "a") as f:
            f.write(json.dumps({"kind": "request", "ts": format_ts(ts), "request_id": rid, "key_id": "k1",
                                "served_model": task.served_model, "prompt": prompt, "shadow": None,
                                "live": live}) + "\n")
            if verdict is not None:
                f.write(json.dumps({"kind": "feedback", "ts": format_ts(parse_ts(start + i + 0.5)),
                                    "feedback_id": f"f{rid}", "request_id": rid, "key_id": "k1", "rating": None,
                                    "task_success": verdict[1], "comment": None}) + "\n")


def champion_of(task, home: Path) -> str:
    """A champion trained on the triage generator's data, promoted two hours ago."""
    paths = task.resolve(task.demo.generator)(home / "dataset", 300, 10, 0)
    prompts = [json.loads(line)["prompt"] for line in Path(paths["train"]).read_text().splitlines()]
    manifest = home / "dataset" / "manifest.json"
    manifest.write_text(json.dumps({"reference": text_profile(prompts)}))
    run_id = registry.start_run("drift-check-champion", run_name="drift-check-champion")
    registry.log_metrics(run_id, {"final_wall_s": 1800.0})
    promoted = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 7200))
    mv = registry.register(run_id, "drift-check-champion", name=task.registered_model,
                           tags={"dataset_manifest": str(manifest), "dataset_version": "v1", "promoted_at": promoted})
    registry.set_alias("champion", mv.version, task.registered_model)
    return mv.version


@pytest.mark.parametrize("drift", [0.0, 1.0])
def test_drift_tests_fire_on_drifted_traffic_only_and_the_governor_records_why(home: Path, drift: float):
    task = load_task("triage")
    version = champion_of(task, home)
    traffic = task.resolve(task.demo.traffic)
    now = time.time()
    # its first hour live (the answers' reference), then the last half hour
    write_requests(task, version, traffic(150, seed=1), " category=billing priority=normal", start=now - 7000)
    answer = " category=technical priority=high" if drift else " category=billing priority=normal"
    write_requests(task, version, traffic(150, seed=2, drift=drift), answer, start=now - 1800)
    kwargs = {"window_hours": 1.0, "threshold": 10.0, "min_requests": 50, "debounce": 1, "cooldown_hours": 0.0}
    first = check_drift(task, run_id="check-1", **kwargs)  # the profile score alone never fires at 10
    tests = first["tests"]
    assert tests["family_size"] >= 4 and tests["method"] == "holm"
    drifted = set(tests["drifted_features"])
    if not drift:
        assert not first["fire"] and drifted == set() and first["reason"].startswith("no drift"), first
        return
    assert first["fire"] and {"prompt_embedding", "label:category"} <= drifted, tests["features"]
    assert any(w.startswith("prompt_embedding: MMD") for w in first["why"]) and Path(tests["chart"]).exists()
    assert first["retrain_gpu_hours"] == pytest.approx(0.5)  # 1,800 s of training on one GPU
    second = check_drift(task, run_id="check-2", **kwargs)  # still drifted, no new version yet
    assert not second["fire"] and second["reason"].startswith("hysteresis"), second["reason"]
    log = monitor.read_decisions(task.name)
    assert [d["fire"] for d in log] == [True, False] and log[1]["reason"] == second["reason"]
    assert log[0]["why"] == first["why"] and log[0]["state"]["open_retrain"]["latest_version"] == int(version)
    # and in the audit trail, the governor as the actor: requested, then refused with its reason
    trail = audit.read(task="triage")
    assert [(r["action"], r["actor"]) for r in trail] == [("retrain_requested", "governor"),
                                                          ("retrain_refused", "governor")]
    assert trail[1]["reason"] == second["reason"] and trail[0]["figures"]["requests"] == first["requests"]



def test_calibration_drift_alone_fires_the_retrain_and_says_so(home: Path):
    """The prompts and the answers look as they did, but users now say the answers fail where
    the model is as sure of them as ever: the calibration test alone fires, and the reason
    names it with its figures. Without feedback in the first window it is reported untested."""
    import random

    task = load_task("triage")
    version = champion_of(task, home)
    traffic = task.resolve(task.demo.traffic)
    rng = random.Random(5)
    now = time.time()
    answer = " category=billing priority=normal"

    def verdicts(success: float):
        return lambda i: (round(min(1.0, rng.gauss(0.85, 0.05)), 4), rng.random() < success)

    write_requests(task, version, traffic(150, seed=1), answer, start=now - 7000, feedback=verdicts(0.85))
    write_requests(task, version, traffic(150, seed=2), answer, start=now - 1800, feedback=verdicts(0.45))
    kwargs = {"window_hours": 1.0, "threshold": 10.0, "min_requests": 50, "debounce": 1, "cooldown_hours": 0.0}
    out = check_drift(task, run_id="calibration", **kwargs)
    tests = out["tests"]
    assert out["fire"] and tests["drifted_features"] == ["calibration_gap"], tests["features"]
    (row,) = [f for f in tests["features"] if f["feature"] == "calibration_gap"]
    assert row["n_reference"] == row["n_current"] == 150 and row["effect"] > 0.25
    assert row["current_value"]["task_success"] < 0.6 < row["reference_value"]["task_success"]
    assert any(w.startswith("calibration_gap: Welch t") for w in out["why"]), out["why"]


def test_calibration_without_feedback_in_the_first_window_is_untested(home: Path):
    task = load_task("triage")
    version = champion_of(task, home)
    traffic = task.resolve(task.demo.traffic)
    now = time.time()
    answer = " category=billing priority=normal"
    write_requests(task, version, traffic(150, seed=1), answer, start=now - 7000)
    write_requests(task, version, traffic(150, seed=2), answer, start=now - 1800,
                   feedback=lambda i: (0.9, i % 2 == 0))
    out = check_drift(task, run_id="no-feedback", window_hours=1.0, threshold=10.0, min_requests=50, debounce=1,
                      cooldown_hours=0.0)
    assert not out["fire"] and "calibration_gap" in out["tests"]["untested"]
    (row,) = [f for f in out["tests"]["features"] if f["feature"] == "calibration_gap"]
    assert "reference 0, current 150" in row["note"]
