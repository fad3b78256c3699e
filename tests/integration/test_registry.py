"""MLflow (embedded SQLite store, real client): lineage and idempotent registration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneship import registry

NAME = "tuneship-registry-test"


@pytest.fixture()
def train_out(tmp_path: Path) -> Path:
    out = tmp_path / "train"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    (out / "metrics.json").write_text(json.dumps({"train_loss": 0.5, "eval_loss": 0.6, "tokens_per_s": 900.0,
                                                  "history": [{"step": i, "loss": 2.0 / i} for i in range(1, 6)]}))
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    return out


def test_retry_reuses_run_and_version(train_out: Path):
    key = "manual__2026-11-22T10:00:00+00:00"
    dataset = {"path": str(train_out.parent / "ds"), "version_id": "d0c5e7"}
    run_id = registry.start_run(key, run_name="ft")
    registry.log_training(run_id, params={"lora.r": 8}, train_out=train_out, dataset=dataset, dataset_name="triage-test")
    v1 = registry.register(run_id, key, tags={"dataset_version": "d0c5e7"}, name=NAME)
    # the task is retried: same run key -> same run, same version, no second input/params clash
    run_again = registry.start_run(key, run_name="ft")
    registry.log_training(run_again, params={"lora.r": 8}, train_out=train_out, dataset=dataset, dataset_name="triage-test")
    v2 = registry.register(run_again, key, tags={"dataset_version": "d0c5e7"}, name=NAME)
    assert run_again == run_id and v2.version == v1.version
    c = registry.client()
    versions = c.search_model_versions(f"name = '{NAME}'")
    assert len([v for v in versions if v.tags.get(registry.RUN_KEY) == key]) == 1
    run = c.get_run(run_id)
    assert run.data.params["lora.r"] == "8"
    assert [m.value for m in c.get_metric_history(run_id, "train_loss")][:2] == [2.0, 1.0]
    assert run.inputs.dataset_inputs[0].dataset.digest.startswith("d0c5e7")
    assert registry.by_alias("challenger", NAME).version == v1.version
    adapter = registry.download_adapter(v1, train_out.parent / "dl")
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"\0" * 64


def test_aliases_move(train_out: Path):
    dataset = {"path": str(train_out.parent / "ds"), "version_id": "aa11"}
    made = []
    for key in ("run-a", "run-b"):
        rid = registry.start_run(key, run_name=key)
        registry.log_training(rid, params={}, train_out=train_out, dataset=dataset, dataset_name="triage-test")
        made.append(registry.register(rid, key, tags={}, name=NAME))
    registry.set_alias("champion", made[0].version, NAME)
    assert registry.by_alias("champion", NAME).version == made[0].version
    assert registry.by_alias("challenger", NAME).version == made[1].version
    registry.set_alias("champion", made[1].version, NAME)
    assert registry.by_alias("champion", NAME).version == made[1].version
    assert registry.by_alias("nonexistent", NAME) is None
