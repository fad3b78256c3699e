"""Batch inference (`llm_batch_inference`): a task's champion, as compiled for serving, over
a whole file of prompts (bulk re-labelling, summarisation), chunk by chunk.

* The model is the compiled package Triton serves (`compiled/v<N>/llm/1`), run by the same
  class (`GenaiGreedyGenerator`), so a batch answer is the answer the gateway would give.
* The input is a dataset version's split (`datasets/<id>/<split>.jsonl`, the default: the
  latest version's eval split) or any JSONL file of rows `{"prompt": ...}` or
  `{"messages": [...]}` (an optional `id`; a `completion` or a closing assistant turn is
  kept as the row's reference and the answers are compared with it, field by field).
* The results go next to the input's version: `datasets/<id>/batch/<split>/v<N>-<key>/`
  (a file input: `<file>.batch/v<N>-<key>/`). `<key>` digests the input, the package and
  the settings, so a run with other settings never mixes with this one's chunks.
* Resumable: chunk `i` is written (rows, then its `.json` record last) with an atomic rename,
  and a chunk whose record exists is never run again. A crash loses at most the chunk in
  flight; the next run (or the task's retry) does only what is missing.
* Cost: generated tokens over generation time gives tokens/s; with the task's declared
  `serving.price_per_hour`, USD per 1k generated tokens (`serving_gate.cost_per_1k_tokens`).

No Airflow import: the DAG (`dags/llm_batch_inference.py`) maps `run_chunk` over the chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneship import atomic, config
from tuneship.basemodel import sha256_file
from tuneship.notify import notify, release_links
from tuneship.stages import Refusal, compiled_dir
from tuneship.tasks import Task, load_task

DEFAULT_CHUNK_ROWS = 64
PROGRESS_EVERY_S = 10.0
PLAN_FILE = "plan.json"
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"


class BatchError(Refusal):
    """Input or state a batch cannot use; the message names the file, line or field and what to
    do. The same input would be refused again: never retried, alerted once."""


def package_dir(task: Task, version: int | str) -> Path:
    """The Triton model version directory compile_candidate left for `version`."""
    return compiled_dir(task, version) / "llm" / "1"


def read_rows(path: Path, task: Task) -> list[dict[str, Any]]:
    """Every row of a batch input as `{line, id, prompt, reference}`; a row that cannot be
    used stops the batch before anything runs, naming `path:line`."""
    if not path.is_file():
        raise BatchError(f"batch input {path} does not exist: give a JSONL file of prompts, or a dataset version "
                         "and split of the task")
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise BatchError(f"{path}:{n}: not JSON ({exc})") from None
            if not isinstance(row, dict):
                raise BatchError(f"{path}:{n}: a row must be a JSON object with `prompt` or `messages`")
            reference = None
            if "messages" in row:
                msgs = row["messages"]
                if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
                    raise BatchError(f"{path}:{n}: `messages` must be a non-empty list of {{role, content}}")
                if msgs[-1].get("role") == "assistant":
                    reference, msgs = str(msgs[-1].get("content", "")), msgs[:-1]
                if not msgs or msgs[-1].get("role") != "user":
                    raise BatchError(f"{path}:{n}: `messages` must end with the user's turn (an assistant turn "
                                     "after it is taken as the reference)")
                prompt: Any = msgs
            elif isinstance(row.get("prompt"), str) and row["prompt"]:
                prompt = row["prompt"]
                reference = str(row["completion"]) if "completion" in row else None
            else:
                raise BatchError(f"{path}:{n}: row needs a non-empty `prompt` string or chat `messages`")
            if task.prompt_format == "plain" and not isinstance(prompt, str):
                raise BatchError(f"{path}:{n}: task {task.name} is prompt_format plain: give `prompt`, not `messages`")
            rows.append({"line": n, "id": row.get("id"), "prompt": prompt, "reference": reference})
    if not rows:
        raise BatchError(f"batch input {path} holds no rows")
    return rows


def _input_of(task: Task, input_uri: str | None, dataset_version: str | None,
              split: str) -> tuple[Path, Path, dict[str, Any]]:
    """(input file, where its results go, what it is) for a file, or a dataset version's split."""
    from tuneship.stages import datasets_root, latest_dataset

    if input_uri:
        path = Path(input_uri.removeprefix("file://")).expanduser()
        if not path.is_absolute():
            path = config.incoming() / path
        return path, path.with_name(f"{path.name}.batch"), {"input": str(path)}
    if dataset_version is None:
        latest = latest_dataset(task)
        if latest is None:
            raise BatchError(f"task {task.name} has no dataset version yet: give `input_uri` (a JSONL file of "
                             "prompts) or validate a dataset first")
        dataset_version = latest["version_id"]
    vdir = datasets_root(task) / dataset_version
    if not (vdir / "manifest.json").is_file():
        known = sorted(p.name for p in vdir.parent.iterdir() if (p / "manifest.json").is_file()) \
            if vdir.parent.is_dir() else []
        raise BatchError(f"task {task.name} has no dataset version {dataset_version!r} (known: {known or 'none'})")
    path = vdir / f"{split}.jsonl"
    if not path.is_file():
        splits = sorted(p.stem for p in vdir.glob("*.jsonl"))
        raise BatchError(f"dataset version {dataset_version} of task {task.name} has no split {split!r} "
                         f"(it has: {splits})")
    return path, vdir / "batch" / split, {"dataset_version": dataset_version, "split": split, "input": str(path)}


