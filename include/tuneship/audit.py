"""The audit trail: every release decision, who made it, when, why and on which figures.

One append-only JSONL file, `TUNESHIP_HOME/audit/audit.jsonl`, one record a line. Each
record carries the previous record's hash (`prev`) and its own (`hash`: SHA-256 over the
canonical JSON of the record without `hash`), so an edited record no longer matches its
hash, and a deleted or reordered one breaks the next record's `prev`. `audit/HEAD` names
the newest record (seq and hash), so cutting records off the end is caught too.

This makes edits evident, not impossible: anyone who can write the file can also rewrite
every hash after an edit. Keep the newest `hash` somewhere else (a ticket, a Slack post)
when that matters; `verify` then shows whether the file still leads to it.

Writers are separate processes (Airflow runs each task in its own), so each append takes
the cross-process lock (`tuneship.atomic.exclusive`), reads the last record's hash, writes
one line, fsyncs and updates HEAD before letting go. A writer killed mid-line leaves a line
without its newline (a torn write): `verify` reports it; the next writer moves those bytes
to `audit.jsonl.torn` and records that it did (`torn_write_quarantined`, with the bytes'
SHA-256) before its own record, so the chain goes on and nothing disappears unseen.

`python -m tuneship.audit show|verify` (also `tuneship audit ...`): docs/CLI.md.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuneship import atomic, config

GENESIS = "0" * 64  # the first record's `prev`
MAX_FIGURES_BYTES = 16_384  # "a small JSON object": figures, not reports (link to those)
TORN_SUFFIX = ".torn"

# The closed set of actions, each with what it means (shown by `show --help` and the docs).
ACTIONS: dict[str, str] = {
    "dataset_accepted": "a training-data batch passed validation and was versioned",
    "dataset_rejected": "a training-data batch failed validation",
    "version_registered": "a fine-tuned model version was registered (@challenger)",
    "gates_passed": "a candidate passed its evaluation gates",
    "gates_failed": "a candidate failed its evaluation gates",
    "approval_requested": "a release waits for a person's approval",
    "approved": "a person approved a release",
    "refused": "a person refused a release",
    "release_held": "a release was held for a person (inconclusive or hold verdict)",
    "switch": "live traffic moved to a new version (@champion follows)",
    "canary_step": "a canary step ended (passed: next weight; breached: rolled back)",
    "rollback": "traffic went back to the previous version (automatic or by a person)",
    "retire": "a replaced version was unloaded after its retention window",
    "retrain_requested": "the drift governor requested a retrain",
    "retrain_refused": "the drift governor saw drift and refused a retrain (debounce, cooldown, budget...)",
    "torn_write_quarantined": "(written by the audit trail itself) a torn last line was moved aside",
}
_SYSTEM_ACTIONS = {"torn_write_quarantined"}
_SYSTEM_ACTOR = "tuneship.audit"
FIELDS = ("seq", "at", "actor", "action", "task", "version", "reason", "figures", "links", "key", "prev", "hash")


class AuditError(ValueError):
    """A record that cannot be written as given (unknown action, bad figures...), or a trail
    that cannot be extended; the message names the field and what to do."""


# ------------------------------------------------------------------ paths and encoding


def audit_path() -> Path:
    """`TUNESHIP_HOME/audit/audit.jsonl`."""
    return config.home() / "audit" / "audit.jsonl"


def _head_path(path: Path) -> Path:
    return path.with_name("HEAD") if path.name == "audit.jsonl" else path.with_name(path.name + ".HEAD")


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def canonical(obj: Any) -> bytes:
    """The bytes a record's hash is taken over: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the canonical JSON of `record` without its `hash`."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def default_actor() -> str:
    """Who is acting when the caller does not say: inside an Airflow task
    `airflow:<dag_id>/<task_id>` (the task runner exports AIRFLOW_CTX_*), else
    TUNESHIP_ACTOR, else the login name."""
    dag, task = os.environ.get("AIRFLOW_CTX_DAG_ID"), os.environ.get("AIRFLOW_CTX_TASK_ID")
    if dag and task:
        return f"airflow:{dag}/{task}"
    return os.environ.get("TUNESHIP_ACTOR") or getpass.getuser()


