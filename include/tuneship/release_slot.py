"""One release at a time per task: a slot file per task that a release run holds from its
first step to its last.

Two releases of the same task must not overlap (they share that task's colours, routes and
inference-log partition); releases of different tasks may. `llm_release` therefore runs
several runs at once and serialises them per task here: a run takes its task's slot before
it touches serving and gives it back at the end, whatever happened in between.

The slot is `TUNESHIP_HOME/release/slots/<task>.json` holding the holder's dag id, run id and
when it took the slot. Every read-modify-write happens under an exclusive flock on a lock
file beside it (the gateway's routes use the same scheme), so two runs never both take it.
Taking is re-entrant for the holder (a retried or resumed take is a no-op), and giving back
only ever removes the caller's own hold.

A holder that no longer runs (its run finished, failed, was marked failed or deleted
without its give-back running) must not block its task forever, and no expiry can tell a
dead 72-hour release from a live one. So a waiter asks `run_state(holder_run_id)` (the
orchestrator's answer: Airflow's dag-run state in `tuneship_airflow`) and takes the slot
over from a holder whose run is finished or gone. No Airflow import here: the caller
passes the lookup.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tuneship import atomic, config

# Dag-run states in which a run can no longer give its slot back by itself.
FINISHED = frozenset({"success", "failed"})


class SlotError(RuntimeError):
    """A slot file that cannot be read; the message names it and what to do."""


def slot_path(task: str) -> Path:
    return config.home() / "release" / "slots" / f"{task}.json"


@contextlib.contextmanager
def _locked(task: str) -> Iterator[Path]:
    """The slot's read-modify-write section, exclusive across processes and machines that
    share TUNESHIP_HOME. Held for milliseconds; the kernel drops it if the holder dies."""
    path = slot_path(task)
    with atomic.exclusive(path.with_name(f"{path.name}.lock")):
        yield path


def _read(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SlotError(f"release slot {path} is unreadable ({exc}); delete it if no release of this task "
                        "is running") from None
    if not isinstance(holder, dict) or not holder.get("run_id"):
        raise SlotError(f"release slot {path} names no run_id; delete it if no release of this task is running")
    return holder


def holder(task: str) -> dict[str, Any] | None:
    """Who holds `task`'s release slot now (None: free)."""
    with _locked(task) as path:
        return _read(path)


def try_take(task: str, run_id: str, *, dag_id: str = "llm_release",
             run_state: Callable[[str, str], str | None], now: float | None = None) -> dict[str, Any]:
    """Take `task`'s slot for `run_id` if it is free, already ours, or held by a run that no
    longer runs (`run_state(dag_id, run_id)` is `success`/`failed`, or None: no such run).

    Returns `{"taken": bool, "holder": <the holder now>, "holder_state": <its run state when
    someone else holds it>, "took_over": <the stale holder replaced, else None>}`."""
    with _locked(task) as path:
        current = _read(path)
        took_over = None
        if current is not None and current["run_id"] != run_id:
            state = run_state(current.get("dag_id") or dag_id, current["run_id"])
            if state is not None and state not in FINISHED:
                return {"taken": False, "holder": current, "holder_state": state, "took_over": None}
            took_over = {**current, "state": state or "gone"}
        if current is not None and current["run_id"] == run_id:
            return {"taken": True, "holder": current, "holder_state": None, "took_over": None}
        mine = {"task": task, "dag_id": dag_id, "run_id": run_id,
                "taken_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now))}
        atomic.write_text(path, json.dumps(mine))
        return {"taken": True, "holder": mine, "holder_state": None, "took_over": took_over}


def give_back(task: str, run_id: str) -> bool:
    """Free `task`'s slot if `run_id` holds it; True when this call freed it. Giving back a
    slot someone else holds (taken over after this run was declared gone) changes nothing."""
    with _locked(task) as path:
        current = _read(path)
        if current is None or current["run_id"] != run_id:
            return False
        path.unlink()
        return True
