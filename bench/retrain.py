"""A drift retrain: warm start from the champion's adapter against a fresh LoRA, same run.

On the triage task's demo data (as `make demo` lands it: batch 1 `write_dataset(seed=0)`,
the drifted batch `write_dataset(seed=1, drift=0.3)`) and its recipe:

1. the champion: a fresh LoRA on batch 1 (the recipe as shipped);
2. baseline: a fresh LoRA on the drifted batch (the recipe as shipped);
3. warm start: the champion's adapter on the drifted batch with the task file's
   `drift.retrain` steps and learning rate (what `llm_finetune` plans for a drift retrain);
4. each scored with the task's gating suite on the drifted batch's eval cases, and each
   retrain gated against the champion as `llm_finetune.evaluate` does.

Reports training seconds, the speed-up (fresh / warm), each model's metrics and whether each
retrain passes its gates. JSON to stdout and to --out.

    python -m bench.retrain [--task triage]
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
    print(f"[retrain] {msg}", file=sys.stderr, flush=True)


def _train(task: Any, data: Path, out: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    from tuneship.train.recipe import load_recipe
    from tuneship.train.trainer import train

    recipe = load_recipe(task.recipe_path(), overrides)
    t0 = time.perf_counter()
    metrics = train(recipe, data, out, log=lambda m: None)
    wall = round(time.perf_counter() - t0, 1)
    say(f"{out.name}: {metrics['steps']} steps in {wall}s (train loss {metrics['train_loss']:.3f})")
    return {"steps": metrics["steps"], "train_s": wall, "train_loss": metrics["train_loss"],
            "learning_rate": recipe.learning_rate}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.retrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="triage")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from tuneship.basemodel import resolve_base_ref
    from tuneship.evaluate import apply_gates, load_cases, run_suite
    from tuneship.stages import _as_client_sends, _generator
    from tuneship.tasks import load_task

    task = load_task(args.task)
    spec = task.drift.retrain
    if not spec.warm_start:
        print(f"task {task.name} does not warm-start its retrains (drift.retrain.warm_start)", file=sys.stderr)
        return 2
    base = resolve_base_ref(task.base_model)[0]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-retrain-") as tmp:
        root = Path(tmp)
        gen = task.resolve(task.demo.generator)
        gen(root / "batch1", seed=0)
        gen(root / "batch2", seed=1, drift=0.3)
        runs = {"champion": _train(task, root / "batch1", root / "champion", {"base_model": base})}
        runs["fresh"] = _train(task, root / "batch2", root / "fresh", {"base_model": base})
        runs["warm"] = _train(task, root / "batch2", root / "warm", {
            "base_model": base, "init_adapter": str(root / "champion" / "adapter"), **spec.overrides()})
        suite = task.suite(task.eval.suites[0])
        cases = load_cases(suite, root / "batch2", task.parser)
        results = {}
        for name in runs:
            results[name] = run_suite(suite, _as_client_sends(task, _generator(base, root / name / "adapter", name)),
                                      cases, task.parser)
            runs[name]["metrics"] = results[name].metrics
            say(f"{name}: {results[name].metrics}")
        for name in ("fresh", "warm"):
            gates = apply_gates(suite, results[name], results["champion"], "champion")
            runs[name]["gates_passed"] = gates.passed
            runs[name]["gates"] = gates.summary()
    out = {"bench": "retrain", "task": task.name, "suite": f"{suite.name}@v{suite.version}", "cases": len(cases),
           "runs": runs, "speedup_train": round(runs["fresh"]["train_s"] / max(runs["warm"]["train_s"], 1e-9), 2),
           "load_at_start": round(load, 2), "load_at_end": round(os.getloadavg()[0], 2)}
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
