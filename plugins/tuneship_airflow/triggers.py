"""Triggers: the release's waits off the worker, and training data landing.

`ShadowWindowTrigger` watches the inference log for a release's shadow window;
`PostSwitchWindowTrigger` watches the new live version's own answers right after the
switch (both with `tuneship.shadow`'s anytime-valid watch, reading only what is new); `IncomingBatchTrigger` is the AssetWatcher trigger that starts llm_data_validation
when a batch finishes landing. `ReleaseSlotTrigger` waits for a task's release slot (one
release at a time per task) without holding a worker.

`serialize()` holds ids and timings only (no secrets, no payloads). `run()` never blocks
the triggerer's loop: log reads go to a thread. The window triggers fire once: as soon as
the evidence decides (no point watching a broken model for 72 hours, nor leaving users on
one for the rest of the post-switch window), else when the window ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent


class _WindowTrigger(BaseTrigger):
    """A window watched by `tuneship.shadow.WindowWatch`: each poll reads only the log lines
    written since the previous one, updates the window's confidence sequences and saves the
    watch to `state_path` (a restarted triggerer resumes from it). Fires once, with the
    window's report, as soon as the watch decides, and at `ends_at` at the latest."""

    mode = "shadow"
    ends_decide = True  # the window's end is the decision's end (a canary step's end is not)

    def __init__(self, *, served_model: str, version: str, since: float, ends_at: float, release: dict[str, Any],
                 state_path: str, poll_interval: float = 15.0) -> None:
        super().__init__()
        self.served_model = served_model
        self.version = str(version)
        self.since = float(since)
        self.ends_at = float(ends_at)
        self.release = dict(release)
        self.state_path = state_path
        self.poll_interval = float(poll_interval)
        self._watch: Any = None
        self._last_verdict: str | None = None

    def _kwargs(self) -> dict[str, Any]:
        return {"served_model": self.served_model, "version": self.version, "since": self.since,
                "ends_at": self.ends_at, "release": self.release, "state_path": self.state_path,
                "poll_interval": self.poll_interval}

    def _checks(self) -> Any:
        return None

    def _start(self, checks: Any) -> Any:
        from tuneship import shadow
        from tuneship.monitor import log_root

        return shadow.WindowWatch.start(mode=self.mode, version=self.version, since=self.since,
                                        rules=shadow.guard_rules(self.release),
                                        policy=shadow.policy_of(self.release, self.ends_at - self.since),
                                        root=log_root(), served_model=self.served_model, checks=checks)

    def poll(self, now: float) -> dict[str, Any]:
        """One poll (in a thread): resume or start the watch, read what is new, decide, save."""
        import json
        from pathlib import Path

        from tuneship import atomic, shadow
        from tuneship.monitor import log_root

        path = Path(self.state_path)
        if self._watch is None:
            checks = self._checks()
            self._watch = (shadow.WindowWatch.from_state(json.loads(path.read_text()), root=log_root(),
                                                         served_model=self.served_model, checks=checks)
                           if path.exists() else self._start(checks))
        before = self._watch.counts["requests"]
        report = self._watch.poll(now, window_over=self.ends_decide and now >= self.ends_at)
        atomic.write_text(path, json.dumps(self._watch.to_state()))
        if report["requests"] != before or report.get("verdict") != self._last_verdict:
            shadow.append_history(path, report, now)  # the Deployments page draws the bounds from it
        self._last_verdict = report.get("verdict")
        return report

    def _event(self, report: dict[str, Any], now: float) -> dict[str, Any] | None:
        raise NotImplementedError

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            while True:
                now = time.time()
                report = await asyncio.to_thread(self.poll, now)
                event = self._event(report, now)
                if event is not None:
                    yield TriggerEvent(event)
                    return
                self.log.info("%s window of v%s: %d answers (%d errors), %d read this poll, %.0fs left",
                              self.mode, self.version, report["requests"], report["errors"],
                              report["bytes_read"], self.ends_at - now)
                await asyncio.sleep(min(self.poll_interval, max(self.ends_at - now, 0.1)))
        except Exception as exc:  # noqa: BLE001 - report as an event, the operator decides
            yield TriggerEvent({"status": "error", "message": str(exc)})