def _airflow_links() -> dict[str, str]:
    run = os.environ.get("AIRFLOW_CTX_DAG_RUN_ID")
    return {"dag_run_id": run} if run and os.environ.get("AIRFLOW_CTX_DAG_ID") else {}


def run_key(*parts: object) -> str | None:
    """An idempotency `key` for `record` inside an Airflow task: `<dag>/<run>/<task>/<parts>`,
    the same on every try of that task instance (so a retry does not record twice); None
    outside Airflow (every call records)."""
    ctx = [os.environ.get(f"AIRFLOW_CTX_{k}") for k in ("DAG_ID", "DAG_RUN_ID", "TASK_ID")]
    return "/".join([*ctx, *(str(p) for p in parts)]) if all(ctx) else None  # type: ignore[list-item]


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ------------------------------------------------------------------ validation


def _check_json(value: Any, where: str) -> None:
    """Plain JSON only (str, int, float, bool, None, lists, objects with string keys),
    finite numbers; the error names the path inside figures."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditError(f"{where} is {value!r}: figures must be finite numbers (use null for 'no value')")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise AuditError(f"{where} has the key {k!r} ({type(k).__name__}): keys must be strings")
            _check_json(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]")
        return
    raise AuditError(f"{where} is a {type(value).__name__} ({value!r:.60}), not a JSON value (string, number, "
                     "bool, null, list, object): convert it (float(), int(), str()) before recording")


def _nonempty(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise AuditError(f"audit field {field!r} must be a non-empty string, got {value!r}")
    return value


def build_record(action: str, *, task: str, reason: str, actor: str | None = None,
                 version: str | int | None = None, figures: Mapping[str, Any] | None = None,
                 links: Mapping[str, str] | None = None, key: str | None = None) -> dict[str, Any]:
    """A validated record without seq, at, prev and hash (those are set under the lock)."""
    if action not in ACTIONS or action in _SYSTEM_ACTIONS:
        allowed = ", ".join(a for a in ACTIONS if a not in _SYSTEM_ACTIONS)
        raise AuditError(f"unknown audit action {action!r}: use one of {allowed}")
    if figures is not None and not isinstance(figures, Mapping):
        raise AuditError(f"audit figures must be a JSON object (a dict of named figures), got a "
                         f"{type(figures).__name__}")
    figures = dict(figures or {})
    _check_json(figures, "figures")
    size = len(canonical(figures))
    if size > MAX_FIGURES_BYTES:
        raise AuditError(f"audit figures are {size} bytes of JSON, over {MAX_FIGURES_BYTES}: record the "
                         "deciding figures and put the full report in a file named in `links`")
    if links is not None and not isinstance(links, Mapping):
        raise AuditError(f"audit links must be a dict of names to strings, got a {type(links).__name__}")
    links = dict(links or {})
    for k, v in links.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise AuditError(f"audit links must map names to strings (URIs, paths, run ids); {k!r}: {v!r} is not")
    if version is not None and (isinstance(version, bool) or not isinstance(version, (str, int))
                                or not str(version).strip()):
        raise AuditError(f"audit field 'version' must be a version number or string, got {version!r}")
    if key is not None:
        _nonempty(key, "key")
    return {"actor": _nonempty(default_actor() if actor is None else actor, "actor"), "action": action,
            "task": _nonempty(task, "task"), "version": None if version is None else str(version),
            "reason": _nonempty(reason, "reason"), "figures": figures, "links": {**_airflow_links(), **links},
            "key": key}


# ------------------------------------------------------------------ appending


def _last_line(fd: int, size: int) -> tuple[bytes, int]:
    """The file's last line (with its newline, if it has one) and the offset where it starts."""
    block, pos, tail = 8192, size, b""
    while pos > 0:
        step = min(block, pos)
        pos -= step
        tail = os.pread(fd, step, pos) + tail
        cut = tail.rfind(b"\n", 0, len(tail) - 1)  # a newline before the last byte
        if cut >= 0:
            return tail[cut + 1:], pos + cut + 1
    return tail, 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal(body: dict[str, Any], seq: int, prev: str) -> dict[str, Any]:
    rec = {"seq": seq, "at": _utc_now(), **body, "prev": prev}
    rec = {k: rec[k] for k in FIELDS if k != "hash"}
    return {**rec, "hash": record_hash(rec)}


