"""The serving gate on the real model, as `llm_release.serving_gate` runs it: SmolLM2 compiled
(fp32, ONNX Runtime GenAI) twice into one Triton, an equal candidate against the live colour,
on the task's demo eval prompts, `--repeats` times.

What it shows: how far apart two identical deployments measure (the ratio intervals), how many
rounds the gate needs, how long it takes, and how often it wrongly refuses an equal candidate
(the declared rate is 5%). The baseline is the live colour measured in the same run (every
figure is a ratio against it).

    python -m bench.serving [--task triage] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import emit


def say(msg: str) -> None:
    print(f"[serving] {msg}", file=sys.stderr, flush=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="triage")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from tuneship import serving_gate, tritonserver
    from tuneship.basemodel import resolve_base_ref
    from tuneship.compile import compile_for_triton
    from tuneship.evaluate import prompt_and_reference
    from tuneship.stages import served_texts
    from tuneship.tasks import load_task
    from tuneship.triton_control import TritonControl

    task = load_task(args.task)
    spec = task.serving
    max_new = spec.max_new_tokens or task.suite(task.eval.suites[0]).generation.max_new_tokens
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        repo = Path(tmp) / "repo"
        t = time.perf_counter()
        compile_for_triton(resolve_base_ref(task.base_model)[0], None, repo, "live", deployment={"version": "1"})
        compiling = time.perf_counter() - t
        shutil.copytree(repo / "live", repo / "candidate")
        cfg = repo / "candidate" / "config.pbtxt"
        cfg.write_text(cfg.read_text().replace('name: "live"', 'name: "candidate"'))
        data = Path(tmp) / "data"
        task.resolve(task.demo.generator)(data, seed=0)
        rows = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines() if line.strip()]
        prompts = served_texts(task, [prompt_and_reference(r, data / "eval.jsonl", i)[0] for i, r in enumerate(rows, 1)])
        server = tritonserver.TritonServer(repository=repo, http_port=_port(), grpc_port=_port(),
                                           metrics_port=_port(), log_path=Path(tmp) / "triton.log")
        server.start(timeout=60)
        runs: list[dict[str, Any]] = []
        try:
            control = TritonControl(server.url)
            for model in ("live", "candidate"):
                control.load(model)
                control.warm_up(model, prompts[:2])
            for r in range(1, args.repeats + 1):
                def measure_round(k: int, r: int = r) -> dict[str, Any]:
                    return serving_gate.measure(server.url, ["candidate", "live"], prompts, max_new,
                                                requests=spec.requests, seed=r * 100 + k,
                                                first=(r * spec.max_rounds + k) * spec.requests, log=say)

                t = time.perf_counter()
                _, result = serving_gate.gate(spec, measure_round, "candidate", "live", seed=r, log=say)
                ratios = {row["metric"]: [round(row[k], 4) for k in ("diff", "diff_low", "diff_high")]
                          for row in result["rows"] if row["rule"].startswith("ratio")}
                runs.append({"wall_s": round(time.perf_counter() - t, 1), "rounds": result["rounds"],
                             "passed": result["passed"], "ratios": ratios,
                             "p95_ms": round(result["candidate"]["p95_ms"], 1),
                             "tokens_per_s": round(result["candidate"]["tokens_per_s"], 2),
                             "peak_memory_mb": result["candidate"]["peak_memory_mb"],
                             "cost_per_1k_tokens": result["candidate"]["cost_per_1k_tokens"]})
                say(f"repeat {r}: passed={result['passed']} in {runs[-1]['wall_s']} s, {result['rounds']} round(s); "
                    + "; ".join(f"{m} x{v[0]} [x{v[1]}, x{v[2]}]" for m, v in ratios.items()))
        finally:
            server.stop()
    refused = sum(not r["passed"] for r in runs)
    out = {"bench": "serving", "task": task.name, "model": task.base_model, "requests": spec.requests,
           "max_new_tokens": max_new, "load_at_start": round(load, 2), "load_at_end": round(os.getloadavg()[0], 2),
           "compile_s": round(compiling, 1), "repeats": runs, "equal_refused": refused,
           "equal_refused_share": round(refused / max(len(runs), 1), 3),
           "mean_gate_wall_s": round(sum(r["wall_s"] for r in runs) / max(len(runs), 1), 1)}
    say(f"{len(runs)} gate runs on two identical deployments: {refused} refused, "
        f"{out['mean_gate_wall_s']} s each on average")
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
