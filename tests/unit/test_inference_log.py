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