def _line(rec: Mapping[str, Any]) -> bytes:
    return canonical(rec) + b"\n"


def _with_key(data: bytes, key: str) -> dict[str, Any] | None:
    """The first record in `data` whose key is `key` (a cheap byte search first)."""
    needle = b'"key":' + json.dumps(key, ensure_ascii=False).encode("utf-8")
    if needle not in data:
        return None
    for raw in data.split(b"\n"):
        if needle in raw:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("key") == key:
                return rec
    return None


def _append_locked(path: Path, body: dict[str, Any]) -> dict[str, Any]:
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if created:
            _fsync_dir(path.parent)
        size = os.fstat(fd).st_size
        last, start = _last_line(fd, size) if size else (b"", 0)
        quarantine = None
        if last and not last.endswith(b"\n"):  # torn write: move it aside, say so, chain on
            torn = path.with_name(path.name + TORN_SUFFIX)
            with open(torn, "ab") as f:
                f.write(json.dumps({"at": _utc_now(), "offset": start, "sha256": hashlib.sha256(last).hexdigest(),
                                    "text": last.decode("utf-8", "replace"),
                                    "base64": base64.b64encode(last).decode("ascii")}).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            os.ftruncate(fd, start)
            os.fsync(fd)
            quarantine = {"offset": start, "bytes": len(last), "sha256": hashlib.sha256(last).hexdigest(),
                          "moved_to": torn.name}
            size = start
            last, start = _last_line(fd, size) if size else (b"", 0)
        if last:
            try:
                prev_rec = json.loads(last)
                seq, prev = int(prev_rec["seq"]), str(prev_rec["hash"])
            except (ValueError, KeyError, TypeError):
                line_no = os.pread(fd, start, 0).count(b"\n") + 1
                raise AuditError(f"{path}: line {line_no} (the last) is not an audit record, so there is no "
                                 "hash to chain onto; run `python -m tuneship.audit verify` and have a person "
                                 "restore the file from its backup") from None
        else:
            seq, prev = 0, GENESIS
        found = _with_key(os.pread(fd, size, 0), body["key"]) if body["key"] is not None and size else None
        if found is not None and quarantine is None:
            return found
        written = []
        if quarantine is not None:
            note = {"actor": _SYSTEM_ACTOR, "action": "torn_write_quarantined", "task": "-", "version": None,
                    "reason": f"a writer died mid-line: {quarantine['bytes']} bytes without a newline at offset "
                              f"{quarantine['offset']} moved to {quarantine['moved_to']}",
                    "figures": quarantine, "links": {}, "key": None}
            written.append(_seal(note, seq + 1, prev))
            seq, prev = seq + 1, written[-1]["hash"]
        if found is None:
            written.append(_seal(body, seq + 1, prev))
        _write_all(fd, b"".join(_line(r) for r in written))
        os.fsync(fd)
    finally:
        os.close(fd)
    newest = written[-1]
    atomic.write_text(_head_path(path), json.dumps({"seq": newest["seq"], "hash": newest["hash"]}) + "\n")
    return found if found is not None else newest


def record(action: str, *, task: str, reason: str, actor: str | None = None, version: str | int | None = None,
           figures: Mapping[str, Any] | None = None, links: Mapping[str, str] | None = None,
           key: str | None = None, path: Path | None = None) -> dict[str, Any]:
    """Append one decision to the audit trail and return the written record.

    `actor` defaults to `default_actor()` (inside an Airflow task: `airflow:<dag>/<task>`,
    and `links` gets the DAG run id). `key` makes the append idempotent: when a record with
    the same key is already in the trail, that record is returned and nothing is written (an
    Airflow retry of the same decision; e.g. `f"{run_id}/switch/v{version}"`). Raises
    AuditError, naming the field, for an unknown action, bad figures (non-JSON values, NaN,
    over 16 KiB), or a trail whose last line is not a record."""
    body = build_record(action, task=task, reason=reason, actor=actor, version=version, figures=figures,
                        links=links, key=key)
    path = Path(path) if path is not None else audit_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.exclusive(_lock_path(path)):
        return _append_locked(path, body)


# ------------------------------------------------------------------ reading and verifying


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based line number in the file (0: the file as a whole)
    what: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.what}" if self.line else self.what


