"""Batch inference (`tuneship.batch`): the compiled package over a file of prompts, chunk by
chunk, resumable after a hard crash without redoing finished chunks.

The model is the tiny demo fine-tune compiled for Triton (the class Triton runs answers);
the crash is a real SIGKILL of the process in the middle of a chunk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from ml_fixtures import base_model, dataset, finetuned, read_jsonl
from transformers import AutoTokenizer

from tuneship import batch, notify
from tuneship.compile import compile_for_triton, served_answers
from tuneship.tasks import load_task

_CACHE: dict[str, Path] = {}


@pytest.fixture
def home(tmp_path, tmp_path_factory, monkeypatch) -> Path:
    """A TUNESHIP_HOME whose triage version 3 is the tiny fine-tune, compiled (built once)."""
    if "repo" not in _CACHE:
        repo = tmp_path_factory.mktemp("batch-compiled")
        compile_for_triton(str(base_model(tmp_path_factory)), finetuned(tmp_path_factory) / "adapter", repo, "llm",
                           deployment={"version": 3})
        _CACHE["repo"] = repo
    home = tmp_path / "home"
    dest = home / "artifacts" / "tasks" / "triage" / "compiled" / "v3"
    dest.parent.mkdir(parents=True)
    os.symlink(_CACHE["repo"], dest)
    monkeypatch.setenv("TUNESHIP_HOME", str(home))
    return home


def prompts_file(tmp_path: Path, tmp_path_factory, n: int = 22) -> Path:
    rows = read_jsonl(dataset(tmp_path_factory) / "eval.jsonl")[:n]
    path = tmp_path / "tickets.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", **r}) + "\n" for i, r in enumerate(rows)))
    return path


def run_all(plan: dict) -> list[dict]:
    return [batch.run_chunk(plan, i, progress=lambda _: None) for i in range(plan["chunks"])]


def test_a_batch_answers_every_row_in_order_as_served_with_its_cost(home, tmp_path, tmp_path_factory):
    task = load_task("triage")
    path = prompts_file(tmp_path, tmp_path_factory)
    plan = batch.plan_batch(task, version=3, input_uri=str(path), chunk_rows=5)
    assert (plan["rows"], plan["chunks"], plan["done"]) == (22, 5, [])
    assert Path(plan["out_dir"]).parent == path.with_name("tickets.jsonl.batch")  # next to its input
    lines: list[str] = []
    records = [batch.run_chunk(plan, i, progress=lines.append) for i in range(plan["chunks"])]
    assert [r["rows"] for r in records] == [5, 5, 5, 5, 2] and lines[-1].startswith("chunk 5/5: 2/2 rows")
    summary = batch.finish_batch(plan)

    results = read_jsonl(Path(summary["results"]))
    inputs = read_jsonl(path)
    assert [r["id"] for r in results] == [r["id"] for r in inputs] and [r["line"] for r in results] == list(range(1, 23))
    # the answers Triton would give: the served model's class on the same prompts
    tokenizer = AutoTokenizer.from_pretrained(str(base_model(tmp_path_factory)))
    served = served_answers(Path(plan["package"]), tokenizer)([r["prompt"] for r in inputs], plan["max_new_tokens"])
    assert [r["answer"] for r in results] == served
    assert summary["completion_tokens"] == sum(r["completion_tokens"] for r in results) > 0
    # the fine-tune answers in triage's shape and mostly agrees with the references
    assert summary["conform_rate"] == sum(r["conforms"] for r in results) / 22 > 0.8
    agree = sum(r["fields"] == r["reference_fields"] for r in results) / 22
    assert summary["agreement"]["category"] >= agree > 0.5
    tps = summary["completion_tokens"] / summary["generation_seconds"]
    assert summary["tokens_per_s"] == pytest.approx(tps, rel=1e-3)
    assert summary["cost_per_1k_tokens"] == pytest.approx(0.09 / 3600 / tps * 1000, rel=1e-3)  # triage: USD 0.09/h
    report = Path(summary["report"]).read_text()
    assert "cost per 1k tokens" in report and results[0]["answer"].strip() in report
    [done] = [m for m in notify.read_sink() if m["level"] == "success"]
    assert "22 rows" in done["text"] and "per 1k tokens" in done["text"]


CRASH = textwrap.dedent("""
    import os, signal, sys
    from tuneship import batch
    from tuneship.compile import load_triton_model_module

    cls = load_triton_model_module().GenaiGreedyGenerator
    calls = {"n": 0}
    real = cls.generate

    def generate(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # a crash in the middle of a chunk
        return real(self, *a, **k)

    cls.generate = generate
    plan = batch.load_plan(sys.argv[1])
    for i in range(plan["chunks"]):
        batch.run_chunk(plan, i)
""")


def test_a_crash_mid_chunk_loses_that_chunk_only_and_a_rerun_redoes_nothing_else(home, tmp_path, tmp_path_factory):
    task = load_task("triage")
    path = prompts_file(tmp_path, tmp_path_factory)
    plan = batch.plan_batch(task, version=3, input_uri=str(path), chunk_rows=5)
    out = Path(plan["out_dir"])
    # killed on the 13th answer: chunks 0 and 1 (rows 1-10) written, chunk 2 in flight
    r = subprocess.run([sys.executable, "-c", CRASH, plan["out_dir"], "13"], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["00000.json", "00000.jsonl", "00001.json",
                                                                 "00001.jsonl"]
    before = {i: json.loads((out / "chunks" / f"{i:05d}.json").read_text()) for i in (0, 1)}

    again = batch.plan_batch(task, version=3, input_uri=str(path), chunk_rows=5)
    assert again["out_dir"] == plan["out_dir"] and again["done"] == [0, 1]
    records = run_all(again)
    assert [r["resumed"] for r in records] == [True, True, False, False, False]
    assert all(records[i]["written_at"] == before[i]["written_at"] for i in (0, 1))  # not run again
    resumed = read_jsonl(Path(batch.finish_batch(again)["results"]))

    # the same as a run that never crashed (other settings: its own directory)
    fresh = batch.plan_batch(task, version=3, input_uri=str(path), chunk_rows=22)
    assert fresh["out_dir"] != plan["out_dir"]
    run_all(fresh)
    assert resumed == read_jsonl(Path(batch.finish_batch(fresh)["results"]))


def test_bad_input_is_refused_before_anything_runs_naming_file_and_line(home, tmp_path, tmp_path_factory):
    task = load_task("triage")
    good = prompts_file(tmp_path, tmp_path_factory, n=3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + "{not json\n")
    with pytest.raises(batch.BatchError, match=rf"{bad}:4: not JSON"):
        batch.plan_batch(task, version=3, input_uri=str(bad))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(batch.BatchError, match=rf"{chat}:1: task triage is prompt_format plain"):
        batch.plan_batch(task, version=3, input_uri=str(chat))
    with pytest.raises(batch.BatchError, match=r"version 4 of task triage has no compiled package .*compile it"):
        batch.plan_batch(task, version=4, input_uri=str(good))
    with pytest.raises(batch.BatchError, match="has no dataset version yet"):
        batch.plan_batch(task, version=3)
    assert not (tmp_path / "bad.jsonl.batch").exists() and not (tmp_path / "chat.jsonl.batch").exists()
    alerts = [m for m in notify.read_sink() if m["level"] == "error"]
    assert len(alerts) == 4 and f"{bad}:4" in alerts[0]["text"]


def test_an_input_changed_after_planning_is_refused_and_written_chunks_stay(home, tmp_path, tmp_path_factory):
    task = load_task("triage")
    path = prompts_file(tmp_path, tmp_path_factory, n=6)
    plan = batch.plan_batch(task, version=3, input_uri=str(path), chunk_rows=3)
    batch.run_chunk(plan, 0, progress=lambda _: None)
    path.write_text(path.read_text().replace("Ticket:", "Ticket :"))
    with pytest.raises(batch.BatchError, match="changed since this batch was planned"):
        batch.run_chunk(plan, 1, progress=lambda _: None)
    with pytest.raises(batch.BatchError, match=r"1 of 2 chunks .* are not written yet \(first: 1\)"):
        batch.finish_batch(plan)
    assert (Path(plan["out_dir"]) / "chunks" / "00000.jsonl").is_file()
