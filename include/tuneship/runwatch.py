"""Waiting for Airflow DAG runs through the REST API, with a line per task state change.

One home for the idea: `make demo` (tuneship.demo) and the `tuneship` CLI both wait here.
A failed run's "reason" is each failed task's id and the tail of its log, so a CI job's
output says what broke without opening the Airflow UI.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TERMINAL = {"success", "failed"}
QUIET = {"none", "scheduled", "queued"}  # states not worth a progress line


class RunTimeout(TimeoutError):
    """The run (or whatever was waited for) did not finish before the deadline."""


@dataclass
class RunWatcher:
    """Polls runs and task instances of one Airflow (an `AirflowAPI`), emitting a line each
    time a task reaches a new state. `timeout` counts from construction, across every wait."""

    api: Any
    timeout: float
    emit: Callable[[str], None] = print
    poll_s: float = 2.0
    seen: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.timeout

    def tick(self, what: str) -> None:
        """Sleep one poll interval, or raise RunTimeout once the deadline has passed."""
        if time.monotonic() > self.deadline:
            raise RunTimeout(f"timed out after {self.timeout:.0f}s waiting for {what}")
        time.sleep(self.poll_s)

    def report_tasks(self, dag_id: str, run_id: str) -> list[dict]:
        tis = self.api.task_instances(dag_id, run_id)
        for ti in tis:
            key = (dag_id, run_id, ti["task_id"])
            state = ti.get("state") or "none"
            if self.seen.get(key) != state and state not in QUIET:
                self.seen[key] = state
                self.emit(f"  {dag_id}.{ti['task_id']}: {state}")
        return tis

    def wait_run(self, dag_id: str, run_id: str) -> dict:
        """The run once it is terminal (success or failed)."""
        while True:
            run = self.api.run(dag_id, run_id)
            self.report_tasks(dag_id, run_id)
            if run["state"] in TERMINAL:
                self.emit(f"{dag_id} {run_id}: {run['state'].upper()}")
                return run
            self.tick(f"{dag_id} {run_id}")

    def wait_new_run(self, dag_id: str, after: set[str], run_type: str | None = None,
                     task: str | None = None) -> str:
        """The id of the first run of `dag_id` not in `after` (runs started by Asset events).
        `task`: only a run whose `which_task` XCom chose that task (runs of other tasks start
        beside it)."""
        other: set[str] = set()
        while True:
            for run in self.api.runs(dag_id):
                rid = run["dag_run_id"]
                if rid in after or rid in other or (run_type is not None and run["run_type"] != run_type):
                    continue
                if task is not None:
                    chosen = self.api.xcom(dag_id, rid, "which_task")
                    if chosen is None:
                        if run["state"] in ("success", "failed"):
                            other.add(rid)  # decided nothing (a skipped run: its events were handled)
                        continue  # not decided yet: look again next time
                    if chosen.get("task") != task:
                        other.add(rid)
                        continue
                self.emit(f"{dag_id} started{f' for {task}' if task else ''}: {rid} ({run['run_type']})")
                return rid
            self.tick(f"a new {dag_id} run{f' for {task}' if task else ''}")


@dataclass(frozen=True)
class TaskFailure:
    task_id: str
    try_number: int
    log_tail: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "try_number": self.try_number, "log_tail": self.log_tail}


def log_tail(text: str, lines: int = 20) -> list[str]:
    """The last `lines` non-empty lines of a task log (AirflowAPI.task_log renders Airflow's
    structured events as lines, the exception of an error event included)."""
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]


def failures(api: Any, dag_id: str, run_id: str, lines: int = 20) -> list[TaskFailure]:
    """Each failed task of a run with the tail of its last try's log: why the run failed."""
    out = []
    for ti in api.task_instances(dag_id, run_id):
        if ti.get("state") != "failed":
            continue
        try_number = int(ti.get("try_number") or 1)
        try:
            # a mapped task instance (one per task file, say) is addressed by its map index
            text = api.task_log(dag_id, run_id, ti["task_id"], try_number, map_index=int(ti.get("map_index", -1)))
        except Exception as exc:  # noqa: BLE001 - the reason is best effort; the task id still counts
            text = f"(could not read the log: {type(exc).__name__}: {exc})"
        out.append(TaskFailure(ti["task_id"], try_number, log_tail(text, lines)))
    return out
