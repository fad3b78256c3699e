"""The per-task release slot: one holder at a time, re-entrant, given back only by its
holder, taken over from a run that no longer runs. The Airflow side (setup/teardown,
deferred wait, the dag-run state lookup) is exercised in tests/integration/test_multi_task_airflow.py."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from tuneship import release_slot


@pytest.fixture(autouse=True)
def own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path / "home"))


def states(**by_run: str | None):
    """A dag-run state lookup answering from a table (what Airflow would say)."""
    asked: list[tuple[str, str]] = []

    def lookup(dag_id: str, run_id: str) -> str | None:
        asked.append((dag_id, run_id))
        return by_run.get(run_id)

    lookup.asked = asked  # type: ignore[attr-defined]
    return lookup


def test_free_slot_is_taken_and_a_retry_of_the_holder_is_a_no_op():
    first = release_slot.try_take("triage", "run-a", run_state=states())
    assert first["taken"] and first["holder"]["run_id"] == "run-a" and first["took_over"] is None
    again = release_slot.try_take("triage", "run-a", run_state=states())
    assert again["taken"] and again["holder"] == first["holder"]
    assert release_slot.holder("triage")["run_id"] == "run-a"
    assert release_slot.slot_path("triage").parent == release_slot.slot_path("faq").parent


def test_a_running_holder_keeps_the_slot_and_other_tasks_are_not_blocked():
    release_slot.try_take("triage", "run-a", run_state=states())
    lookup = states(**{"run-a": "running"})
    waiting = release_slot.try_take("triage", "run-b", run_state=lookup)
    assert not waiting["taken"] and waiting["holder"]["run_id"] == "run-a" and waiting["holder_state"] == "running"
    assert lookup.asked == [("llm_release", "run-a")]
    # another task's slot is its own
    assert release_slot.try_take("faq", "run-b", run_state=lookup)["taken"]
    assert release_slot.holder("triage")["run_id"] == "run-a"


@pytest.mark.parametrize(("state", "shown"), [("success", "success"), ("failed", "failed"), (None, "gone")])
def test_a_holder_that_no_longer_runs_is_taken_over(state, shown):
    release_slot.try_take("triage", "run-a", run_state=states())
    result = release_slot.try_take("triage", "run-b", run_state=states(**{"run-a": state}))
    assert result["taken"] and result["holder"]["run_id"] == "run-b"
    assert result["took_over"]["run_id"] == "run-a" and result["took_over"]["state"] == shown
    # the old holder's late give-back does not free the new holder's slot
    assert release_slot.give_back("triage", "run-a") is False
    assert release_slot.holder("triage")["run_id"] == "run-b"


def test_give_back_frees_only_the_holders_slot():
    release_slot.try_take("triage", "run-a", run_state=states())
    assert release_slot.give_back("triage", "run-b") is False
    assert release_slot.give_back("triage", "run-a") is True
    assert release_slot.holder("triage") is None
    assert release_slot.give_back("triage", "run-a") is False  # a retried teardown
    assert release_slot.try_take("triage", "run-b", run_state=states())["took_over"] is None


def test_an_unreadable_slot_names_the_file_and_what_to_do():
    path = release_slot.slot_path("triage")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(release_slot.SlotError, match=r"triage\.json.*delete it if no release"):
        release_slot.try_take("triage", "run-a", run_state=states())
    path.write_text('{"dag_id": "llm_release"}')
    with pytest.raises(release_slot.SlotError, match="names no run_id"):
        release_slot.holder("triage")


def _race(home: str, run_id: str, start, out) -> None:
    os.environ["TUNESHIP_HOME"] = home
    start.wait()
    # every other contender is "running": only a free slot can be taken
    out.put((run_id, release_slot.try_take("triage", run_id, run_state=lambda d, r: "running")["taken"]))


def test_processes_racing_for_one_slot_get_exactly_one_holder(tmp_path):
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(os.environ["TUNESHIP_HOME"], f"run-{i}", start, out)) for i in range(6)]
    for p in procs:
        p.start()
    start.set()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    winners = [run for run, taken in results.items() if taken]
    assert len(winners) == 1, results
    assert release_slot.holder("triage")["run_id"] == winners[0]


def test_the_slot_trigger_serializes_ids_only_and_takes_a_free_slot():
    """What the triggerer re-creates from the database: ids and timings, and the same trigger."""
    import asyncio

    from tuneship_airflow.triggers import ReleaseSlotTrigger

    trigger = ReleaseSlotTrigger(task_name="faq", run_id="run-a", poll_interval=5)
    path, kwargs = trigger.serialize()
    assert path == "tuneship_airflow.triggers.ReleaseSlotTrigger"
    assert kwargs == {"task_name": "faq", "run_id": "run-a", "dag_id": "llm_release", "poll_interval": 5.0}
    assert ReleaseSlotTrigger(**kwargs).serialize() == (path, kwargs)

    async def first_event():
        return await anext(aiter(trigger.run()))

    event = asyncio.run(first_event())
    assert event.payload["status"] == "taken" and event.payload["holder"]["run_id"] == "run-a"
    assert release_slot.holder("faq")["run_id"] == "run-a"
