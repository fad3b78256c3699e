"""When a release asks a person (`tuneship.approval`), on a real registry (MLflow on SQLite):
each change the checklist names is found against the champion with both values, a first
release counts as a change, a gate a suite held always asks, an undecided window asks only
where the task says so, and an answer turns the window's verdict into the decision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneship import approval, registry
from tuneship.evaluate import Statistics, decide_on_interval
from tuneship.tasks import load_task


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path))
    return tmp_path


def register(home: Path, key: str, *, base="smollm2-135m-instruct", recipe="h1", schema="prompt_completion",
             source="/landing/triage/batch-0001", tags: dict | None = None) -> str:
    manifest = home / key / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"schema": schema, "source_uri": source}))
    run_id = registry.start_run(key, run_name=key)
    registry.client().log_param(run_id, "lora_r", "8" if recipe == "h1" else "16")
    return registry.register(run_id, key, name="tuneship-triage", tags={
        "base_model": base, "recipe_hash": recipe, "dataset_manifest": str(manifest), **(tags or {})}).version


def test_changes_against_the_champion(home: Path):
    task = load_task("triage").model_copy(update={"approval": load_task("triage").approval.model_copy(
        update={"when": ["changed"]})})
    first = register(home, "v1")
    assert approval.lineage_changes(task, first) == [{"what": "first release", "champion": None, "candidate": "v1"}]
    registry.set_alias("champion", first, "tuneship-triage")
    same = register(home, "same", source="/landing/triage/batch-0002")  # a new batch, same landing
    assert approval.lineage_changes(task, same) == [] and approval.reasons(task, same, {"verdict": "promote"}) == []
    other = register(home, "other", base="my-org/llm-7b", recipe="h2", schema="chat",
                     source="/landing/elsewhere/batch-0001")
    changes = {c["what"]: (c["champion"], c["candidate"]) for c in approval.lineage_changes(task, other)}
    assert changes == {"base_model": ("smollm2-135m-instruct", "my-org/llm-7b"),
                       "hyperparameters": ({"lora_r": "8"}, {"lora_r": "16"}),
                       "dataset_schema": ("prompt_completion", "chat"),
                       "dataset_source": ("/landing/triage", "/landing/elsewhere")}
    # only what the task counts as a change
    narrow = task.model_copy(update={"approval": task.approval.model_copy(update={"changes": ["base_model"]})})
    assert [c["what"] for c in approval.lineage_changes(narrow, other)] == ["base_model"]


def test_held_gates_always_ask_and_an_undecided_window_only_where_declared(home: Path):
    task = load_task("triage")
    assert task.approval.when == []  # the shipped task asks nobody
    v = register(home, "held", tags={"gates_held": "triage@v3 category_accuracy"})
    assert approval.reasons(task, v, {"verdict": "promote"}) == [
        "gates held for a person (inconclusive intervals): triage@v3 category_accuracy"]
    plain = register(home, "plain")
    hold = {"verdict": "hold", "requests": 31, "reasons": ["error_rate: open at the window's end"]}
    assert approval.reasons(task, plain, hold) == []
    asks = task.model_copy(update={"approval": task.approval.model_copy(update={"when": ["inconclusive"]})})
    [why] = approval.reasons(asks, plain, hold)
    assert why.startswith("the shadow window ended undecided after 31 requests: error rate: open")


def test_an_inconclusive_gate_holds_where_the_suite_says_so():
    for on, passed in (("fail", False), ("hold", True)):
        verdict, ok, why = decide_on_interval(0.6, 0.9, 0.7, True, Statistics(on_inconclusive=on))
        assert (verdict, ok) == ("inconclusive", passed)
        assert ("person's approval" in why) == (on == "hold")


def test_an_answer_decides():
    window = {"verdict": "hold", "reasons": ["open"]}
    assert approval.apply(window, {"asked": False}) is window
    ok = approval.apply(window, {"asked": True, "approved": True, "by": "ana", "comment": "seen the shadow"})
    assert ok["verdict"] == "promote" and ok["reasons"][-1] == "approved by ana: 'seen the shadow'"
    no = approval.apply({"verdict": "promote"}, {"asked": True, "approved": False, "by": "bo", "comment": ""})
    assert (no["verdict"], no["reasons"]) == ("rollback", ["refused by bo"])
    late = approval.apply({"verdict": "promote"}, {"asked": True, "approved": False, "by": None, "timeout_hours": 24})
    assert late["reasons"] == ["no answer within the approval timeout (24 h)"]
