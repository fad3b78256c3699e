"""The full gate run of one candidate against its reference, as `llm_finetune.evaluate` runs it:
every gate suite the task declares (quality with likelihood and calibration, safety,
hallucination), the candidate and, where a gate compares with it, the reference, on the same
cases, then every gate. Timed twice in the same run: with one run of each prompt for answers,
options, reference likelihood and the answers' token probabilities (`generate_and_score`,
what ships) and with answers, options and likelihood as separate passes (the baseline).
Budget (issue 12): 5 minutes on 2 cores.

Models: `--candidate DIR` / `--reference DIR` merge a LoRA adapter into the task's base model;
without them the base model stands in for both (it rambles to max_new_tokens: the slow case).
Cases: the task's demo data (`demo.generator`, seed 0) for dataset suites.

    python -m bench.gates [--task triage] [--candidate DIR] [--reference DIR]
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
    print(f"[gates] {msg}", file=sys.stderr, flush=True)


def _gate_run(task: Any, data: Path, cand: Any, ref: Any) -> dict[str, Any]:
    from tuneship.evaluate import apply_gates, load_cases, run_suite

    out: dict[str, Any] = {"suites": {}}
    t0 = time.perf_counter()
    for name in task.eval.suites:
        suite = task.suite(name)
        cases = load_cases(suite, data, task.parser)
        t = time.perf_counter()
        c = run_suite(suite, cand, cases, task.parser)
        compares = any(g.max_regression is not None or g.min_kept is not None for g in suite.gates)
        r = run_suite(suite, ref, cases, task.parser) if compares else None
        report = apply_gates(suite, c, r, "reference" if r else None)
        out["suites"][f"{suite.name}@v{suite.version}"] = {
            "cases": len(cases), "wall_s": round(time.perf_counter() - t, 2), "passed": report.passed,
            "verdicts": {f"{g.metric} {g.rule}": g.verdict for g in report.gates}}
        say(f"{suite.name}: {time.perf_counter() - t:.1f}s, passed={report.passed}")
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def _separate(gen: Any) -> Any:
    """The same model scoring answers (with their token log-probabilities), options and
    likelihood in separate passes, each prompt run once for each."""
    def answers(prompts: list, max_new: int) -> list[str]:
        return gen(prompts, max_new)

    def scored(prompts: list, max_new: int, texts: list[str], references: list[str] | None = None) -> Any:
        got = gen.scored(prompts, max_new, [])  # the answers alone
        options = gen.options(prompts, texts)[0] if texts else [[] for _ in prompts]
        refs = gen.loglik(prompts, references) if references is not None else None
        return got._replace(options=options, references=refs)

    answers.scored = scored  # type: ignore[attr-defined]
    return answers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gates", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="triage")
    ap.add_argument("--candidate", default=None, help="adapter directory of the candidate (default: none)")
    ap.add_argument("--reference", default=None, help="adapter directory of the reference (default: none)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from tuneship.basemodel import resolve_base_ref
    from tuneship.stages import _as_client_sends, _generator
    from tuneship.tasks import load_task

    task = load_task(args.task)
    base = resolve_base_ref(task.base_model)[0]
    load = os.getloadavg()[0]
    t = time.perf_counter()
    cand = _as_client_sends(task, _generator(base, Path(args.candidate) if args.candidate else None, "candidate"))
    ref = _as_client_sends(task, _generator(base, Path(args.reference) if args.reference else None, "reference"))
    loading = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="bench-gates-") as tmp:
        data = Path(tmp) / task.name
        task.resolve(task.demo.generator)(data, seed=0)
        one_pass = _gate_run(task, data, cand, ref)
        separate = _gate_run(task, data, _separate(cand), _separate(ref))
    same = {k: v["verdicts"] for k, v in one_pass["suites"].items()} == \
        {k: v["verdicts"] for k, v in separate["suites"].items()}
    out = {"bench": "gates", "task": task.name, "candidate": args.candidate or "base model",
           "reference": args.reference or "base model", "load_at_start": round(load, 2),
           "load_at_end": round(os.getloadavg()[0], 2), "model_loading_s": round(loading, 2),
           "one_pass": one_pass, "separate_passes": separate, "same_verdicts": same,
           "speedup": round(separate["wall_s"] / max(one_pass["wall_s"], 1e-9), 2),
           "budget_s": 300, "within_budget": one_pass["wall_s"] + loading <= 300}
    say(f"full gate run {one_pass['wall_s']:.1f}s (+{loading:.1f}s loading) with one pass a prompt, "
        f"{separate['wall_s']:.1f}s with separate passes: x{out['speedup']}; same verdicts: {same}")
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
