"""The inference-log reader joins live and shadow lines and filters by time, any time format."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tuneship.inference_log import partition_file, read_inference_log


def write(root: Path, ts: datetime, obj: dict) -> None:
    path = partition_file(root, ts, "r1")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(obj) + "\n")


def test_join_and_since_as_epoch_iso_or_datetime(tmp_path: Path):
    t0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    for i in range(3):
        ts = t0 + timedelta(minutes=10 * i)
        write(tmp_path, ts, {"kind": "request", "ts": ts.isoformat(), "request_id": f"r{i}", "prompt": f"p{i}",
                             "live": {"colour": "blue", "version": "1", "status": 200},
                             "shadow": {"colour": "green", "version": "2", "status": "pending"}})
    write(tmp_path, t0, {"kind": "shadow", "ts": t0.isoformat(), "request_id": "r0",
                         "shadow": {"colour": "green", "version": "2", "status": 200, "completion": "x"}})
    recs = read_inference_log(tmp_path)
    assert [r["request_id"] for r in recs] == ["r0", "r1", "r2"]
    assert recs[0]["shadow"]["status"] == 200 and recs[1]["shadow"]["status"] == "pending"
    cut = t0 + timedelta(minutes=10)
    for since in (cut, cut.isoformat(), cut.timestamp()):
        assert [r["request_id"] for r in read_inference_log(tmp_path, since=since)] == ["r1", "r2"]


def _req(root: Path, ts: datetime, rid: str, key: str | None, replica: str = "r1") -> None:
    path = partition_file(root, ts, replica)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps({"kind": "request", "ts": ts.isoformat(timespec="microseconds"), "request_id": rid,
                             "key_id": key, "live": {"colour": "blue", "version": "1", "status": 200}}) + "\n")


def _fb(root: Path, ts: datetime, rid: str, key: str | None, replica: str = "r1", **verdict: object) -> None:
    path = partition_file(root, ts, replica)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps({"kind": "feedback", "ts": ts.isoformat(timespec="microseconds"),
                             "feedback_id": f"{rid}-{key}-{ts:%H%M%S}", "request_id": rid, "replica": replica,
                             "key_id": key, "rating": None, "task_success": None, "comment": None,
                             **verdict}) + "\n")


def test_feedback_joins_latest_of_the_requests_own_key(tmp_path: Path):
    t0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    _req(tmp_path, t0, "a", "k1")
    _req(tmp_path, t0 + timedelta(minutes=1), "b", "k1")
    _req(tmp_path, t0 + timedelta(minutes=2), "open", None)
    # k1 rates "a" three times; the latest (by ts) is on replica r0, whose file is read
    # *before* r1's, and a later line in r1 is older: order of reading must not decide.
    _fb(tmp_path, t0 + timedelta(minutes=5), "a", "k1", rating=2)
    _fb(tmp_path, t0 + timedelta(minutes=7), "a", "k1", replica="r0", rating=5, task_success=True)
    _fb(tmp_path, t0 + timedelta(minutes=6), "a", "k1", rating=3)
    # another key's verdict, newest of all: never attached
    _fb(tmp_path, t0 + timedelta(minutes=8), "a", "k2", rating=1, task_success=False)
    _fb(tmp_path, t0 + timedelta(minutes=9), "b", "k2", rating=1)
    # an id the log does not have; a request logged before keys were enforced
    _fb(tmp_path, t0 + timedelta(minutes=9), "zzz", "k1", task_success=True)
    _fb(tmp_path, t0 + timedelta(minutes=9), "open", None, task_success=False, comment="meh")
    stats: dict[str, int] = {}
    recs = {r["request_id"]: r for r in read_inference_log(tmp_path, feedback_stats=stats)}
    assert set(recs) == {"a", "b", "open"}
    fb = recs["a"]["feedback"]
    assert (fb["rating"], fb["task_success"], fb["key_id"], fb["replica"], fb["count"]) == (5, True, "k1", "r0", 3)
    assert "feedback" not in recs["b"]
    assert recs["open"]["feedback"]["comment"] == "meh" and recs["open"]["feedback"]["key_id"] is None
    assert stats == {"lines": 7, "attached": 2, "superseded": 2, "foreign": 2, "unknown": 1, "outside_window": 0}
    assert "kind" not in recs["a"]


def test_feedback_of_a_request_outside_the_window_is_counted_not_attached(tmp_path: Path):
    t0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    _req(tmp_path, t0, "old", "k1")
    _req(tmp_path, t0 + timedelta(hours=1), "new", "k1")
    _fb(tmp_path, t0 + timedelta(hours=1, minutes=5), "old", "k1", rating=4)
    _fb(tmp_path, t0 + timedelta(hours=1, minutes=5), "new", "k1", rating=3)
    stats: dict[str, int] = {}
    # the old request's hour is read (the window starts inside it), its ts is outside
    recs = read_inference_log(tmp_path, since=t0 + timedelta(minutes=30), feedback_stats=stats)
    assert [(r["request_id"], r["feedback"]["rating"]) for r in recs] == [("new", 3)]
    assert stats == {"lines": 2, "attached": 1, "superseded": 0, "foreign": 0, "unknown": 0, "outside_window": 1}
    # a window that starts after the old request's hour never reads its line: unknown here
    stats = {}
    recs = read_inference_log(tmp_path, since=t0 + timedelta(hours=1), feedback_stats=stats)
    assert [r["request_id"] for r in recs] == ["new"]
    assert (stats["unknown"], stats["outside_window"], stats["attached"]) == (1, 0, 1)
