"""Triggers: the release's waits off the worker, and training data landing.

`ShadowWindowTrigger` watches the inference log for a release's shadow window;
`PostSwitchWindowTrigger` watches the new live version's own answers right after the
switch; `IncomingBatchTrigger` is the AssetWatcher trigger that starts llm_data_validation
when a batch finishes landing. `ReleaseSlotTrigger` waits for a task's release slot (one
release at a time per task) without holding a worker.

`serialize()` holds ids and timings only (no secrets, no payloads). `run()` never blocks
the triggerer's loop: log reads go to a thread. The window triggers fire once: when the
window ends, or early on a breach (no point watching a broken model for 72 hours, nor
leaving users on one for the rest of the post-switch window).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent


class ShadowWindowTrigger(BaseTrigger):
    def __init__(
        self,
        *,
        served_model: str,
        candidate_version: str,
        ends_at: float,
        since: float,
        poll_interval: float = 15.0,
        max_error_rate: float = 0.01,
        min_requests: int = 20,
    ) -> None:
        super().__init__()
        self.served_model = served_model
        self.candidate_version = str(candidate_version)
        self.ends_at = float(ends_at)
        self.since = float(since)
        self.poll_interval = float(poll_interval)
        self.max_error_rate = float(max_error_rate)
        self.min_requests = int(min_requests)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "tuneship_airflow.triggers.ShadowWindowTrigger",
            {
                "served_model": self.served_model,
                "candidate_version": self.candidate_version,
                "ends_at": self.ends_at,
                "since": self.since,
                "poll_interval": self.poll_interval,
                "max_error_rate": self.max_error_rate,
                "min_requests": self.min_requests,
            },
        )

    def _count(self) -> tuple[int, int]:
        from tuneship.monitor import candidate_responses, is_ok, task_records

        answers = candidate_responses(task_records(self.served_model, since=self.since), self.candidate_version)
        return len(answers), sum(not is_ok(a) for a in answers)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            while True:
                now = time.time()
                n, errors = await asyncio.to_thread(self._count)
                if n >= self.min_requests and errors / n > self.max_error_rate:
                    self.log.warning("candidate %s breached the error budget: %d/%d", self.candidate_version, errors, n)
                    yield TriggerEvent({"status": "breach", "requests": n, "errors": errors, "at": now})
                    return
                if now >= self.ends_at:
                    yield TriggerEvent({"status": "complete", "requests": n, "errors": errors, "at": now})
                    return
                self.log.info("shadow window: %d candidate responses, %d errors, %.0fs left",
                              n, errors, self.ends_at - now)
                await asyncio.sleep(min(self.poll_interval, max(self.ends_at - now, 0.1)))
        except Exception as exc:  # noqa: BLE001 - report as an event, the operator decides
            yield TriggerEvent({"status": "error", "message": str(exc)})


class PostSwitchWindowTrigger(BaseTrigger):
    """Polls the inference log for `version`'s live answers since `since` (the switch).

    Fires `breach` as soon as `tuneship.monitor.post_switch_verdict` says so, else
    `complete` once `ends_at` has passed (verdict `healthy` or `insufficient`); the event
    carries the verdict (figures only). An exception is reported as an `error` event."""

    def __init__(
        self,
        *,
        served_model: str,
        version: str,
        since: float,
        ends_at: float,
        poll_interval: float = 15.0,
        max_error_rate: float = 0.01,
        max_p95_ms: float = 2000.0,
        min_requests: int = 20,
    ) -> None:
        super().__init__()
        self.served_model = served_model
        self.version = str(version)
        self.since = float(since)
        self.ends_at = float(ends_at)
        self.poll_interval = float(poll_interval)
        self.max_error_rate = float(max_error_rate)
        self.max_p95_ms = float(max_p95_ms)
        self.min_requests = int(min_requests)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "tuneship_airflow.triggers.PostSwitchWindowTrigger",
            {
                "served_model": self.served_model,
                "version": self.version,
                "since": self.since,
                "ends_at": self.ends_at,
                "poll_interval": self.poll_interval,
                "max_error_rate": self.max_error_rate,
                "max_p95_ms": self.max_p95_ms,
                "min_requests": self.min_requests,
            },
        )

    def judge(self, window_over: bool) -> dict[str, Any]:
        from tuneship.monitor import PostSwitchThresholds, post_switch_verdict, task_records

        th = PostSwitchThresholds(min_requests=self.min_requests, max_error_rate=self.max_error_rate,
                                  max_p95_ms=self.max_p95_ms)
        records = task_records(self.served_model, since=self.since)
        return post_switch_verdict(records, self.version, th, since=self.since, window_over=window_over)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            while True:
                now = time.time()
                verdict = await asyncio.to_thread(self.judge, now >= self.ends_at)
                if verdict["verdict"] == "breach":
                    self.log.warning("v%s breached after the switch: %s", self.version, verdict["reasons"])
                    yield TriggerEvent({"status": "breach", "verdict": verdict, "at": now})
                    return
                if verdict["verdict"] != "watching":
                    yield TriggerEvent({"status": "complete", "verdict": verdict, "at": now})
                    return
                self.log.info("post-switch window: v%s %d live responses, %d errors, %.0fs left",
                              self.version, verdict["requests"], verdict["errors"], self.ends_at - now)
                await asyncio.sleep(min(self.poll_interval, max(self.ends_at - now, 0.1)))
        except Exception as exc:  # noqa: BLE001 - report as an event, the operator decides
            yield TriggerEvent({"status": "error", "message": str(exc)})


def dag_run_state(dag_id: str, run_id: str) -> str | None:
    """Airflow's state of a dag run (`queued`, `running`, `success`, `failed`), None when no
    such run exists (deleted). Asked through the Task SDK, as ExternalTaskSensor's trigger does
    in Airflow 3: works on a worker and on the triggerer, with no database access of its own."""
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    if RuntimeTaskInstance.get_dr_count(dag_id=dag_id, run_ids=[run_id]) == 0:
        return None
    state = RuntimeTaskInstance.get_dagrun_state(dag_id=dag_id, run_id=run_id)
    return str(getattr(state, "value", state))


class ReleaseSlotTrigger(BaseTrigger):
    """Takes `task_name`'s release slot for `run_id` as soon as it is free (`tuneship.release_slot`),
    then fires `{"status": "taken", "holder", "took_over"}`; an exception is an `error` event.

    A holder whose run has finished or is gone is taken over (its give-back never ran), so
    a killed release never blocks its task. The slot file and the dag-run lookups run in a
    thread; the loop only sleeps."""

    def __init__(self, *, task_name: str, run_id: str, dag_id: str = "llm_release", poll_interval: float = 15.0) -> None:
        super().__init__()
        self.task_name = task_name  # not `task`: BaseTrigger has a read-only `task`
        self.run_id = run_id
        self.dag_id = dag_id
        self.poll_interval = float(poll_interval)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "tuneship_airflow.triggers.ReleaseSlotTrigger",
            {"task_name": self.task_name, "run_id": self.run_id, "dag_id": self.dag_id,
             "poll_interval": self.poll_interval},
        )

    def try_take(self) -> dict[str, Any]:
        from tuneship.release_slot import try_take

        return try_take(self.task_name, self.run_id, dag_id=self.dag_id, run_state=dag_run_state)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            while True:
                result = await asyncio.to_thread(self.try_take)
                if result["taken"]:
                    yield TriggerEvent({"status": "taken", "holder": result["holder"], "took_over": result["took_over"]})
                    return
                self.log.info("release slot of task %s held by run %s (%s); waiting", self.task_name,
                              result["holder"]["run_id"], result["holder_state"])
                await asyncio.sleep(self.poll_interval)
        except Exception as exc:  # noqa: BLE001 - report as an event, the operator decides
            yield TriggerEvent({"status": "error", "message": str(exc)})


class IncomingBatchTrigger(BaseEventTrigger):
    """Fires when a batch of training data has finished landing in a task's landing location.

    `directories` maps each task to its landing location. A batch is a directory under one
    of them holding train/eval files; the uploader marks it
    complete by writing `marker` (`_SUCCESS`, the Hadoop/Spark convention) after the data
    files, so a half-copied batch is never validated. The trigger claims each marker by
    renaming it to `<marker>.claimed` (atomic, so a restarted triggerer or a second one never
    fires twice for a batch) and yields one event per batch, oldest first, with the batch's
    `task` and `dataset_uri`; it keeps watching. The directory is scanned in a thread so the triggerer's
    loop never blocks.
    """

    def __init__(self, *, directories: dict[str, str], marker: str = "_SUCCESS", poke_interval: float = 30.0):
        super().__init__()
        self.directories = dict(directories)
        self.marker = marker
        self.poke_interval = poke_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "tuneship_airflow.triggers.IncomingBatchTrigger",
            {"directories": self.directories, "marker": self.marker, "poke_interval": self.poke_interval},
        )

    def claim_ready(self) -> list[tuple[str, str]]:
        """Claim every batch whose marker is present; return (task, path), oldest first."""
        import os

        ready = []
        for task, directory in sorted(self.directories.items()):
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for e in entries:
                marker = os.path.join(e.path, self.marker)
                if e.is_dir() and os.path.isfile(marker):
                    ready.append((os.stat(marker).st_mtime, task, e.path, marker))
        claimed = []
        for _, task, path, marker in sorted(ready):
            try:
                os.replace(marker, marker + ".claimed")
            except FileNotFoundError:  # another triggerer claimed it first
                continue
            claimed.append((task, path))
        return claimed

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            for task, path in await asyncio.to_thread(self.claim_ready):
                self.log.info("training data landed for task %s: %s", task, path)
                yield TriggerEvent({"task": task, "dataset_uri": path})
            await asyncio.sleep(self.poke_interval)
