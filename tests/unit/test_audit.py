"""The audit trail (tuneship.audit): one hash chain however many processes append at once;
every kind of tampering (an edited field, a deleted, reordered or damaged record, a cut
last line, records cut off the end) found at the right line by `verify()` and by the
command's exit code; a writer killed mid-line neither breaks the chain nor vanishes
unseen; a new process continues the chain; bad input is refused with the field named."""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tuneship import audit
from tuneship.cli import app
from tuneship.cli.audit import EXIT_BROKEN, audit_app

MIDDLE = 3  # of the 5 records `_fill` writes


@pytest.fixture
def trail(tmp_path, monkeypatch) -> Path:
    """A fresh TUNESHIP_HOME per test (subprocesses inherit it); the trail's path in it."""
    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path / "home"))
    for k in ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_TASK_ID", "AIRFLOW_CTX_DAG_RUN_ID", "TUNESHIP_ACTOR"):
        monkeypatch.delenv(k, raising=False)
    return audit.audit_path()


def _fill(n: int = 5) -> list[dict]:
    actions = ["dataset_accepted", "version_registered", "gates_passed", "switch", "canary_step"]
    return [audit.record(actions[i % len(actions)], task="triage", reason=f"step {i + 1}", version=i + 1,
                         actor="airflow:llm_release/decide", figures={"requests": 100 + i, "p95_ms": 80.5 + i},
                         links={"report": f"/reports/{i}.json"}) for i in range(n)]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _write(path: Path, lines: list[str], newline_at_end: bool = True) -> None:
    path.write_text("\n".join(lines) + ("\n" if newline_at_end else ""), encoding="utf-8")


def _cli(*args: str):
    return CliRunner().invoke(audit_app, list(args))


def _assert_broken_at(line: int, words: str) -> None:
    verdict = audit.verify()
    assert not verdict.ok
    assert verdict.first.line == line, verdict.problems
    assert words in verdict.first.what, verdict.first
    result = _cli("verify")
    assert result.exit_code == EXIT_BROKEN, result.output
    assert f"line {line}:" in result.output and words in result.output


# ------------------------------------------------------------------ many writers


def _writer(home: str, worker: int, n: int, start) -> None:
    os.environ["TUNESHIP_HOME"] = home
    start.wait()
    for i in range(n):
        audit.record("canary_step", task=f"task{worker % 2}", reason=f"worker {worker} record {i}",
                     actor=f"worker-{worker}", figures={"worker": worker, "i": i})


def test_appends_from_several_processes_at_once_make_one_valid_chain_with_every_record(trail):
    workers, each = 6, 25
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(os.environ["TUNESHIP_HOME"], w, each, start)) for w in range(workers)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    verdict = audit.verify()
    assert verdict.ok, verdict.problems
    assert verdict.records == workers * each
    records = audit.read()
    assert [r["seq"] for r in records] == list(range(1, workers * each + 1))
    assert records[0]["prev"] == audit.GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(records, records[1:], strict=False))
    for w in range(workers):  # every record of every worker, once, in the order it wrote them
        mine = [r["figures"]["i"] for r in records if r["actor"] == f"worker-{w}"]
        assert mine == list(range(each))
    interleaved = sum(1 for a, b in zip(records, records[1:], strict=False) if a["actor"] != b["actor"])
    assert interleaved > workers - 1  # the writers really overlapped (not one after the other)
    assert verdict.head == {"seq": records[-1]["seq"], "hash": records[-1]["hash"]}