@dataclass(frozen=True)
class Verdict:
    path: str
    records: int
    problems: tuple[Problem, ...]
    head: dict[str, Any] | None  # the newest record's seq and hash (what to keep elsewhere)
    quarantined: int  # torn writes moved aside (each recorded in the chain)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def summary(self) -> str:
        if not self.ok:
            more = f" ({len(self.problems) - 1} more after it)" if len(self.problems) > 1 else ""
            return f"audit trail {self.path} is BROKEN at {self.first}{more}"
        if not self.records:
            return f"audit trail {self.path}: no records yet"
        torn = f", {self.quarantined} torn write(s) quarantined" if self.quarantined else ""
        return (f"audit trail {self.path}: intact, {self.records} records, newest seq {self.head['seq']} "
                f"hash {self.head['hash']}{torn}")

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "records": self.records, "head": self.head,
                "quarantined": self.quarantined, "problems": [asdict(p) for p in self.problems]}


def _walk(path: Path) -> tuple[list[tuple[int, dict[str, Any] | None, str | None]], list[Problem], dict | None]:
    """Every line with its record (None when unreadable) and what is wrong with it (None: it
    checks out against its own hash and the line before it), plus file-level problems."""
    rows: list[tuple[int, dict[str, Any] | None, str | None]] = []
    extra: list[Problem] = []
    data = path.read_bytes() if path.exists() else b""
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    prev_hash, prev_seq, last = GENESIS, 0, None
    for n, raw in enumerate(lines, 1):
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            rows.append((n, None, f"not a JSON record ({exc}): the line was damaged or written by hand"))
            prev_hash, prev_seq = None, prev_seq + 1 if prev_seq is not None else None
            continue
        missing = [f for f in FIELDS if f not in rec]
        stored = rec.get("hash")
        own_ok = not missing and stored == record_hash(rec)
        if missing:
            why = f"fields missing: {', '.join(missing)}"
        elif not own_ok:
            why = "hash does not match the record's content: the record was edited after it was written"
        elif rec.get("action") not in ACTIONS:
            why = f"unknown action {rec.get('action')!r}"
        elif prev_hash is not None and rec["prev"] != prev_hash:
            why = ("prev does not match the hash of the line before it: a record was deleted, reordered or "
                   "inserted here (or the line before was rewritten with a new hash)")
        elif prev_seq is not None and rec["seq"] != prev_seq + 1:
            why = f"seq {rec['seq']} where seq {prev_seq + 1} was expected: records were deleted or reordered"
        else:
            why = None
        rows.append((n, rec, why))
        # a record that fails its own hash cannot vouch for the next one's prev or seq: the
        # next is checked against what the chain expects, not against the edited values
        prev_hash = stored if own_ok else None
        if own_ok and isinstance(rec.get("seq"), int):
            prev_seq = rec["seq"]
        else:
            prev_seq = prev_seq + 1 if prev_seq is not None else None
        last = rec
    if torn:
        extra.append(Problem(len(lines) + 1, f"torn write: {len(torn)} bytes without a newline at the end (a writer "
                                             "died mid-line, or the file was cut); the next append moves them to "
                                             f"{path.name}{TORN_SUFFIX} and records that"))
    head_file = _head_path(path)
    if head_file.exists():
        try:
            head = json.loads(head_file.read_text(encoding="utf-8"))
            want_seq, want_hash = int(head["seq"]), str(head["hash"])
        except (ValueError, KeyError, TypeError):
            extra.append(Problem(0, f"{head_file.name} is not readable: it should hold the newest seq and hash"))
        else:
            found = [(n, r) for n, r, _ in rows if r is not None and r.get("seq") == want_seq]
            if not found:
                extra.append(Problem(len(lines) + 1, f"{head_file.name} names seq {want_seq}, which the file does "
                                                     "not hold: records were cut off the end"))
            elif found[-1][1].get("hash") != want_hash:
                extra.append(Problem(found[-1][0], f"seq {want_seq} is not the record {head_file.name} names "
                                                   f"(hash {want_hash[:16]}...): it was replaced"))
    elif rows:
        extra.append(Problem(0, f"{head_file.name} is missing beside a non-empty trail (deleted?)"))
    head = {"seq": last["seq"], "hash": last["hash"]} if last else None
    return rows, extra, head


