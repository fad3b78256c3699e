"""A user's own task, end to end through the stages, without touching library code.

The README's "Add your own task" steps, done by a test: a task file, its module and its own
eval suite are written to a temp directory (found through TUNESHIP_TASK_PATH), its data lands
in its own landing location, and it goes through validation (with its data gate), fine-tune,
registration, its gates against the base model, and compile with parity. The model is the
tiny test Llama (speed); the stages are the ones the DAGs call.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ml_fixtures import base_model

from tests.tasks import triage

pytestmark = pytest.mark.integration

TASK_MODULE = '''
"""Urgency flag for support messages: the third task's own code."""
import re

def parse(text):
    m = re.search(r"urgent=(yes|no)\\b", text or "")
    return {"urgent": m.group(1) if m else None}

def conforms(text):
    return parse(text)["urgent"] is not None
'''

SUITE = {
    "name": "urgency", "version": 1, "description": "urgent=yes|no on held-out messages",
    "cases": {"source": "dataset_eval_split", "limit": 40},
    "generation": {"max_new_tokens": 6},
    "metrics": [{"name": "urgent_accuracy", "kind": "field_exact_match", "field": "urgent"},
                {"name": "format_rate", "kind": "parse_rate"}],
    # floors on the 95% lower bound; no worse than the base model beyond 0.2 (40 paired cases)
    "gates": [{"metric": "format_rate", "min": 0.8}, {"metric": "urgent_accuracy", "min": 0.5},
              {"metric": "urgent_accuracy", "max_regression": 0.2}],
}
SMOKE = {
    "name": "urgency-smoke", "version": 1, "role": "smoke", "generation": {"max_new_tokens": 6},
    "cases": {"source": "inline", "items": [
        {"prompt": "Message: my parcel is late, please help asap!\nUrgent:", "expected": {"urgent": "yes"}},
        {"prompt": "Message: how do I change my email? no rush.\nUrgent:", "expected": {"urgent": "no"}}]},
    "metrics": [{"name": "format_rate", "kind": "parse_rate"}],
    "gates": [{"metric": "format_rate", "min": 1.0}],
}


def urgency_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Support messages (the triage generator's text) with a yes/no urgency label."""
    out = []
    for row in triage().examples(n, seed):
        text = row["prompt"].removeprefix("Ticket: ").removesuffix("\nTriage:")
        urgent = "yes" if "priority=high" in row["completion"] else "no"
        out.append({"prompt": f"Message: {text}\nUrgent:", "completion": f" urgent={urgent}"})
    return out


def write_batch(out: Path, n_train: int, n_eval: int, seed: int) -> Path:
    rows = urgency_rows(n_train + n_eval, seed)
    out.mkdir(parents=True)
    for name, part in (("train", rows[:n_train]), ("eval", rows[n_train:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return out


def test_a_third_task_goes_through_validation_finetune_gates_and_compile(tmp_path, tmp_path_factory, monkeypatch):
    from tuneship import registry, stages
    from tuneship.tasks import load_task, task_names

    home, tasks_dir = tmp_path / "home", tmp_path / "my-tasks"
    monkeypatch.setenv("TUNESHIP_HOME", str(home))
    monkeypatch.setenv("TUNESHIP_TASK_PATH", str(tasks_dir))
    # 1. the task file and its module in the team's own directory, its suites and recipe beside
    (tasks_dir / "suites").mkdir(parents=True)
    (tasks_dir / "recipes").mkdir()
    (tasks_dir / "urgency_task.py").write_text(TASK_MODULE)
    (tasks_dir / "suites" / "urgency.yaml").write_text(yaml.safe_dump(SUITE))
    (tasks_dir / "suites" / "urgency-smoke.yaml").write_text(yaml.safe_dump(SMOKE))
    (tasks_dir / "recipes" / "urgency-lora.yaml").write_text(
        (Path(stages.__file__).parent / "train" / "recipes" / "tiny-lora.yaml").read_text()
        .replace("name: tiny-lora", "name: urgency-lora"))
    (tasks_dir / "urgency.yaml").write_text(yaml.safe_dump({
        "schema_version": 1, "name": "urgency", "description": "Is a support message urgent?",
        "registered_model": "acme-urgency", "served_model": "urgency",
        "base_model": str(base_model(tmp_path_factory)), "recipe": "recipes/urgency-lora.yaml",
        "prompt_format": "plain",
        "data": {"landing": str(tmp_path / "landing"), "min_conforming": 0.95},
        "answers": {"parser": "urgency_task:parse", "fields": ["urgent"], "check": "urgency_task:conforms"},
        "eval": {"suites": ["suites/urgency.yaml"], "smoke": "suites/urgency-smoke.yaml"},
    }))
    r = subprocess.run([sys.executable, "-c", "from tuneship.cli import main; main()", "tasks", "check"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "urgency" in r.stderr, r.stderr
    task = load_task("urgency")
    assert "urgency" in task_names() and task.suite("suites/urgency.yaml").name == "urgency"

    # 2. its data gate: triage answers landed in its location are refused before any training
    wrong = tmp_path / "landing" / "batch-wrong"
    triage().write_dataset(wrong, n_train=150, n_eval=20, seed=1)
    with pytest.raises(stages.Refusal, match="do not fit task 'urgency'"):
        stages.validate_and_version(task, str(wrong), run_id="manual__wrong")
    assert stages.latest_dataset(task) is None

    batch = write_batch(tmp_path / "landing" / "batch-0001", 600, 60, seed=2)
    assert stages.incoming_batch(task) == str(batch)
    dataset = stages.validate_and_version(task, str(batch), run_id="manual__urgency")
    assert dataset["created"] and stages.latest_dataset(task)["version_id"] == dataset["version_id"]

    # 3. fine-tune with the task's recipe and base model, as the local runner runs the trainer
    plan = stages.finetune_plan(task, dataset=stages.latest_dataset(task), params={"runner": "local"},
                                run_key="manual__urgency", trigger="manual")
    assert plan["recipe"] == str(tasks_dir / "recipes" / "urgency-lora.yaml") and plan["registered_model"] == "acme-urgency"
    cmd = [sys.executable, *plan["command"][1:]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    candidate = stages.register_training(plan)
    assert registry.get_version(candidate["version"], "acme-urgency").tags["task"] == "urgency"

    # 4. its own gates, against the base model on the same cases
    gates = stages.evaluate_candidate(task, candidate, dataset)
    print(f"urgency gates: {gates['metrics']} vs base {gates['reference']}")
    assert gates["passed"] and gates["reference_name"] == "base model"
    assert gates["metrics"]["urgent_accuracy"] > gates["reference"]["urgent_accuracy"]
    assert {r["verdict"] for r in gates["gates"]} == {"pass"} and Path(gates["forest_plot"]).is_file()
    [vs_base] = [r for r in gates["gates"] if r["rule"] == "vs reference"]
    assert vs_base["diff_low"] > -0.2 and vs_base["low"] <= vs_base["value"] <= vs_base["high"]

    # 5. compile, with parity on the task's own prompts (its smoke suite's)
    compiled = stages.compile_candidate(task, candidate)
    assert compiled["parity"]["generation_equal"] and compiled["task"] == "urgency"
    assert compiled["parity"]["prompts"] == len(SMOKE["cases"]["items"]) + 3
    assert Path(compiled["package"], "config.pbtxt").is_file()
    # nothing of the demo tasks was touched
    assert not (home / "artifacts" / "tasks" / "triage").exists()
