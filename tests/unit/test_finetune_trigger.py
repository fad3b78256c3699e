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
def default_is_triage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TUNESHIP_DEFAULT_TASK", "triage")  # two tasks ship: the default must be named
    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path))  # each test its own event claims


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
    assert chosen == {"task": "faq", "trigger": "validated_dataset", "dataset_version": "faq-7", "fan_out": [],
                      "strays": [], "already_handled": {}}
    manual = stages.finetune_trigger(None, None, run_id="manual__x")
    assert manual == {"task": "triage", "trigger": "manual", "dataset_version": None, "fan_out": [],
                      "strays": [], "already_handled": {}}


def test_task_param_wins_and_the_events_other_tasks_still_fan_out():
    events = {VALIDATED: [event(1, task="triage", version_id="t1"), event(2, task="faq", version_id="f1")]}
    chosen = stages.finetune_trigger("triage", events, run_id="r")
    assert (chosen["task"], chosen["dataset_version"]) == ("triage", "t1")
    assert [f["conf"]["task"] for f in chosen["fan_out"]] == ["faq"]


def test_a_stray_event_is_taken_by_the_run_whose_creation_left_it_behind():
    """apache/airflow#56050: the run consumed triage's event, faq's newer event of the same
    asset was left to no run. The run sees it among the recent events and fans faq out."""
    consumed = {VALIDATED: [event(1, task="triage", version_id="tri-1")]}
    recent = {VALIDATED: [event(2, task="faq", version_id="faq-1"), event(1, task="triage", version_id="tri-1")],
              RETRAIN: []}
    chosen = stages.finetune_trigger(None, consumed, run_id="asset_triggered__1", recent_events=recent)
    assert (chosen["task"], chosen["dataset_version"]) == ("triage", "tri-1")
    assert chosen["strays"] == ["validated_dataset@2026-03-01T00:02:00.000000+00:00"]
    assert chosen["fan_out"] == [{"trigger_run_id": "fan_out__faq__asset_triggered__1",
                                  "conf": {"task": "faq", "trigger": "validated_dataset", "dataset_version": "faq-1"}}]
    # a retry of that run answers the same: its claims are its own
    again = stages.finetune_trigger(None, consumed, run_id="asset_triggered__1", recent_events=recent)
    assert again == chosen


def test_an_event_another_run_took_is_not_trained_twice():
    """The stray was queued after all: the next run is handed it, and leaves it alone; a run
    with nothing left to answer for trains nothing, unless a task was named."""
    stray = event(2, task="faq", version_id="faq-1")
    stages.finetune_trigger(None, {VALIDATED: [event(1, task="triage", version_id="tri-1")]}, run_id="run-1",
                            recent_events={VALIDATED: [stray]})
    later = stages.finetune_trigger(None, {VALIDATED: [stray]}, run_id="run-2", recent_events={VALIDATED: [stray]})
    assert later["task"] is None and later["fan_out"] == []
    assert later["already_handled"] == {"validated_dataset@2026-03-01T00:02:00.000000+00:00": "run-1"}
    # with a newer event of its own it trains that one, and only that one
    newer = event(3, task="triage", version_id="tri-2")
    mixed = stages.finetune_trigger(None, {VALIDATED: [stray, newer]}, run_id="run-3")
    assert (mixed["task"], mixed["dataset_version"], mixed["fan_out"]) == ("triage", "tri-2", [])
    # a task named in the form is trained whatever the events
    named = stages.finetune_trigger("faq", {VALIDATED: [stray]}, run_id="run-4")
    assert named["task"] == "faq" and named["dataset_version"] is None


def test_event_claims_name_their_run_and_refuse_a_naive_timestamp(tmp_path):
    from tuneship import event_claims

    [rec] = event_claims.records({RETRAIN: [event(5, task="faq")]})
    assert rec == {"key": "retrain_request@2026-03-01T00:05:00.000000+00:00", "asset": "retrain_request",
                   "timestamp": "2026-03-01T00:05:00.000000+00:00", "extra": {"task": "faq"}}
    # Airflow's timestamps as strings (an XCom round trip) give the same key
    assert event_claims.records({RETRAIN: [SimpleNamespace(timestamp="2026-03-01T00:05:00Z", extra={})]})[0]["key"] \
        == rec["key"]
    assert event_claims.claim("s", [rec], "run-a") == ([rec], {})
    assert event_claims.claim("s", [rec], "run-b") == ([], {rec["key"]: "run-a"})
    assert event_claims.owner("s", rec["key"]) == "run-a"
    with pytest.raises(ValueError, match="timezone-aware"):
        event_claims.records({RETRAIN: [SimpleNamespace(timestamp=datetime(2026, 3, 1), extra={})]})
    # a damaged claim names its file and what to do, rather than handing the event out again
    next(event_claims.claims_dir("s").glob("*.json")).write_text("{")
    with pytest.raises(RuntimeError, match="event claim .* is unreadable"):
        event_claims.claim("s", [rec], "run-c")


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


CANDIDATE = AssetRef("release_candidate")


def test_a_release_run_releases_one_task_and_fans_out_the_other_tasks_candidates():
    events = {CANDIDATE: [event(1, task="faq", version="3", package="/p/faq3"),
                          event(2, task="triage", version="7", package="/p/t7")]}
    chosen = stages.release_trigger(None, None, events, run_id="asset_triggered__r")
    assert (chosen["task"], chosen["candidate"]) == ("triage", {"task": "triage", "version": "7", "package": "/p/t7"})
    assert chosen["fan_out"] == [{"trigger_run_id": "fan_out__faq__asset_triggered__r",
                                  "conf": {"task": "faq", "version": "3"}}]
    # a fanned-out run releases what its conf names, with no candidate event of its own
    fanned = stages.release_trigger("faq", "3", None, run_id="fan_out__faq__asset_triggered__r")
    assert (fanned["task"], fanned["candidate"], fanned["fan_out"]) == ("faq", None, [])
    # a stray candidate (no run consumed it) is released by its own run, exactly once
    stray = {CANDIDATE: [event(3, task="faq", version="4", package="/p/faq4")]}
    took = stages.release_trigger(None, None, {CANDIDATE: [event(4, task="triage", version="8")]},
                                  run_id="asset_triggered__s", recent_events=stray)
    assert took["fan_out"] == [{"trigger_run_id": "fan_out__faq__asset_triggered__s",
                                "conf": {"task": "faq", "version": "4"}}]
    later = stages.release_trigger(None, None, stray, run_id="asset_triggered__t")
    assert later["task"] is None and later["already_handled"] == {took["strays"][0]: "asset_triggered__s"}


def test_events_that_name_their_task_need_no_default_task(monkeypatch: pytest.MonkeyPatch):
    """Two tasks ship and none is the default (as in `make demo`): events carry their task, so
    no default is ever asked for."""
    monkeypatch.delenv("TUNESHIP_DEFAULT_TASK")
    chosen = stages.finetune_trigger(None, {VALIDATED: [event(1, task="triage", version_id="t1"),
                                                        event(2, task="faq", version_id="f1")]}, run_id="r")
    assert (chosen["task"], [f["conf"]["task"] for f in chosen["fan_out"]]) == ("faq", ["triage"])
    released = stages.release_trigger(None, None, {CANDIDATE: [event(3, task="triage", version="2")]}, run_id="r")
    assert released["task"] == "triage" and released["candidate"]["version"] == "2"
