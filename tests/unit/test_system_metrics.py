"""System metrics of the fine-tune: sampled by the trainer, logged on the registered MLflow run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ml_fixtures import base_model, dataset, finetuned

from tuneship.train.sysmetrics import SystemSampler

FIELDS = {"cpu_utilization_percentage", "system_memory_usage_megabytes",
          "system_memory_usage_percentage", "process_rss_megabytes"}


def test_sampler_samples_by_step_and_keeps_an_interrupted_attempts_samples():
    earlier = [{"step": 3, "timestamp": 1, "cpu_utilization_percentage": 50.0}]
    step = {"now": 4}
    sampler = SystemSampler(step=lambda: step["now"], interval=0.05, samples=earlier).start()
    time.sleep(0.3)
    step["now"] = 9
    time.sleep(0.2)
    samples = sampler.stop()
    assert samples[0] == earlier[0]
    mine = samples[1:]
    assert len(mine) >= 4  # start, several ticks, stop
    assert mine[0]["step"] == 4 and mine[-1]["step"] == 9
    assert [s["timestamp"] for s in mine] == sorted(s["timestamp"] for s in mine)
    for s in mine:
        assert FIELDS <= s.keys()
        assert 0.0 <= s["cpu_utilization_percentage"] <= 100.0
        assert 0.0 < s["system_memory_usage_percentage"] <= 100.0
        assert s["process_rss_megabytes"] > 10 and s["system_memory_usage_megabytes"] > 0
    n = len(samples)
    time.sleep(0.15)
    assert len(sampler.snapshot()) == n, "the thread must stop with stop()"


def test_registered_finetune_run_has_system_metrics(tmp_path_factory):
    from tuneship import registry
    from tuneship.stages import register_training
    from tuneship.train.recipe import default_recipe_path

    out = finetuned(tmp_path_factory)
    metrics = json.loads((out / "metrics.json").read_text())
    system = metrics["system"]
    assert len(system) >= 2
    assert system[0]["step"] == 0 and system[-1]["step"] == metrics["steps"]

    data = dataset(tmp_path_factory)
    plan = {
        "task": "triage",
        "registered_model": "tuneship-sysmetrics-test",
        "output_dir": str(out),
        "recipe": str(default_recipe_path()),
        "overrides": {"base_model": str(base_model(tmp_path_factory))},
        "base_model": str(base_model(tmp_path_factory)),
        "run_key": "manual__2026-11-22T12:00:00+00:00",
        "dataset": {"version_id": "sysmetrics0001", "manifest_uri": str(Path(data) / "manifest.json"),
                    "path": str(data)},
        "runner": "local",
        "trigger": "manual",
    }
    candidate = register_training(plan)
    c = registry.client()
    run = c.get_run(candidate["run_id"])
    logged = {k for k in run.data.metrics if k.startswith("system/")}
    assert {f"system/{f}" for f in FIELDS} <= logged
    cpu = c.get_metric_history(candidate["run_id"], "system/cpu_utilization_percentage")
    assert sorted(m.step for m in cpu) == [s["step"] for s in system]
    assert sorted(m.timestamp for m in cpu) == [s["timestamp"] for s in system]
    rss = c.get_metric_history(candidate["run_id"], "system/process_rss_megabytes")
    assert max(m.value for m in rss) == max(s["process_rss_megabytes"] for s in system) > 10