def test_a_new_process_continues_the_chain_after_a_restart(trail):
    first = _fill(2)
    code = ("from tuneship import audit; "
            "audit.record('rollback', task='triage', reason='by hand after a page', actor='alice', version=2, "
            "figures={'error_rate': 0.31})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    records = audit.read()
    assert len(records) == 3
    assert records[2]["seq"] == 3 and records[2]["prev"] == first[1]["hash"]
    assert records[2]["actor"] == "alice" and records[2]["figures"] == {"error_rate": 0.31}
    # and the real command, in another process, finds the whole chain intact
    r = subprocess.run([sys.executable, "-m", "tuneship.audit", "verify"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "intact, 3 records" in r.stderr and records[2]["hash"] in r.stderr


# ------------------------------------------------------------------ tampering


EDITS = {
    "seq": lambda r: {**r, "seq": r["seq"] + 100},
    "at": lambda r: {**r, "at": "2020-01-01T00:00:00.000000Z"},
    "actor": lambda r: {**r, "actor": "mallory"},
    "action": lambda r: {**r, "action": "rollback"},
    "task": lambda r: {**r, "task": "other"},
    "version": lambda r: {**r, "version": "99"},
    "reason": lambda r: {**r, "reason": r["reason"] + "."},
    "figures": lambda r: {**r, "figures": {**r["figures"], "p95_ms": 1.0}},
    "links": lambda r: {**r, "links": {}},
    "key": lambda r: {**r, "key": "forged"},
    "prev": lambda r: {**r, "prev": "f" * 64},
    "hash": lambda r: {**r, "hash": "e" * 64},
}


@pytest.mark.parametrize("field", list(EDITS))
def test_editing_any_field_of_a_middle_record_is_found_at_its_line(trail, field):
    assert set(EDITS) == set(audit.FIELDS)  # every field of a record is covered
    _fill()
    lines = _lines(trail)
    lines[MIDDLE - 1] = json.dumps(EDITS[field](json.loads(lines[MIDDLE - 1])))
    _write(trail, lines)
    _assert_broken_at(MIDDLE, "hash does not match")
    rows = audit.verified_records()  # the UI's view: only that record is flagged
    assert [r["verified"] for r in rows] == [i != MIDDLE - 1 for i in range(5)]


def test_an_edit_with_a_recomputed_hash_is_found_at_the_next_line(trail):
    _fill()
    lines = _lines(trail)
    rec = {**json.loads(lines[MIDDLE - 1]), "reason": "nothing to see"}
    lines[MIDDLE - 1] = json.dumps({**rec, "hash": audit.record_hash(rec)})
    _write(trail, lines)
    _assert_broken_at(MIDDLE + 1, "prev does not match")


def test_a_deleted_middle_record_is_found_where_the_gap_is(trail):
    _fill()
    lines = _lines(trail)
    del lines[MIDDLE - 1]
    _write(trail, lines)
    _assert_broken_at(MIDDLE, "prev does not match")


def test_two_reordered_records_are_found_at_the_first_of_them(trail):
    _fill()
    lines = _lines(trail)
    lines[1], lines[2] = lines[2], lines[1]
    _write(trail, lines)
    _assert_broken_at(2, "prev does not match")


def test_a_damaged_middle_line_is_found_and_later_appends_still_chain(trail):
    _fill()
    lines = _lines(trail)
    lines[MIDDLE - 1] = lines[MIDDLE - 1][:40]
    _write(trail, lines)
    _assert_broken_at(MIDDLE, "not a JSON record")
    rec = audit.record("retire", task="triage", reason="retention over", version=4)
    assert rec["seq"] == 6 and rec["prev"] == json.loads(lines[-1])["hash"]
    assert audit.verify().first.line == MIDDLE  # the damage stays visible


def test_records_cut_off_the_end_are_found_through_head(trail):
    _fill()
    _write(trail, _lines(trail)[:-1])  # a whole last line removed: the chain itself still links
    _assert_broken_at(5, "names seq 5, which the file does not hold")


def test_a_truncated_last_line_is_found_then_quarantined_by_the_next_writer(trail):
    written = _fill()
    raw = trail.read_bytes()
    cut = raw[:-25]  # the last record loses its end and its newline
    trail.write_bytes(cut)
    torn = cut[cut.rfind(b"\n") + 1:]
    _assert_broken_at(5, "torn write")
    # the next writer: the torn bytes go aside, that is recorded, and the chain goes on from seq 4
    rec = audit.record("retire", task="triage", reason="retention over", version=4)
    verdict = audit.verify()
    assert verdict.ok, verdict.problems
    assert verdict.quarantined == 1
    records = audit.read()
    note = records[4]
    assert note["action"] == "torn_write_quarantined" and note["actor"] == "tuneship.audit"
    assert note["prev"] == written[3]["hash"] and note["seq"] == 5
    assert note["figures"]["sha256"] == hashlib.sha256(torn).hexdigest() and note["figures"]["bytes"] == len(torn)
    assert rec["seq"] == 6 and rec["prev"] == note["hash"]
    kept = [json.loads(x) for x in trail.with_name("audit.jsonl.torn").read_text().splitlines()]
    assert base64.b64decode(kept[0]["base64"]) == torn and kept[0]["sha256"] == note["figures"]["sha256"]
    assert _cli("verify").exit_code == 0


def _killed_mid_write(home: str) -> None:
    os.environ["TUNESHIP_HOME"] = home

    def half_then_die(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)  # dies holding the lock, mid-line

    audit._write_all = half_then_die
    audit.record("switch", task="triage", reason="never finished", version=9)


def test_a_writer_killed_mid_line_blocks_nobody_and_is_neither_accepted_nor_lost(trail):
    _fill(3)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_killed_mid_write, args=(os.environ["TUNESHIP_HOME"],))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == -signal.SIGKILL
    _assert_broken_at(4, "torn write")  # not silently accepted
    assert [r["seq"] for r in audit.read()] == [1, 2, 3]
    rec = audit.record("rollback", task="triage", reason="after the crash", actor="bob")  # the lock was freed
    verdict = audit.verify()
    assert verdict.ok and verdict.quarantined == 1
    assert [r["action"] for r in audit.read()][-2:] == ["torn_write_quarantined", "rollback"]
    assert rec["seq"] == 5
    kept = json.loads(trail.with_name("audit.jsonl.torn").read_text())
    assert kept["text"].startswith('{"action":"switch"')  # the dead writer's half line, kept aside
    assert audit.read(action="torn_write_quarantined")[0]["figures"]["bytes"] > 0


def test_a_last_line_that_is_not_a_record_stops_appends_with_what_to_do(trail):
    _fill(2)
    trail.write_bytes(trail.read_bytes() + b"garbage, complete with its newline\n")
    before = trail.read_bytes()
    with pytest.raises(audit.AuditError, match=r"line 3 \(the last\) is not an audit record.*verify"):
        audit.record("switch", task="triage", reason="x")
    assert trail.read_bytes() == before


def test_a_deleted_head_file_is_reported(trail):
    _fill(2)
    trail.with_name("HEAD").unlink()
    verdict = audit.verify()
    assert not verdict.ok and "HEAD is missing" in str(verdict.first)
    assert _cli("verify").exit_code == EXIT_BROKEN


def test_a_keyed_append_retried_writes_one_record(trail):
    _fill(2)
    first = audit.record("switch", task="triage", reason="shadow promoted", version=3, key="run-1/switch/v3",
                         figures={"requests": 120})
    again = audit.record("switch", task="triage", reason="shadow promoted (retry)", version=3, key="run-1/switch/v3",
                         figures={"requests": 121})  # an Airflow retry of the same decision
    assert again == first
    assert [r["key"] for r in audit.read()] == [None, None, "run-1/switch/v3"]
    other = audit.record("switch", task="triage", reason="next run", version=4, key="run-2/switch/v4")
    assert other["seq"] == 4 and audit.verify().ok
    # a retry after its first try died mid-line: the torn half is quarantined, the record written once
    trail.write_bytes(trail.read_bytes() + b'{"action":"retire","key":"run-2/retire/v3"')
    rec = audit.record("retire", task="triage", reason="retention over", version=3, key="run-2/retire/v3")
    assert audit.record("retire", task="triage", reason="retention over", version=3, key="run-2/retire/v3") == rec
    assert [r["action"] for r in audit.read()][-2:] == ["torn_write_quarantined", "retire"]
    assert audit.verify().ok


# ------------------------------------------------------------------ bad input


def test_an_unknown_action_is_refused_naming_it_and_nothing_is_written(trail):
    _fill(1)
    before = trail.read_bytes()
    with pytest.raises(audit.AuditError, match=r"unknown audit action 'promoted': use one of .*switch"):
        audit.record("promoted", task="triage", reason="x")
    with pytest.raises(audit.AuditError, match="unknown audit action 'torn_write_quarantined'"):
        audit.record("torn_write_quarantined", task="triage", reason="forged")  # the trail's own note
    assert trail.read_bytes() == before


@pytest.mark.parametrize("figures, words", [
    ({"p95_ms": float("nan")}, r"figures\['p95_ms'\] is nan: figures must be finite"),
    ({"steps": [1, float("inf")]}, r"figures\['steps'\]\[1\] is inf"),
    ({"path": Path("/tmp/x")}, r"figures\['path'\] is a PosixPath .* not a JSON value"),
    ({"nested": {3: "x"}}, r"figures\['nested'\] has the key 3 \(int\): keys must be strings"),
    ([("a", 1)], r"figures must be a JSON object .* got a list"),
    ({"blob": "x" * 20_000}, r"figures are \d+ bytes of JSON, over 16384"),
])
def test_bad_figures_are_refused_naming_the_figure(trail, figures, words):
    with pytest.raises(audit.AuditError, match=words):
        audit.record("switch", task="triage", reason="x", figures=figures)
    assert not trail.exists()


@pytest.mark.parametrize("kwargs, words", [
    ({"task": ""}, "audit field 'task' must be a non-empty string"),
    ({"reason": "  "}, "audit field 'reason' must be a non-empty string"),
    ({"actor": ""}, "audit field 'actor' must be a non-empty string"),
    ({"version": True}, "audit field 'version' must be a version number or string"),
    ({"links": {"run": 3}}, "audit links must map names to strings"),
])
def test_bad_fields_are_refused_naming_the_field(trail, kwargs, words):
    with pytest.raises(audit.AuditError, match=words):
        audit.record("switch", **{"task": "triage", "reason": "why", **kwargs})
    assert not trail.exists()


def test_inside_an_airflow_task_the_actor_and_run_come_from_its_context(trail, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "llm_drift_monitor")
    monkeypatch.setenv("AIRFLOW_CTX_TASK_ID", "detect_drift")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "scheduled__2026-12-01T15:00:00+00:00")
    rec = audit.record("retrain_refused", task="triage", reason="cooldown: 3.0 h left", figures={"score": 0.4})
    assert rec["actor"] == "airflow:llm_drift_monitor/detect_drift"
    assert rec["links"] == {"dag_run_id": "scheduled__2026-12-01T15:00:00+00:00"}
    assert audit.record("approved", task="triage", reason="ok", actor="carol")["actor"] == "carol"
    key = audit.run_key("switch", 3)
    assert key == "llm_drift_monitor/scheduled__2026-12-01T15:00:00+00:00/detect_drift/switch/3"
    monkeypatch.delenv("AIRFLOW_CTX_TASK_ID")
    assert audit.run_key("switch", 3) is None  # outside a task: no dedupe


# ------------------------------------------------------------------ reading and the command


def test_read_filters_by_task_action_and_time(trail):
    _fill(3)
    audit.record("rollback", task="faq", reason="breach", version=2, actor="dave")
    assert [r["task"] for r in audit.read(task="faq")] == ["faq"]
    assert [r["seq"] for r in audit.read(action="gates_passed")] == [3]
    assert len(audit.read(since="2000-01-01")) == 4 and audit.read(since="2999-01-01T00:00:00Z") == []
    newest = audit.read()[-1]["at"]
    assert [r["seq"] for r in audit.read(since=newest)] == [4]
    with pytest.raises(audit.AuditError, match="since 'yesterday' is not an ISO date"):
        audit.read(since="yesterday")
    with pytest.raises(audit.AuditError, match="unknown audit action 'switched'"):
        audit.read(action="switched")


def test_show_prints_a_table_json_and_usage_errors(trail):
    _fill(3)
    audit.record("rollback", task="faq", reason="breach: error rate 0.31 > 0.05", version=2, actor="dave")
    r = _cli("show", "--task", "faq")
    assert r.exit_code == 0
    rows = [line for line in r.stdout.splitlines() if line.startswith("ok")]
    assert len(rows) == 1 and "rollback" in rows[0] and "dave" in rows[0] and "error rate 0.31" in rows[0]
    r = _cli("show", "--json", "--last", "2")
    got = json.loads(r.stdout)
    assert [g["seq"] for g in got] == [3, 4] and all(g["verified"] for g in got)
    assert got[1]["figures"] == {} and got[0]["figures"] == {"requests": 102, "p95_ms": 82.5}
    assert _cli("show", "--action", "nope").exit_code == 2
    assert _cli("show", "--since", "last week").exit_code == 2
    # a tampered record is marked in the table, with its line and what is wrong
    lines = _lines(trail)
    lines[0] = json.dumps({**json.loads(lines[0]), "actor": "mallory"})
    _write(trail, lines)
    r = _cli("show")
    assert r.exit_code == 0
    assert any(line.startswith("!!") and "mallory" in line for line in r.stdout.splitlines())
    assert "line 1: hash does not match" in r.stdout


def test_the_commands_are_also_under_tuneship_audit_and_verify_json(trail):
    _fill(2)
    r = CliRunner().invoke(app, ["audit", "verify", "--json"])
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["records"] == 2 and doc["problems"] == []
    other = trail.parent.parent / "copy.jsonl"  # --file: a copy kept elsewhere (no HEAD beside it)
    other.write_bytes(trail.read_bytes())
    r = CliRunner().invoke(app, ["audit", "verify", "--file", str(other), "--json"])
    assert r.exit_code == EXIT_BROKEN and "copy.jsonl.HEAD is missing" in r.stdout
