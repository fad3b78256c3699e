"""Landing-triggered validation: the AssetWatcher trigger, and what a run takes in.

The trigger runs its real `run()` loop on asyncio against a real directory; the stage
functions run the real validation, so a rejected batch's message and Slack text are the
ones a person would get.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.tasks import triage
from tuneship import notify
from tuneship.stages import Refusal, batches_to_validate, validate_batches
from tuneship_airflow.triggers import IncomingBatchTrigger

datagen = triage()


async def _events(trigger: IncomingBatchTrigger, n: int, timeout: float = 5.0) -> list[dict]:
    out: list[dict] = []

    async def collect() -> None:
        async for event in trigger.run():
            out.append(event.payload)
            if len(out) == n:
                return

    try:
        await asyncio.wait_for(collect(), timeout)
    except TimeoutError:
        pass
    return out


def test_trigger_fires_once_per_completed_batch(tmp_path: Path) -> None:
    """Each task's landing location is watched; an event names the batch and its task."""
    dirs = {"triage": str(tmp_path / "triage"), "faq": str(tmp_path / "faq")}
    trigger = IncomingBatchTrigger(directories=dirs, poke_interval=0.05)
    assert trigger.serialize() == (
        "tuneship_airflow.triggers.IncomingBatchTrigger",
        {"directories": dirs, "marker": "_SUCCESS", "poke_interval": 0.05},
    )
    half = tmp_path / "triage" / "batch-a"
    datagen.write_dataset(half, n_train=5, n_eval=2)
    # still uploading (no marker): nothing fires
    assert asyncio.run(_events(trigger, 1, timeout=0.3)) == []

    (half / "_SUCCESS").touch()
    later = tmp_path / "faq" / "batch-b"
    datagen.write_dataset(later, n_train=5, n_eval=2)
    (later / "_SUCCESS").touch()
    events = asyncio.run(_events(trigger, 2))
    assert events == [{"task": "triage", "dataset_uri": str(half)}, {"task": "faq", "dataset_uri": str(later)}]
    assert (half / "_SUCCESS.claimed").exists() and not (half / "_SUCCESS").exists()
    # a restarted triggerer does not fire again for claimed batches
    fresh = IncomingBatchTrigger(directories=dirs, poke_interval=0.05)
    assert asyncio.run(_events(fresh, 1, timeout=0.3)) == []


def test_missing_incoming_directory_is_not_an_error(tmp_path: Path) -> None:
    trigger = IncomingBatchTrigger(directories={"triage": str(tmp_path / "absent")}, poke_interval=0.05)
    assert asyncio.run(_events(trigger, 1, timeout=0.2)) == []


def _event(uri: str, task: str = "triage", second: int = 0) -> SimpleNamespace:
    return SimpleNamespace(timestamp=datetime(2026, 3, 1, 0, 0, second, tzinfo=UTC),
                           extra={"from_trigger": True, "payload": {"task": task, "dataset_uri": uri}})


def test_what_a_run_takes_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneship.stages import StageFailed
    from tuneship.tasks import load_task

    monkeypatch.setenv("TUNESHIP_INCOMING", str(tmp_path))
    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path / "home"))  # its own event claims
    task = load_task("triage")

    def names(pairs):
        return [(t.name, uri) for t, uri in pairs]

    assert batches_to_validate([task], "", None) == []
    datagen.write_dataset(tmp_path / "triage" / "nightly", n_train=5, n_eval=2)
    datagen.write_dataset(tmp_path / "elsewhere", n_train=5, n_eval=2)  # not a task's landing location
    assert names(batches_to_validate([task], "", {})) == [("triage", str(tmp_path / "triage" / "nightly"))]
    events = {"incoming_training_data": [_event("/a", second=1), _event("/b", second=2), _event("/a", second=3),
                                         _event("/c", "gone", second=4)]}
    # every landing of a known task, once, in order
    assert names(batches_to_validate([task], "", events, run_id="r1")) == [("triage", "/a"), ("triage", "/b")]
    assert names(batches_to_validate([task], "/manual", events)) == [("triage", "/manual")]  # the Param wins
    # a landing the scheduler gave no run (apache/airflow#56050) is taken by the next run that
    # sees it; a run whose landings were all taken already validates nothing
    stray = {"incoming_training_data": [_event("/d", second=5)]}
    got = batches_to_validate([task], "", {"incoming_training_data": [_event("/e", second=6)]}, run_id="r2",
                              recent_events=stray)
    assert names(got) == [("triage", "/d"), ("triage", "/e")]  # in landing order
    assert batches_to_validate([task], "", stray, run_id="r3") == []
    with pytest.raises(StageFailed, match="needs the task it belongs to"):
        batches_to_validate([task, task.model_copy()], "/manual", None)


def test_rejected_batch_fails_with_details_and_says_so_on_slack(tmp_path: Path) -> None:
    from tuneship.tasks import load_task

    good = tmp_path / "good"
    datagen.write_dataset(good, n_train=150, n_eval=20, seed=4)
    bad = tmp_path / "bad"
    datagen.write_dataset(bad, n_train=150, n_eval=20, seed=5)
    rows = [json.loads(x) for x in (bad / "train.jsonl").read_text().splitlines()]
    for i in range(0, 150, 5):  # 20 % of rows carry an email: above every threshold
        rows[i]["prompt"] = rows[i]["prompt"].replace("Ticket:", "Ticket: mail bo@example.com")
    (bad / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    before = len(notify.read_sink())  # the sink is shared with earlier tests of the session
    with pytest.raises(Refusal) as info:  # a decision: the task fails once, without a retry
        validate_batches(load_task("triage"), [str(bad), str(good)], run_id="manual__landing_test")
    message = str(info.value)
    assert "REJECTED" in message and "train.jsonl" in message
    assert "pii [error]" in message and "train.jsonl:1,6,11" in message
    assert "Data Docs:" in message and "quarantine" in message.lower()
    # the good batch behind it was still validated and versioned, not skipped
    sent = notify.read_sink()[before:]
    assert any(m["level"] == "success" and str(good) in m["text"] for m in sent)
    rejected = [m for m in sent if m["level"] == "error"]
    assert len(rejected) == 1
    slack = rejected[0]["text"]
    for needle in ("REJECTED", str(bad), "train.jsonl:1,6,11", "pii [error]", "Data Docs:"):
        assert needle in slack, needle
