"""Quantized builds against the unquantized candidate, on a task's own gates.

For each precision (--precisions, default int8,int4): the candidate (base model plus
`--candidate` adapter; without it the base model) is built by ONNX Runtime GenAI's model
builder, and its answers through the class Triton runs are held to every gate suite of the
task against the unquantized candidate's answers, scored in the same run on the same cases
(`tuneship.stages.score_quantized`, what `llm_finetune.compile_model` runs). Reports the
artifact's size, the build and check seconds, the share of answers unchanged, each answer
metric quantized against unquantized, and the verdict with the gates that refused it.
Cases: the task's demo data (`demo.generator`, seed 0) for dataset suites.

    python -m bench.quantize [--task triage] [--candidate DIR] [--precisions int8,int4]

A precision may carry the task file's other quantization options after colons
(`bench.compile_variant`): `int4:algorithm=k_quant:int8_layers=last_matmul+mixed_layers` is
`{precision: int4, algorithm: k_quant, int8_layers: [last_matmul, mixed_layers]}`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench import compile_variant, emit


def say(msg: str) -> None:
    print(f"[quantize] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="triage")
    ap.add_argument("--candidate", default=None, help="adapter directory of the candidate (default: none)")
    ap.add_argument("--precisions", default="int8,int4")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from tuneship.basemodel import resolve_base_ref
    from tuneship.compile import compile_for_triton
    from tuneship.evaluate import load_cases, run_suite
    from tuneship.stages import _as_client_sends, _generator, score_quantized
    from tuneship.tasks import load_task

    task = load_task(args.task)
    base = resolve_base_ref(task.base_model)[0]
    adapter = Path(args.candidate) if args.candidate else None
    out: dict = {"bench": "quantize", "task": task.name, "candidate": args.candidate or "base model",
                 "precisions": {}}
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        data = Path(tmp) / task.name
        task.resolve(task.demo.generator)(data, seed=0)
        eager = _as_client_sends(task, _generator(base, adapter, "unquantized"))
        t0 = time.perf_counter()
        evaluated = {}
        for name in task.eval.suites:
            suite = task.suite(name)
            result = run_suite(suite, eager, load_cases(suite, data, task.parser), task.parser)
            evaluated[f"{suite.name}@v{suite.version}"] = result.to_dict()
        out["unquantized_scoring_s"] = round(time.perf_counter() - t0, 1)
        for variant in args.precisions.split(","):
            spec = compile_variant(variant)
            precision = spec.precision
            quantized = task.model_copy(update={"compile": spec})
            seen: dict = {}

            def check(answers, quantized=quantized, seen=seen):
                seen["result"] = score_quantized(quantized, evaluated, data, answers, "unquantized")[0]
                return seen["result"]

            t0 = time.perf_counter()
            report = compile_for_triton(base, adapter, Path(tmp) / variant.replace(":", "-"), "llm",
                                        precision=precision, block_size=spec.block_size,
                                        accuracy_level=spec.accuracy_level, builder_options=spec.builder_options(),
                                        quality_gate=check)
            result = seen["result"]
            out["precisions"][variant] = {
                "model_mb": round(report["onnx_bytes"] / 1e6, 1), "builder_s": report["export_seconds"],
                "compile_and_check_s": round(time.perf_counter() - t0, 1), "check_s": result["seconds"],
                "passed": result["passed"],
                "refused_by": [f"{g['suite']} {g['metric']} {g['rule']}" for g in result["gates"]
                               if g["verdict"] != "pass"],
                "suites": {s["suite"]: {"same_answer": round(s["same_answer"], 3),
                                        "metrics": {k: [round(v, 3), round(s["unquantized"][k], 3)]
                                                    for k, v in s["quantized"].items()}}
                           for s in result["suites"]}}
            say(f"{variant}: {out['precisions'][variant]['model_mb']} MB, passed={result['passed']}, "
                f"refused by {out['precisions'][variant]['refused_by'] or 'nothing'}")
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
