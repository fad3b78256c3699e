"""Which run answers for which asset event: no event is trained twice, and none is lost.

Airflow 3.3 can leave an asset event to no run at all (apache/airflow#56050, fixed upstream
in 3.4 by #70972). The scheduler keeps one queue row per (asset, consumer DAG) stamped with
the FIRST queued event's time; when it creates the run it consumes the events up to that
stamp and deletes the row. A second event of the same asset that was queued behind the
first (while the consumer sat at `max_active_runs`, or between the scheduler's read and its
delete) is newer than the stamp, so that run does not take it, and its queue row is gone,
so no run is coming for it until some later event arrives.

Every such stray is newer than the `run_after` of the run whose creation stranded it, and
was committed before that run's first task started. So each asset-triggered run also reads
the recent events of its assets (`recent`, through Airflow's own event API) and takes the
ones no run has claimed. A claim is a small file per event under
`TUNESHIP_HOME/state/event-claims/<scope>/`, naming the run that answers for the event; a
later run that the scheduler hands an already-claimed event (it was queued normally, and an
earlier run took it as a stray) leaves it alone. Claims are written under one flock, so two
runs never both claim an event, and re-claiming by the same run (a retry) is a no-op.

An event is identified by its asset's name and its timestamp (microseconds, UTC): the
triggering events a task sees carry no id. Every asset-scheduled DAG does this
(`llm_data_validation`, `llm_finetune`, `llm_release`), each in its own scope. No Airflow
import here; `tuneship_airflow.assets.recent_events` reads the recent events.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuneship import atomic, config

# How far before a run's `run_after` to look for strays: an event stamped just before the
# scheduler's cut-off but committed just after it is a stray too (other databases than
# SQLite allow that interleaving). Events in the margin that a run took are claimed.
STRAY_MARGIN_S = 60.0


def claims_dir(scope: str) -> Path:
    return config.home() / "state" / "event-claims" / scope


def _iso(ts: Any) -> str:
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    if not isinstance(ts, datetime) or ts.tzinfo is None:
        raise ValueError(f"an asset event's timestamp must be timezone-aware, got {ts!r}")
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def records(asset_events: Mapping[Any, Iterable[Any]] | None) -> list[dict[str, Any]]:
    """Airflow's asset events (`triggering_asset_events`, or `inlet_events[asset]` lists keyed
    by asset) as plain records, oldest first: `{key, asset, timestamp, extra}`."""
    out = []
    for asset, events in (asset_events or {}).items():
        name = getattr(asset, "name", None) or str(asset)
        for e in events:
            ts = _iso(e.timestamp)
            out.append({"key": f"{name}@{ts}", "asset": name, "timestamp": ts, "extra": dict(e.extra or {})})
    return sorted(out, key=lambda r: (r["timestamp"], r["asset"]))


def _path(scope: str, key: str) -> Path:
    return claims_dir(scope) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def owner(scope: str, key: str) -> str | None:
    """The run that claimed event `key` (None: nobody yet)."""
    path = _path(scope, key)
    try:
        return json.loads(path.read_text())["run_id"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as exc:
        raise RuntimeError(f"event claim {path} is unreadable ({exc}); it names the run that handled "
                           f"event {key}: delete it only if no run handled that event") from None


def claim(scope: str, events: list[dict[str, Any]], run_id: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Claim `events` for `run_id`. Returns (the events this run answers for, in order;
    {key: other run id} for those another run claimed first)."""
    mine, others = [], {}
    if not events:
        return mine, others
    lock = claims_dir(scope) / ".lock"
    with atomic.exclusive(lock):
        for event in events:
            holder = owner(scope, event["key"])
            if holder is None:
                atomic.write_text(_path(scope, event["key"]), json.dumps(
                    {"event": event["key"], "run_id": run_id, "claimed_at": time.time(),
                     "task": event["extra"].get("task")}))
                holder = run_id
            if holder == run_id:
                mine.append(event)
            else:
                others[event["key"]] = holder
    return mine, others


def take(scope: str, triggering: Mapping[Any, Iterable[Any]] | None, recent: Mapping[Any, Iterable[Any]] | None,
         run_id: str) -> dict[str, Any]:
    """The events run `run_id` answers for: those the scheduler gave it (`triggering`) and the
    strays among `recent`, less any another run claimed first. Returns `events` (this run's,
    oldest first), `given` (those of them the scheduler gave it), `strays` (keys taken as
    strays), `already_handled` ({key: run} for given events another run took) and
    `nothing_left` (the scheduler gave it events and every one was handled elsewhere)."""
    consumed = records(triggering)
    seen = {e["key"] for e in consumed}
    strays = [e for e in records(recent) if e["key"] not in seen]
    mine, elsewhere = claim(scope, consumed + strays, run_id)
    mine.sort(key=lambda e: (e["timestamp"], e["asset"]))
    return {"events": mine, "given": [e for e in mine if e["key"] in seen],
            "strays": [e["key"] for e in mine if e["key"] not in seen],
            "already_handled": {k: r for k, r in elsewhere.items() if k in seen},
            "nothing_left": bool(consumed) and not mine}


def newest_by_task(events: list[dict[str, Any]], default: Callable[[], str]) -> dict[str, dict[str, Any]]:
    """Each task's newest event (an event without `extra.task` is the `default()` task's;
    asked only then: with several tasks and none configured as default, it raises)."""
    newest: dict[str, dict[str, Any]] = {}
    for e in sorted(events, key=lambda e: e["timestamp"]):
        newest[e["extra"].get("task") or default()] = e
    return newest


def chosen_task(took: dict[str, Any], task_param: str | None, default: Callable[[], str]) -> str | None:
    """The task a run handles: the one named in its form, else the newest event's that the
    scheduler gave it (what its UI shows; strays fan out), else its newest stray's, else
    `default()`. None: every event it was given was handled elsewhere and no task was named."""
    if took["nothing_left"] and not task_param:
        return None
    given = took["given"] or took["events"]
    return task_param or (given[-1]["extra"].get("task") if given else None) or default()


def report(took: dict[str, Any]) -> dict[str, Any]:
    """What a run's XCom says of its claims: the strays it took, the events others handled."""
    return {"strays": took["strays"], "already_handled": took["already_handled"]}
