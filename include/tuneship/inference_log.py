"""The inference log: layout, record shapes and the reader that joins live and shadow answers.

Layout (docs/CONTRACTS.md): one partition per served model,
``<root>/served_model=<name>/dt=YYYY-MM-DD/hour=HH/<replica>.jsonl`` (UTC), one JSON object
per line, appended by the gateway's background writer. Logs written before per-model
routing sit at ``<root>/dt=.../hour=...`` and are read as part of "every model". Pure
Python, no FastAPI, so the shadow verdict and the drift monitor can import it anywhere.
`read_inference_log(root, model=...)` reads one served model's partition only (what a
task's shadow verdict, post-switch guard and drift monitor want); without `model`, every
partition.

Two kinds of line, joined by `request_id`:

* ``"kind": "request"`` -- written when the live answer is done:
  ts, request_id, replica, endpoint, served_model, model (as the client sent it), role,
  key_id, prompt, max_tokens,
  live: {colour, version, model, completion, latency_ms, status[, error]},
  shadow: null                                  (no shadow colour, or not sampled)
        | {colour, version, model, status: "pending"}  (copied; result follows)
        | {colour, version, model, status: "dropped"}  (mirror queue full, never sent),
  prompt_tokens, completion_tokens.
* ``"kind": "shadow"`` -- written when the mirrored call finishes (the live response never
  waits for it): ts (the *request's* ts, so it lands in the same partition file as its
  request line), request_id, served_model, replica, completed_at,
  shadow: {colour, version, model, completion, latency_ms, status[, error]}, or
  {colour, version, model, completion: null, status: "dropped", reason: "route_changed"}
  when the copy was still queued after its route stopped being the shadow (switch, rollback,
  shadow cleared) and so was never sent.

`status` is the HTTP status the gateway answered (live) or would have (shadow): 200 ok,
502/503/504 upstream failures. A "pending" shadow that never gets its second line means the
replica stopped before the shadow answered.

`read_inference_log` returns one merged dict per request in the contract's shape
(the shadow line's object replaces the request's "pending" placeholder).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

_PART = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")
_HOUR = re.compile(r"^hour=(\d{2})$")


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_ts(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def parse_ts(value: str | datetime | float) -> datetime:
    """ISO string, datetime (naive = UTC) or Unix epoch seconds -> aware UTC datetime."""
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=UTC)
    ts = value if isinstance(value, datetime) else datetime.fromisoformat(value.replace("Z", "+00:00"))
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


_MODEL_PART = re.compile(r"^served_model=([a-z][a-z0-9_.-]{0,63})$")


def model_root(root: Path | str, served_model: str) -> Path:
    """One served model's partition of the log."""
    if not _MODEL_PART.match(f"served_model={served_model}"):
        raise ValueError(f"served model {served_model!r} is not a valid served-model name "
                         "(1-64 characters a-z 0-9 _ . -, starting with a letter)")
    return Path(root) / f"served_model={served_model}"


def partition_dir(root: Path | str, ts: datetime, served_model: str | None = None) -> Path:
    """The hour's directory; `served_model=None` is the legacy single-model layout."""
    ts = ts.astimezone(UTC)
    base = model_root(root, served_model) if served_model is not None else Path(root)
    return base / f"dt={ts:%Y-%m-%d}" / f"hour={ts:%H}"


def partition_file(root: Path | str, ts: datetime, replica: str, served_model: str | None = None) -> Path:
    return partition_dir(root, ts, served_model) / f"{replica}.jsonl"


def served_models(root: Path | str) -> list[str]:
    """The served models that have a partition in the log, sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(m.group(1) for d in root.iterdir() if (m := _MODEL_PART.match(d.name)) and d.is_dir())


def _files(root: Path, since: datetime | None, until: datetime | None, model: str | None = None) -> Iterator[Path]:
    if model is not None:
        yield from _hour_files(model_root(root, model), since, until)
        return
    yield from _hour_files(root, since, until)  # legacy, before per-model partitions
    for name in served_models(root):
        yield from _hour_files(model_root(root, name), since, until)


def _hour_files(root: Path, since: datetime | None, until: datetime | None) -> Iterator[Path]:
    if not root.is_dir():
        return
    for day in sorted(root.iterdir()):
        m = _PART.match(day.name)
        if not m or not day.is_dir():
            continue
        for hour in sorted(day.iterdir()):
            h = _HOUR.match(hour.name)
            if not h or not hour.is_dir():
                continue
            start = datetime.fromisoformat(f"{m.group(1)}T{h.group(1)}:00:00+00:00")
            if since is not None and start + timedelta(hours=1) <= since:
                continue
            if until is not None and start > until:
                continue
            yield from sorted(hour.glob("*.jsonl"))


def iter_lines(root: Path | str, since: datetime | None = None, until: datetime | None = None,
               model: str | None = None) -> Iterator[dict[str, Any]]:
    """Raw lines (both kinds), skipping partial/corrupt lines (e.g. a torn last line)."""
    for path in _files(Path(root), since, until, model):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict) and "request_id" in obj:
                    yield obj


def read_inference_log(
    root: Path | str,
    since: datetime | str | float | None = None,
    until: datetime | str | float | None = None,
    model: str | None = None,
) -> list[dict[str, Any]]:
    """Joined records (one per request, contract shape), oldest first.

    `since`/`until` (datetime, ISO string or epoch seconds; naive = UTC) bound the request's ts, inclusive
    of `since`, exclusive of `until`. `model`: one served model's partition; None: every one.
    """
    lo = parse_ts(since) if since is not None else None
    hi = parse_ts(until) if until is not None else None
    requests: dict[str, dict[str, Any]] = {}
    shadows: dict[str, dict[str, Any]] = {}
    for obj in iter_lines(root, lo, hi, model):
        kind = obj.get("kind", "request")
        if kind == "shadow":
            shadows[obj["request_id"]] = obj
        elif kind == "request":
            requests[obj["request_id"]] = obj
    out = []
    for rid, rec in requests.items():
        try:
            ts = parse_ts(rec["ts"])
        except (KeyError, ValueError, TypeError):
            continue
        if (lo is not None and ts < lo) or (hi is not None and ts >= hi):
            continue
        rec = dict(rec)
        rec.pop("kind", None)
        sh = shadows.get(rid)
        if sh is not None and isinstance(sh.get("shadow"), dict):
            rec["shadow"] = {**sh["shadow"], "completed_at": sh.get("completed_at")}
        out.append((ts, rec))
    out.sort(key=lambda p: p[0])
    return [rec for _, rec in out]
