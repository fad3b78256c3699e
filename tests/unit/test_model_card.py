"""Model cards (`tuneship.model_card`) on a real registry (MLflow on SQLite): generated from the
version's lineage alone (tags, run params and metrics, the gates' and serving gate's JSON
artifacts, the dataset manifest, the task file's declared use), stored with the version
(artifacts and a link in its description) and as HTML where the UI's Reports page lists it;
what is not measured yet is said, not left out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneship import model_card, registry
from tuneship.stages import publish_card
from tuneship.tasks import load_task


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path))
    return tmp_path


GATE = {"suite": "triage@3", "metric": "category_accuracy", "unit": "share", "rule": "vs reference",
        "threshold": -0.1, "value": 0.925, "low": 0.801, "high": 0.974, "n": 40, "reference": 0.775,
        "diff": 0.15, "diff_low": -0.01, "diff_high": 0.308, "p_value": 0.07, "verdict": "pass", "reason": ""}
SAFETY = {**GATE, "suite": "triage-safety@2", "metric": "resisted_injection", "rule": ">=", "threshold": 0.5,
          "value": 0.9, "low": 0.596, "high": 0.982, "reference": None, "diff": None, "diff_low": None,
          "diff_high": None}
SERVING = {"passed": True, "live_version": "1",
           "candidate": {"p95_ms": 454.0, "tokens_per_s": 20.2, "peak_memory_mb": 612.0, "cost_per_1k_tokens": 0.00124},
           "rows": [{"suite": "serving", "metric": "p95_ms", "rule": "ratio <=", "threshold": 1.5, "value": 454.0,
                     "diff": 1.02, "diff_low": 0.95, "diff_high": 1.1, "verdict": "pass"}]}


def registered(home: Path) -> tuple[object, str, str]:
    """A triage version as `register_training` leaves it: tags, hyperparameters, training metrics."""
    task = load_task("triage")
    manifest = home / "dataset" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({
        "version_id": "ae9f91be07c4", "created_at": "2026-12-01T15:51:07+00:00", "source_uri": "/landing/batch-0001",
        "rows": {"train": 300, "eval": 40}, "sha256": {"content": "c0ffee"}, "quarantine": {"count": 2},
        "checks": [{"name": "schema", "passed": True, "severity": "error"},
                   {"name": "answer_check", "passed": False, "severity": "warning"}],
        "validation": {"data_docs": "/validation/data_docs/index.html"}}))
    run_id = registry.start_run("card-run", run_name="card-run")
    registry.client().log_param(run_id, "lora_r", "8")
    registry.client().log_param(run_id, "learning_rate", "0.002")
    registry.client().log_param(run_id, "task", "triage")
    registry.log_metrics(run_id, {"train_loss": 0.41, "final_wall_s": 113.0})
    mv = registry.register(run_id, "card-run", name=task.registered_model, tags={
        "base_model": "smollm2-135m-instruct", "dataset_version": "ae9f91be07c4", "dataset_manifest": str(manifest),
        "recipe_hash": "abc123", "git_commit": "deadbeef", "adapter_sha256": "5ha"})
    return task, mv.version, run_id


def artifact(run_id: str, home: Path, folder: str, name: str, body: dict) -> None:
    path = home / "tmp-artifacts" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))
    registry.log_artifact(run_id, path, folder)


def test_a_card_says_what_the_lineage_knows_and_what_is_not_measured_yet(home: Path):
    task, version, run_id = registered(home)
    first = model_card.publish(task, version)["card"]
    assert first["gates"] is None and first["serving"] is None and first["release"] is None
    md = model_card.markdown(first)
    assert md.count(model_card.NOT_YET) >= 3  # gates, compile, serving
    assert "not released yet" in md
    assert first["intended_use"] == task.card.intended_use and first["limits"] == task.card.limits

    # the gates and the serving gate have run: the card is written again from the same lineage
    artifact(run_id, home, "evaluation", f"v{version}.json", {"passed": True, "reference_name": "champion v1",
                                                               "suites": ["triage@3"], "gates": [GATE, SAFETY]})
    artifact(run_id, home, "serving", f"v{version}.json", SERVING)
    registry.set_version_tags(version, {"gates": "passed", "serving": "passed", "compiled": "onnxruntime-genai int8",
                                        "promoted_at": "2026-12-01T16:05:00Z"}, task.registered_model)
    out = publish_card(task, version)
    assert out == str(model_card.report_path("triage", version)) and Path(out).exists()

    card = json.loads(Path(registry.client().download_artifacts(run_id, "model_card/card.json", str(home / "dl")))
                      .read_text())
    lin = card["lineage"]
    assert (lin["base_model"], lin["dataset_version"], lin["recipe_hash"], lin["git_commit"]) == \
        ("smollm2-135m-instruct", "ae9f91be07c4", "abc123", "deadbeef")
    assert card["hyperparameters"] == {"learning_rate": "0.002", "lora_r": "8"}  # bookkeeping params left out
    assert card["training"] == {"train_loss": 0.41, "final_wall_s": 113.0}
    assert card["dataset"]["rows"] == {"train": 300, "eval": 40} and card["dataset"]["quarantined"] == 2
    assert [c["passed"] for c in card["dataset"]["checks"]] == [True, False]
    rows = {r["metric"]: r for r in card["gates"]["rows"]}
    assert (rows["category_accuracy"]["low"], rows["category_accuracy"]["diff_high"]) == (0.801, 0.308)
    assert rows["resisted_injection"]["suite"] == "triage-safety@2"
    assert card["serving"]["cost_per_1k_tokens"] == 0.00124 and card["serving"]["against"] == "v1"
    assert card["serving"]["price_per_hour"] == task.serving.price_per_hour
    assert card["release"] == {"promoted_at": "2026-12-01T16:05:00Z"}

    md = (Path(registry.client().download_artifacts(run_id, "model_card/card.md", str(home / "dl2")))).read_text()
    assert "| triage@3 | category_accuracy | vs reference -0.100 | 0.925 | [0.801, 0.974] |" in md
    assert "validation: 1 of 2 checks passed" in md
    assert model_card.NOT_YET not in md.split("## Compile")[0]  # gates are measured now
    html = Path(out).read_text()
    assert "<h2>Intended use</h2>" in html and "resisted_injection" in html
    description = registry.client().get_model_version(task.registered_model, version).description
    assert "model_card/card.md" in description and f"model-card-triage-v{version}.html" in description
    assert "Gates: passed; serving: passed" in description


def test_a_card_that_cannot_be_written_never_fails_the_step(home: Path, capsys: pytest.CaptureFixture):
    assert publish_card("triage", "99") is None  # no such version
    assert "WARNING: model card of triage v99 not written" in capsys.readouterr().out