def _champion(task: Task) -> int:
    from tuneship import registry

    champion = registry.by_alias("champion", task.registered_model)
    if champion is None:
        raise BatchError(f"task {task.name} has no champion in {task.registered_model}: release a version first, "
                         "or give `version`")
    return int(champion.version)


def nothing_to_answer(task: Task) -> str | None:
    """Why a nightly run leaves `task` alone (no champion, no compiled package, no dataset
    version), or None: it has something to answer."""
    from tuneship import registry
    from tuneship.stages import latest_dataset

    if latest_dataset(task) is None:
        return "no dataset version"
    champion = registry.by_alias("champion", task.registered_model)
    if champion is None:
        return f"no champion in {task.registered_model}"
    if not (package_dir(task, champion.version) / "model.onnx").is_file():
        return f"champion version {champion.version} has no compiled package"
    return None


def plan_batch(task: Task, **settings: Any) -> dict[str, Any]:
    """Check everything a batch needs (the package, every input row) and write its plan;
    returns the plan (with `chunks`, the number of chunks, and `done`, those already written).
    A batch that cannot run is refused with one alert (`_plan`'s settings)."""
    try:
        return _plan(task, **settings)
    except BatchError as exc:
        notify(f"Batch inference for task {task.name} refused: {exc}", level="error",
               title=f"{task.name}: batch inference refused", figures={"Task": task.name}, task=task.name)
        raise


