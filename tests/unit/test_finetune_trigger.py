"""No fine-tune trigger is lost: a run whose asset events name several tasks trains one and
fans the others out, each with its own dataset version and a run id that a retry repeats.
The real scheduler doing it: tests/integration/test_multi_task_airflow.py."""

from __future__ import annotations

import json
from collections import namedtuple
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuneship import stages
from tuneship.tasks import load_task

T0 = datetime(2026, 3, 1, tzinfo=UTC)
AssetRef = namedtuple("AssetRef", "name")  # the key of triggering_asset_events: has a name
VALIDATED, RETRAIN = AssetRef("validated_dataset"), AssetRef("retrain_request")


@pytest.fixture(autouse=True)
def default_is_triage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESHIP_DEFAULT_TASK", "triage")  # two tasks ship: the default must be named


def event(minute: int, **extra):
    """The shape of Airflow's triggering asset event: a timestamp and an extra dict."""
    return SimpleNamespace(timestamp=T0 + timedelta(minutes=minute), extra=extra)


def test_newest_event_is_trained_and_every_other_task_fans_out():
    events = {
        VALIDATED: [event(1, task="faq", version_id="faq-old"), event(2, task="triage", version_id="tri-1"),
                    event(3, task="faq", version_id="faq-new")],
        RETRAIN: [event(0, task="third")],
    }
    chosen = stages.finetune_trigger(None, events, run_id="asset_triggered__2026-03-01T00:03:00+00:00")
    assert (chosen["task"], chosen["trigger"], chosen["dataset_version"]) == ("faq", "validated_dataset", "faq-new")
    assert chosen["fan_out"] == [
        {"trigger_run_id": "fan_out__third__asset_triggered__2026-03-01T00:03:00+00:00",
         "conf": {"task": "third", "trigger": "retrain_request"}},
        {"trigger_run_id": "fan_out__triage__asset_triggered__2026-03-01T00:03:00+00:00",
         "conf": {"task": "triage", "trigger": "validated_dataset", "dataset_version": "tri-1"}},
    ]
    # a retry of the same run asks for the same runs (TriggerDagRunOperator skips existing ids)
    assert stages.finetune_trigger(None, events, run_id="asset_triggered__2026-03-01T00:03:00+00:00") == chosen


def test_one_task_in_the_events_fans_out_nothing():
    events = {VALIDATED: [event(1, task="triage", version_id="a"), event(2, task="triage", version_id="b")]}
    chosen = stages.finetune_trigger(None, events, run_id="r")
    assert (chosen["task"], chosen["dataset_version"], chosen["fan_out"]) == ("triage", "b", [])


def test_an_event_without_a_task_is_the_default_tasks():
    chosen = stages.finetune_trigger(None, {RETRAIN: [event(1)]}, run_id="r")
    assert (chosen["task"], chosen["trigger"], chosen["dataset_version"]) == ("triage", "retrain_request", None)


def test_a_fanned_out_run_trains_what_its_conf_names():
    chosen = stages.finetune_trigger("faq", None, run_id="fan_out__faq__x", dataset_version="faq-7",
                                     trigger="validated_dataset")
    assert chosen == {"task": "faq", "trigger": "validated_dataset", "dataset_version": "faq-7", "fan_out": []}
    manual = stages.finetune_trigger(None, None, run_id="manual__x")
    assert manual == {"task": "triage", "trigger": "manual", "dataset_version": None, "fan_out": []}


def test_task_param_wins_and_the_events_other_tasks_still_fan_out():
    events = {VALIDATED: [event(1, task="triage", version_id="t1"), event(2, task="faq", version_id="f1")]}
    chosen = stages.finetune_trigger("triage", events, run_id="r")
    assert (chosen["task"], chosen["dataset_version"]) == ("triage", "t1")
    assert [f["conf"]["task"] for f in chosen["fan_out"]] == ["faq"]


def accept(task_name: str, version_id: str) -> Path:
    path = stages.datasets_root(load_task(task_name)) / version_id
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"rows": 1}))
    return path


def test_plan_trains_the_chosen_version_and_refuses_an_unknown_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path))
    task = load_task("faq")
    path = accept("faq", "v-1")
    got = stages.finetune_dataset(task, {"task": "faq", "trigger": "validated_dataset", "dataset_version": "v-1"},
                                  run_id="r")
    assert got == {"task": "faq", "version_id": "v-1", "path": str(path), "manifest_uri": str(path / "manifest.json")}
    with pytest.raises(stages.Refusal, match=r"task faq has no accepted dataset version 'v-9'.*known versions: v-1"):
        stages.finetune_dataset(task, {"task": "faq", "trigger": "manual", "dataset_version": "v-9"}, run_id="r")
    # nothing named: the newest accepted version; none at all is a clear fault
    (stages.datasets_root(task) / "LATEST").write_text("v-1")
    assert stages.finetune_dataset(task, {"task": "faq", "trigger": "manual"}, run_id="r")["version_id"] == "v-1"
    with pytest.raises(stages.StageFailed, match="no validated dataset for task triage yet"):
        stages.finetune_dataset(load_task("triage"), {"task": "triage", "trigger": "manual"}, run_id="r")
