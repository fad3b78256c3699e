"""The inference log: layout, record shapes and the reader that joins live and shadow answers.

Layout (docs/CONTRACTS.md): one partition per served model,
``<root>/served_model=<name>/dt=YYYY-MM-DD/hour=HH/<replica>.jsonl`` (UTC), one JSON object
per line, appended by the gateway's background writer. Logs written before per-model
routing sit at ``<root>/dt=.../hour=...`` and are read as part of "every model". Pure
Python, no FastAPI, so the shadow verdict and the drift monitor can import it anywhere.
`read_inference_log(root, model=...)` reads one served model's partition only (what a
task's shadow verdict, post-switch guard and drift monitor want); without `model`, every
partition.

Three kinds of line, joined by `request_id`:

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

* ``"kind": "feedback"`` -- a client's verdict on an answer (`POST /v1/feedback`), written
  when it arrives (its own ts, so in the hour it arrived, in the served model's partition):
  ts, feedback_id, request_id, replica, served_model, key_id (the caller's key id), rating
  (1-5 | null), task_success (bool | null), comment (str | null)[, pii_redacted].

`status` is the HTTP status the gateway answered (live) or would have (shadow): 200 ok,
502/503/504 upstream failures. A "pending" shadow that never gets its second line means the
replica stopped before the shadow answered.

`read_inference_log` returns one merged dict per request in the contract's shape
(the shadow line's object replaces the request's "pending" placeholder; a request with
feedback from its own client key gains `feedback`, see `read_inference_log`).
`iter_requests` streams the request lines alone, unjoined, for scans over windows too
large to hold (the drift monitor).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

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


class LiveAnswer(msgspec.Struct):
    """What a scan of request lines reads of the live answer (the rest of it is skipped)."""

    status: Any = None
    version: Any = None
    completion: Any = None
    confidence: Any = None


class RequestLine(msgspec.Struct):
    """What a scan reads of each request line, or of a feedback line (`kinds`); other fields
    are skipped unparsed."""

    request_id: Any
    kind: Any = "request"
    ts: Any = None
    prompt: Any = None
    live: LiveAnswer | None = None
    key_id: Any = None
    task_success: Any = None  # a feedback line's


_REQUEST_LINE = msgspec.json.Decoder(RequestLine)


def iter_requests(root: Path | str, since: datetime | str | float | None = None,
                  until: datetime | str | float | None = None,
                  model: str | None = None,
                  kinds: tuple[str, ...] = ("request",),
                  containing: bytes | None = None) -> Iterator[tuple[datetime, RequestLine]]:
    """Request lines one at a time as `(ts, line)`, ts in [since, until), in file order: a
    streaming scan whose memory does not grow with the log (the drift monitor's reader).
    `kinds=("request", "feedback")` also yields feedback lines (their own ts). `containing`:
    only lines holding these bytes are decoded (a cheap prefilter, e.g. b"feedback" for a
    pass over the feedback lines alone; the kind is still checked).

    Unlike `read_inference_log` it joins nothing: shadow lines (and feedback lines unless
    asked for) are skipped, and a request_id written twice is read twice (the gateway writes
    each request line once). Torn, corrupt or non-UTF-8 lines, and lines without a
    request_id or a readable ts, are skipped as `read_inference_log` skips them."""
    lo = parse_ts(since) if since is not None else None
    hi = parse_ts(until) if until is not None else None
    decode = _REQUEST_LINE.decode
    for path in _files(Path(root), lo, hi, model):
        with open(path, "rb") as f:
            for raw in f:
                if containing is not None and containing not in raw:
                    continue
                try:
                    line = decode(raw)
                except msgspec.DecodeError:  # also a ValidationError: a line of another shape
                    continue
                if line.kind not in kinds:
                    continue
                try:
                    ts = parse_ts(line.ts)
                except (ValueError, TypeError, AttributeError):
                    continue
                if (lo is not None and ts < lo) or (hi is not None and ts >= hi):
                    continue
                yield ts, line


def read_inference_log(
    root: Path | str,
    since: datetime | str | float | None = None,
    until: datetime | str | float | None = None,
    model: str | None = None,
    *,
    feedback_stats: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Joined records (one per request, contract shape), oldest first.

    `since`/`until` (datetime, ISO string or epoch seconds; naive = UTC) bound the request's ts, inclusive
    of `since`, exclusive of `until`. `model`: one served model's partition; None: every one.

    Feedback: a request gains ``feedback: {ts, feedback_id, key_id, replica, rating,
    task_success, comment[, pii_redacted], count}`` from the latest (by ts) feedback line sent
    with the *same client key* that made the request (`count`: how many that key sent; the
    older ones are superseded). Feedback sent with any other key is never attached: it is
    counted as `foreign` (a client cannot rate another client's answers). Requests logged
    while keys were not enforced have key_id null and take feedback only from callers without
    a key. Feedback lines are read from the same hour files as the rest, so one that
    arrived after `until`'s hour is not seen by a read bounded by `until`.

    `feedback_stats`: a dict to fill with counts of feedback *lines*: `lines` (all read),
    `attached` (requests that got feedback), `superseded` (older lines of the same key),
    `foreign` (another key's, for a request that was read), `unknown` (no request line with
    that id in what was read) and `outside_window` (the request's ts is outside since/until).
    """
    lo = parse_ts(since) if since is not None else None
    hi = parse_ts(until) if until is not None else None
    requests: dict[str, dict[str, Any]] = {}
    shadows: dict[str, dict[str, Any]] = {}
    # request_id -> {key_id: [latest line from that key, lines from that key]}; sparse.
    feedback: dict[str, dict[Any, list[Any]]] = {}
    n_feedback = 0
    for obj in iter_lines(root, lo, hi, model):
        kind = obj.get("kind", "request")
        if kind == "shadow":
            shadows[obj["request_id"]] = obj
        elif kind == "request":
            requests[obj["request_id"]] = obj
        elif kind == "feedback":
            n_feedback += 1
            by_key = feedback.get(obj["request_id"])
            if by_key is None:
                by_key = feedback[obj["request_id"]] = {}
            held = by_key.get(obj.get("key_id"))
            if held is None:
                by_key[obj.get("key_id")] = [obj, 1]
            else:
                held[1] += 1
                if not _older(obj, held[0]):
                    held[0] = obj
    counts = {"lines": n_feedback, "attached": 0, "superseded": 0, "foreign": 0, "unknown": 0, "outside_window": 0}
    out = []
    for rid, rec in requests.items():
        fb = feedback.pop(rid, None) if feedback else None
        try:
            ts = parse_ts(rec["ts"])
        except (KeyError, ValueError, TypeError):
            ts = None
        if ts is None or (lo is not None and ts < lo) or (hi is not None and ts >= hi):
            if fb:
                counts["outside_window"] += sum(n for _, n in fb.values())
            continue
        rec = dict(rec)
        rec.pop("kind", None)
        sh = shadows.get(rid)
        if sh is not None and isinstance(sh.get("shadow"), dict):
            rec["shadow"] = {**sh["shadow"], "completed_at": sh.get("completed_at")}
        if fb:
            own = fb.pop(rec.get("key_id"), None)
            counts["foreign"] += sum(n for _, n in fb.values())
            if own is not None:
                line, n = own
                rec["feedback"] = {**{k: line.get(k) for k in _FEEDBACK_FIELDS},
                                   **({"pii_redacted": line["pii_redacted"]} if "pii_redacted" in line else {}),
                                   "count": n}
                counts["attached"] += 1
                counts["superseded"] += n - 1
        out.append((ts, rec))
    counts["unknown"] = sum(n for by_key in feedback.values() for _, n in by_key.values())
    if feedback_stats is not None:
        feedback_stats.update(counts)
    out.sort(key=lambda p: p[0])
    return [rec for _, rec in out]


_FEEDBACK_FIELDS = ("ts", "feedback_id", "key_id", "replica", "rating", "task_success", "comment")


def _older(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether feedback line `a` was sent before `b` (a tie, or an unreadable ts: the line
    read later wins). The gateway's ts strings share one format, so they compare as text."""
    ta, tb = a.get("ts"), b.get("ts")
    if isinstance(ta, str) and isinstance(tb, str) and len(ta) == len(tb) and ta[-6:] == tb[-6:] == "+00:00":
        return ta < tb
    try:
        return parse_ts(ta) < parse_ts(tb)  # type: ignore[arg-type]
    except (ValueError, TypeError, AttributeError):
        return False
