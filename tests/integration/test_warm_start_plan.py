"""Which adapter a fine-tune plan starts from (MLflow's embedded SQLite store, real client):
a drift retrain of a task with `drift.retrain.warm_start` continues from its champion's
adapter, anything else starts from a fresh LoRA, and so does a retrain whose champion
cannot be continued (another base model, another LoRA shape, no champion)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from tuneship import registry
from tuneship.stages import base_model_for, finetune_plan
from tuneship.tasks import load_task


@pytest.fixture(scope="module")
def task():
    """The triage task under its own name and registered model (its registry cache and
    versions stay apart from other tests')."""
    return load_task("triage").model_copy(update={"name": "warmtest", "registered_model": "tuneship-warm-test"})


def _champion(task, tmp_path: Path, *, r: int, base: str) -> str:
    out = tmp_path / "train"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (out / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"r": r, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))
    (out / "metrics.json").write_text(json.dumps({"train_loss": 0.1, "history": []}))
    key = f"manual__warm-{tmp_path.name}"
    run_id = registry.start_run(key, run_name="ft")
    registry.log_training(run_id, params={}, train_out=out, dataset={"path": str(tmp_path), "version_id": "d1"},
                          dataset_name="warm-test")
    mv = registry.register(run_id, key, tags={"base_model": base}, name=task.registered_model)
    registry.set_alias("champion", mv.version, task.registered_model)
    return mv.version


def _plan(task, tmp_path: Path, trigger: str, **params):
    dataset = {"task": task.name, "version_id": "d2", "path": str(tmp_path), "manifest_uri": str(tmp_path / "m.json")}
    return finetune_plan(task, dataset=dataset, params={"runner": "local", **params}, run_key="run-1", trigger=trigger)


def test_a_drift_retrain_continues_from_the_champion(task, tmp_path):
    version = _champion(task, tmp_path, r=8, base=base_model_for(task))
    plan = _plan(task, tmp_path, "retrain_request")
    assert plan["init_from"] == f"champion v{version}"
    adapter = Path(plan["overrides"]["init_adapter"])
    assert (adapter / "adapter_config.json").is_file()  # the champion's, downloaded from the registry
    assert plan["overrides"]["max_steps"] == task.drift.retrain.max_steps == 16
    assert plan["overrides"]["learning_rate"] == task.drift.retrain.learning_rate
    assert f"init_adapter={adapter}" in shlex.join(plan["command"])  # what every runner runs
    # the form's values win over the task file's retrain settings
    assert _plan(task, tmp_path, "retrain_request", max_steps=30)["overrides"]["max_steps"] == 30
    # new data (not a drift retrain) starts fresh with the recipe as written
    fresh = _plan(task, tmp_path, "validated_dataset")
    assert fresh["init_from"] is None and "init_adapter" not in fresh["overrides"]
    assert "max_steps" not in fresh["overrides"]


def test_a_retrain_that_cannot_continue_starts_fresh(task, tmp_path, capsys):
    _champion(task, tmp_path / "a", r=8, base="some/other-model")
    plan = _plan(task, tmp_path, "retrain_request")
    assert plan["init_from"] is None and "init_adapter" not in plan["overrides"]
    assert "trained on some/other-model" in capsys.readouterr().out
    _champion(task, tmp_path / "b", r=8, base=base_model_for(task))
    plan = _plan(task, tmp_path, "retrain_request", lora_r=16)  # the form asks for another rank
    assert plan["init_from"] is None and "init_adapter" not in plan["overrides"]
    assert "lora.r 8 vs 16" in capsys.readouterr().out
    registry.delete_alias("champion", task.registered_model)
    assert _plan(task, tmp_path, "retrain_request")["init_from"] is None
    assert "has no champion" in capsys.readouterr().out