class ShadowWindowTrigger(_WindowTrigger):
    """The candidate's shadow window (`slot` "shadow": live answered the same requests, so the
    paired comparisons apply; "live": a first release, nothing to compare with). Fires
    `{"status": "decided", "verdict": <report>}` once the sequences say promote, rollback
    or (at the window's end, by the task's rule) hold."""

    mode = "shadow"

    def __init__(self, *, task_name: str, slot: str = "shadow", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.task_name = task_name  # not `task`: BaseTrigger has a read-only `task`
        self.slot = slot

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("tuneship_airflow.triggers.ShadowWindowTrigger",
                {**self._kwargs(), "task_name": self.task_name, "slot": self.slot})

    def _checks(self) -> Any:
        from tuneship.shadow import Checks
        from tuneship.tasks import load_task

        return Checks.of(load_task(self.task_name))

    def _start(self, checks: Any) -> Any:
        from tuneship import shadow
        from tuneship.monitor import log_root

        return shadow.WindowWatch.start(
            mode="shadow", version=self.version, since=self.since,
            rules=shadow.shadow_rules(self.release, with_live=self.slot == "shadow", checks=checks),
            policy=shadow.policy_of(self.release, self.ends_at - self.since),
            root=log_root(), served_model=self.served_model, checks=checks)

    def _event(self, report: dict[str, Any], now: float) -> dict[str, Any] | None:
        if report["verdict"] == "continue":
            return None
        self.log.info("shadow window of v%s decided: %s (%s)", self.version, report["verdict"], report["reasons"])
        return {"status": "decided", "verdict": report, "at": now}


class CanaryStepTrigger(ShadowWindowTrigger):
    """One step of a progressive canary: the candidate's answers to its share of live traffic
    (and users' feedback on them), one watch for the whole canary (`since` its first step, so
    the evidence adds up across steps). Fires `breach` as soon as a bound crosses to the bad
    side, else `step_done` when the step's bake time (`ends_at`) is over."""

    mode = "canary"
    ends_decide = False

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("tuneship_airflow.triggers.CanaryStepTrigger",
                {**self._kwargs(), "task_name": self.task_name, "slot": self.slot})

    def _start(self, checks: Any) -> Any:
        from tuneship import shadow
        from tuneship.monitor import log_root

        return shadow.WindowWatch.start(
            mode="canary", version=self.version, since=self.since, rules=shadow.canary_rules(self.release),
            policy=shadow.policy_of({**self.release, "on_open": "hold"}, 72 * 3600.0),
            root=log_root(), served_model=self.served_model, checks=checks)

    def _event(self, report: dict[str, Any], now: float) -> dict[str, Any] | None:
        if report["verdict"] == "rollback":
            self.log.warning("canary of v%s breached: %s", self.version, report["reasons"])
            return {"status": "breach", "verdict": report, "at": now}
        if now >= self.ends_at:
            return {"status": "step_done", "verdict": report, "at": now}
        return None


class PostSwitchWindowTrigger(_WindowTrigger):
    """The new live version's own answers since the switch (`since`). Fires `breach` as soon
    as a bound crosses (`tuneship.shadow.guard_verdict`), else `complete` once `ends_at` has
    passed (verdict `healthy` or `insufficient`); the event carries the verdict (figures only)."""

    mode = "live"

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return "tuneship_airflow.triggers.PostSwitchWindowTrigger", self._kwargs()

    def _event(self, report: dict[str, Any], now: float) -> dict[str, Any] | None:
        from tuneship.shadow import guard_verdict

        over = now >= self.ends_at
        verdict = guard_verdict(report, min_requests=int(float(self.release.get("min_requests", 20))),
                                window_over=over, thresholds=self.release)
        if verdict["verdict"] == "breach":
            self.log.warning("v%s breached after the switch: %s", self.version, verdict["reasons"])
            return {"status": "breach", "verdict": verdict, "at": now}
        if verdict["verdict"] != "watching":
            return {"status": "complete", "verdict": verdict, "at": now}
        return None


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