def verify(path: Path | None = None) -> Verdict:
    """Walk the whole trail; the problems in file order (`first`: the first broken place, with
    its line number and what is wrong)."""
    path = Path(path) if path is not None else audit_path()
    rows, extra, head = _walk(path)
    problems = [Problem(n, why) for n, _, why in rows if why] + extra
    problems.sort(key=lambda p: (p.line == 0, p.line))
    quarantined = sum(1 for _, r, why in rows if r and not why and r.get("action") == "torn_write_quarantined")
    return Verdict(str(path), sum(1 for _, r, _ in rows if r is not None), tuple(problems), head, quarantined)


def _since(value: str | datetime | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise AuditError(f"since {value!r} is not an ISO date or time (e.g. 2026-12-01 or "
                         "2026-12-01T15:00:00Z)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _matches(rec: dict[str, Any], task: str | None, action: str | None, since: datetime | None) -> bool:
    if task is not None and rec.get("task") != task:
        return False
    if action is not None and rec.get("action") != action:
        return False
    if since is not None:
        try:
            at = datetime.fromisoformat(str(rec.get("at")))
        except ValueError:
            return True  # an unreadable time is shown, not hidden
        return at >= since
    return True


def read(task: str | None = None, since: str | datetime | None = None, action: str | None = None,
         path: Path | None = None) -> list[dict[str, Any]]:
    """The records (oldest first) for `task`, `action`, from `since` on (ISO; naive = UTC).
    Unreadable lines are left out here: `verified_records` and `verify` show them."""
    return [{k: v for k, v in r.items() if k not in ("verified", "problem", "line")}
            for r in verified_records(task=task, since=since, action=action, path=path) if "seq" in r]


def verified_records(task: str | None = None, since: str | datetime | None = None, action: str | None = None,
                     path: Path | None = None) -> list[dict[str, Any]]:
    """For the UI and `show`: each record (oldest first) with `line` (its line number),
    `verified` (its hash matches its content and its `prev` the line before it) and `problem`
    (what is wrong, or None). An unreadable line is a row with only `line`, `verified` False
    and `problem`, so a damaged trail shows where. Problems of the trail as a whole (a torn
    last line, records cut off the end): `verify`."""
    if action is not None and action not in ACTIONS:
        raise AuditError(f"unknown audit action {action!r}: use one of {', '.join(ACTIONS)}")
    cutoff = _since(since)
    path = Path(path) if path is not None else audit_path()
    rows, _, _ = _walk(path)
    out = []
    for n, rec, why in rows:
        if rec is None:
            if task is None and action is None:
                out.append({"line": n, "verified": False, "problem": why})
            continue
        if _matches(rec, task, action, cutoff):
            out.append({**rec, "line": n, "verified": why is None, "problem": why})
    return out


if __name__ == "__main__":
    from tuneship.cli.audit import main

    main()
