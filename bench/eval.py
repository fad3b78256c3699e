"""Gate scoring: batched greedy decoding against one prompt at a time, same run, same model.

For each shipped task: its demo data's eval split (`demo.generator`, seed 0), its gating
suite's cases, scored with the packaged SmolLM2 (the base model: it rambles, so its answers run
to max_new_tokens, the slow case) once with `generate(batch_size=1)`, the loop the served
model re-implements, and once with `generate(batch_size=B)`. Reports wall times, the speed-up,
how many answers differ and both runs' suite metrics. With --adapter TASK=DIR a fine-tuned
adapter is merged in for that task.

    python -m bench.eval [--batch-size 8] [--tasks triage,faq] [--adapter faq=DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import emit


def say(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def _task_run(task: Any, batch_size: int, adapter: str | None, workdir: Path) -> dict[str, Any]:
    from tuneship.basemodel import load_base, resolve_base_ref
    from tuneship.evaluate import load_cases, option_logliks, reference_logliks, score
    from tuneship.generate import generate, loglikelihood
    from tuneship.generate import option_logliks as model_options

    data = workdir / task.name
    task.resolve(task.demo.generator)(data, seed=0)
    suite = task.suite(task.eval.suites[0])
    cases = load_cases(suite, data, task.parser)
    model, tokenizer = load_base(resolve_base_ref(task.base_model)[0])
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    prompts = [task.render_prompt(c.prompt_input()) for c in cases]
    max_new = suite.generation.max_new_tokens
    logliks = reference_logliks(cases, lambda p, r: loglikelihood(model, tokenizer, p, r), task.render_prompt)

    def scorer(prompts: list, texts: list[str], references: list[str] | None = None) -> Any:
        return model_options(model, tokenizer, [task.render_prompt(p) for p in prompts], texts, references=references)

    scorer.options = scorer  # type: ignore[attr-defined]
    options = option_logliks(suite, cases, scorer)[0] if any(m.calibration for m in suite.metrics) else None
    runs: dict[str, Any] = {}
    answers: dict[str, list[str]] = {}
    for label, bs in (("one_at_a_time", 1), (f"batch_{batch_size}", batch_size)):
        t0 = time.perf_counter()
        answers[label] = generate(model, tokenizer, prompts, max_new, batch_size=bs)
        wall = time.perf_counter() - t0
        runs[label] = {"wall_s": round(wall, 2), "metrics": score(suite, cases, answers[label], task.parser, logliks,
                                                                  options).metrics}
        say(f"{task.name} {label}: {wall:.1f}s {runs[label]['metrics']}")
    one, many = answers["one_at_a_time"], answers[f"batch_{batch_size}"]
    differ = [{"prompt": str(p)[:120], "one": a, "batched": b} for p, a, b in zip(prompts, one, many, strict=True)
              if a != b]
    return {"task": task.name, "suite": f"{suite.name}@v{suite.version}", "cases": len(cases),
            "max_new_tokens": max_new, "model": "base + " + adapter if adapter else "base", "runs": runs,
            "speedup": round(runs["one_at_a_time"]["wall_s"] / max(runs[f"batch_{batch_size}"]["wall_s"], 1e-9), 2),
            "answers_differ": len(differ), "differences": differ[:5]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tasks", default="triage,faq")
    ap.add_argument("--adapter", action="append", default=[], help="TASK=DIR: merge this adapter for TASK")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from tuneship.tasks import load_task

    adapters = dict(a.split("=", 1) for a in args.adapter)
    load = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        for name in [n.strip() for n in args.tasks.split(",") if n.strip()]:
            results.append(_task_run(load_task(name), args.batch_size, adapters.get(name), Path(tmp)))
    out = {"bench": "eval", "batch_size": args.batch_size, "load_at_start": round(load, 2),
           "load_at_end": round(os.getloadavg()[0], 2), "tasks": results}
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