def _plan(task: Task, *, version: int | str | None = None, input_uri: str | None = None,
          dataset_version: str | None = None, split: str = "eval", chunk_rows: int = DEFAULT_CHUNK_ROWS,
          max_new_tokens: int | None = None, price_per_hour: float | None = None) -> dict[str, Any]:
    if chunk_rows < 1:
        raise BatchError(f"chunk_rows must be at least 1, got {chunk_rows}")
    version = int(version) if version not in (None, "") else _champion(task)
    vdir = package_dir(task, version)
    if not (vdir / "generation.json").is_file() or not (vdir / "model.onnx").is_file():
        raise BatchError(f"version {version} of task {task.name} has no compiled package at {vdir}: compile it "
                         "first (llm_finetune's compile_model), or give another version")
    deployment = json.loads((vdir / "deployment.json").read_text()) if (vdir / "deployment.json").is_file() else {}
    path, results_root, source = _input_of(task, input_uri, dataset_version, split)
    rows = read_rows(path, task)
    max_new = max_new_tokens or task.suite(task.eval.suites[0]).generation.max_new_tokens
    price = price_per_hour if price_per_hour is not None else task.serving.price_per_hour
    input_sha = sha256_file(path)
    key = hashlib.sha256(json.dumps([input_sha, deployment.get("onnx_sha256"), max_new, chunk_rows],
                                    sort_keys=True).encode()).hexdigest()[:10]
    out = results_root / f"v{version}-{key}"
    plan = {"task": task.name, "version": version, "package": str(vdir), "precision": deployment.get("precision"),
            "base_model": deployment.get("base_model") or task.base_model, **source, "input_sha256": input_sha,
            "rows": len(rows), "chunk_rows": chunk_rows, "chunks": -(-len(rows) // chunk_rows),
            "max_new_tokens": max_new, "price_per_hour": price, "out_dir": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / PLAN_FILE, json.dumps(plan, indent=2))
    return {**plan, "done": [i for i in range(plan["chunks"]) if _record(out, i).is_file()]}


def load_plan(plan_or_dir: dict[str, Any] | str | Path) -> dict[str, Any]:
    out = Path(plan_or_dir["out_dir"] if isinstance(plan_or_dir, dict) else plan_or_dir)
    try:
        return json.loads((out / PLAN_FILE).read_text())
    except FileNotFoundError:
        raise BatchError(f"{out / PLAN_FILE} is missing: plan the batch again (its first task)") from None


def _chunk(out: Path, index: int) -> Path:
    return out / "chunks" / f"{index:05d}.jsonl"


def _record(out: Path, index: int) -> Path:
    return out / "chunks" / f"{index:05d}.json"


def run_chunk(plan: dict[str, Any] | str | Path, index: int, *, progress: Callable[[str], None] = print,
              threads: int | None = None) -> dict[str, Any]:
    """Answer chunk `index` of a planned batch, unless it is already written (`resumed`)."""
    from tuneship.compile import load_triton_model_module
    from tuneship.stages import served_texts
    from tuneship.tasks import load_task

    plan = load_plan(plan)
    out = Path(plan["out_dir"])
    if not 0 <= index < plan["chunks"]:
        raise BatchError(f"chunk {index} is outside 0..{plan['chunks'] - 1} of {out}")
    record = _record(out, index)
    if record.is_file():
        done = json.loads(record.read_text())
        progress(f"chunk {index + 1}/{plan['chunks']}: already written ({done['rows']} rows), not run again")
        return {**done, "resumed": True}
    path = Path(plan["input"])
    if sha256_file(path) != plan["input_sha256"]:
        raise BatchError(f"batch input {path} changed since this batch was planned: plan it again (a new run); "
                         f"the chunks already written stay in {out}")
    task = load_task(plan["task"])
    rows = read_rows(path, task)[index * plan["chunk_rows"]:(index + 1) * plan["chunk_rows"]]
    texts = served_texts(task, [r["prompt"] for r in rows], plan["base_model"])
    generator = load_triton_model_module().GenaiGreedyGenerator(plan["package"], threads=threads or os.cpu_count() or 1)
    lines, prompt_tokens, completion_tokens, conforming = [], 0, 0, 0
    started = last = time.perf_counter()
    for i, (row, text) in enumerate(zip(rows, texts, strict=True), 1):
        answer, p_tok, c_tok = generator.generate(text, plan["max_new_tokens"])
        conforms = task.conforms(answer)
        conforming += conforms
        prompt_tokens += p_tok
        completion_tokens += c_tok
        result = {"line": row["line"], "id": row["id"], "answer": answer, "conforms": conforms,
                  "fields": _fields(task, answer), "prompt_tokens": p_tok, "completion_tokens": c_tok}
        if row["reference"] is not None:
            result["reference_fields"] = _fields(task, row["reference"])
        lines.append(json.dumps(result, ensure_ascii=False) + "\n")
        now = time.perf_counter()
        if now - last >= PROGRESS_EVERY_S or i == len(rows):
            last = now
            progress(f"chunk {index + 1}/{plan['chunks']}: {i}/{len(rows)} rows, {completion_tokens:,} tokens, "
                     f"{completion_tokens / max(now - started, 1e-9):.1f} tokens/s")
    seconds = time.perf_counter() - started
    atomic.write_text(_chunk(out, index), "".join(lines))
    done = {"chunk": index, "rows": len(rows), "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "conforming": conforming, "seconds": round(seconds, 3), "written_at": time.time()}
    atomic.write_text(record, json.dumps(done))  # last: the chunk counts as done only now
    return {**done, "resumed": False}


def _fields(task: Task, text: str) -> dict[str, Any] | None:
    try:
        parsed = task.parser(text)
    except Exception:  # a parser that cannot read an answer: the answer has no fields
        return None
    return {f: parsed.get(f) for f in task.answers.fields} if isinstance(parsed, dict) else None


def finish_batch(plan: dict[str, Any] | str | Path) -> dict[str, Any]:
    """Join the chunks into `results.jsonl` (input order), and write the summary and report."""
    from tuneship.serving_gate import cost_per_1k_tokens

    plan = load_plan(plan)
    out = Path(plan["out_dir"])
    missing = [i for i in range(plan["chunks"]) if not _record(out, i).is_file()]
    if missing:
        raise BatchError(f"{len(missing)} of {plan['chunks']} chunks of {out} are not written yet "
                         f"(first: {missing[0]}): run them first")
    records = [json.loads(_record(out, i).read_text()) for i in range(plan["chunks"])]
    agree: dict[str, list[int]] = {}
    with atomic.replacing(out / RESULTS_FILE) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for i in range(plan["chunks"]):
            text = _chunk(out, i).read_text(encoding="utf-8")
            fh.write(text)
            for line in text.splitlines():
                r = json.loads(line)
                if r.get("reference_fields") is not None:
                    for f, want in r["reference_fields"].items():
                        got = (r["fields"] or {}).get(f)
                        agree.setdefault(f, [0, 0])
                        agree[f][0] += want is not None and got == want
                        agree[f][1] += 1
    completion = sum(r["completion_tokens"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    tps = completion / seconds if seconds > 0 else 0.0
    summary = {
        **{k: plan[k] for k in ("task", "version", "precision", "input", "rows", "chunks", "max_new_tokens",
                                "price_per_hour")},
        **{k: plan[k] for k in ("dataset_version", "split") if k in plan},
        "prompt_tokens": sum(r["prompt_tokens"] for r in records), "completion_tokens": completion,
        "generation_seconds": round(seconds, 3), "tokens_per_s": round(tps, 2),
        "cost_per_1k_tokens": cost_per_1k_tokens(plan["price_per_hour"], tps),
        "cost_usd": plan["price_per_hour"] * seconds / 3600 if plan["price_per_hour"] is not None else None,
        "conform_rate": sum(r["conforming"] for r in records) / plan["rows"],
        "agreement": {f: round(a / n, 4) for f, (a, n) in agree.items() if n},
        "results": str(out / RESULTS_FILE), "report": str(out / REPORT_FILE),
    }
    atomic.write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2))
    atomic.write_text(out / REPORT_FILE, report_html(summary, out / RESULTS_FILE))
    cost = f", USD {summary['cost_per_1k_tokens']:.4f} per 1k tokens" if summary["cost_per_1k_tokens"] else ""
    notify(f"Batch inference for task {plan['task']} (version {plan['version']}) done: {plan['rows']:,} rows, "
           f"{completion:,} tokens at {tps:.1f} tokens/s{cost}; {summary['results']}", level="success",
           title=f"{plan['task']} v{plan['version']}: batch inference done",
           figures={"Task": plan["task"], "Version": plan["version"], "Rows": plan["rows"], "Tokens": completion,
                    "Tokens/s": round(tps, 1), "USD per 1k tokens": summary["cost_per_1k_tokens"],
                    "Conforming": f"{summary['conform_rate']:.1%}"},
           links=release_links(load_task(plan["task"]).registered_model, plan["version"], summary["report"]),
           task=plan["task"], version=plan["version"], report=summary["report"])
    return summary


def report_html(summary: dict[str, Any], results: Path, sample: int = 20) -> str:
    """The batch's figures and its first answers, self-contained."""
    import html

    from tuneship.report import fmt, page, table, usd

    rows = [["rows", fmt(summary["rows"])], ["chunks", fmt(summary["chunks"])],
            ["generated tokens", fmt(summary["completion_tokens"])],
            ["generation time", fmt(summary["generation_seconds"], "s")],
            ["tokens/s", fmt(summary["tokens_per_s"])],
            ["cost per 1k tokens", usd(summary["cost_per_1k_tokens"])], ["cost", usd(summary["cost_usd"])],
            ["answers in the task's shape", fmt(summary["conform_rate"])],
            *[[f"agreement with the reference: {f}", fmt(v)] for f, v in summary["agreement"].items()]]
    first = []
    with open(results, encoding="utf-8") as fh:
        for line, _ in zip(fh, range(sample), strict=False):
            r = json.loads(line)
            first.append([r["line"], r["id"] if r["id"] is not None else "", r["answer"], r["conforms"]])
    title = f"Batch: task {summary['task']}, version {summary['version']}"
    return page(title, f"<h1>{html.escape(title)}</h1><p>{html.escape(summary['input'])}</p>"
                + table(rows, ["figure", "value"]) + f"<h2>First {len(first)} answers</h2>"
                + table(first, ["line", "id", "answer", "in shape"]))
