"""Compile and serve SmolLM2-135M-Instruct: the ONNX Runtime GenAI build against eager PyTorch.

What the compile step costs and what the served model gains, on the packaged base model
(`smollm2-135m-instruct`, converted once into TUNESHIP_HOME/bench/compile/models):

1. compile at each precision (--precisions, default fp32,int8,int4): `compile_for_triton`
   wall time (merge/load, HF save, the model builder, parity or the quality check), the
   builder's own share and the artifact's size; a quantized build's greedy answers to the
   bench's prompts compared with eager's (the share unchanged: a record here, not a gate;
   the task's gates judge a real candidate in llm_finetune);
2. a forced 12-token answer (never stopping at eos, so every path does the same work) on the
   same chat prompts through: eager PyTorch without a cache (the full recompute the old ONNX
   export served), eager with its KV cache (what evaluation runs), and the Triton model class
   (`GenaiGreedyGenerator`: ONNX Runtime GenAI, KV cache) at 1 thread (Triton's default
   TUNESHIP_ORT_THREADS) and at --threads; mean per-request seconds and tokens/s;
3. concurrency inside one model instance: two requests on two threads, each with its own
   generator over the shared model, against the same two one after the other;
4. the memory-bandwidth ceiling, measured in the same run: decoding one token reads every
   weight once, so tokens/s cannot exceed (copy bandwidth / artifact bytes); each precision's
   tokens/s is quoted as a share of its ceiling.

Ratios are against eager PyTorch measured in the same run. JSON to stdout (last line) and
TUNESHIP_HOME/bench/compile.json (or --out). On a shared machine the times are upper bounds;
the load average at start and end is recorded.

    python -m bench compile   or   python -m bench.compile [--threads 2] [--prompts 8] [--precisions fp32,int8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import compile_variant

NAME = "smollm2-135m-instruct"
ANSWER_TOKENS = 12
QUESTIONS = [
    "What is the capital of France?", "Name a primary colour.", "How many legs does a spider have?",
    "Say hello in Spanish.", "What is two plus two?", "Which planet is closest to the sun?",
    "What do bees make?", "What is the opposite of cold?", "Give me a synonym for happy.",
    "What colour is the sky on a clear day?",
]


def say(msg: str) -> None:
    print(f"[compile] {msg}", file=sys.stderr, flush=True)


def _eager_forced(model: Any, ids: list[int], n: int, kv_cache: bool) -> float:
    import torch

    t0 = time.perf_counter()
    seq, past = list(ids), None
    with torch.inference_mode():
        for _ in range(n):
            if kv_cache:
                feed = seq if past is None else seq[-1:]
                out = model(input_ids=torch.tensor([feed]), past_key_values=past, use_cache=True)
                past = out.past_key_values
            else:
                out = model(input_ids=torch.tensor([seq]), use_cache=False)
            seq.append(int(torch.argmax(out.logits[0, -1])))
    return time.perf_counter() - t0


def _served_forced(gen: Any, ids: list[int], n: int) -> float:
    """Prompt pass + n greedy steps through the Triton class's own generator set-up."""
    t0 = time.perf_counter()
    generator = gen._generator(ids, n)
    for _ in range(n):
        generator.generate_next_token()
        generator.get_next_tokens()
    return time.perf_counter() - t0


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes a second this machine moves through memory: the best of `repeats` copies of a
    `mib` MiB buffer (STREAM's copy: each byte read once and written once)."""
    import numpy as np

    src = np.ones(mib * 2**20, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def _summary(seconds: list[float]) -> dict[str, float]:
    mean = statistics.mean(seconds)
    return {"request_mean_s": round(mean, 4), "request_max_s": round(max(seconds), 4),
            "tokens_per_s": round(ANSWER_TOKENS / mean, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads and the multi-thread ORT run")
    ap.add_argument("--prompts", type=int, default=8, help=f"chat prompts timed (max {len(QUESTIONS)})")
    ap.add_argument("--precisions", default="fp32,int8,int4",
                    help="comma-separated builds to compile and time; a build may carry the task file's "
                         "quantization options: int4:block_size=128:accuracy_level=1 (bench.compile_variant)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    from tuneship import config

    work = config.home() / "bench" / "compile"
    os.environ["TUNESHIP_MODELS"] = str(work / "models")
    from tuneship.basemodel import ensure_packaged
    from tuneship.compile import (
        compile_for_triton,
        load_triton_model_module,
        merged_model,
        prompt_ids,
        served_text,
    )
    from tuneship.generate import generate_ids

    result: dict[str, Any] = {"model": NAME, "threads": args.threads, "answer_tokens": ANSWER_TOKENS,
                              "cpu_count": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    ensure_packaged(NAME, log=say)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS[: args.prompts]]
    model, tok = merged_model(NAME, None)
    ids = [prompt_ids(tok, c) for c in chats]
    eager_answers = [generate_ids(model, tok, c, ANSWER_TOKENS)[0] for c in chats]
    result["bandwidth_gb_s"] = round(copy_bandwidth() / 1e9, 1)
    result["compile"], vdirs = {}, {}
    for precision in args.precisions.split(","):
        spec = compile_variant(precision)
        say(f"compiling {precision} (merge, model builder, parity or the answers' check) ...")
        seen: dict[str, Any] = {}

        def record(answers: Any, seen: dict[str, Any] = seen) -> dict[str, Any]:
            got = answers(chats, ANSWER_TOKENS)
            seen["same_as_eager"] = sum(a == b for a, b in zip(got, eager_answers, strict=True)) / len(chats)
            return seen

        t0 = time.perf_counter()
        report = compile_for_triton(NAME, None, work / f"triton-{precision.replace(':', '-')}", "llm",
                                    deployment={"bench": "compile"}, parity_prompts=chats[:2],
                                    precision=spec.precision, block_size=spec.block_size,
                                    accuracy_level=spec.accuracy_level, builder_options=spec.builder_options(),
                                    quality_gate=record if spec.precision != "fp32" else None)
        vdirs[precision] = Path(report["model_dir"]) / str(report["version"])
        result["compile"][precision] = {
            "wall_s": round(time.perf_counter() - t0, 2), "builder_s": report["export_seconds"],
            "model_bytes": report["onnx_bytes"], "parity": report["parity"],
            "same_answers_as_eager": seen.get("same_as_eager", 1.0 if report["parity"]["generation_equal"] else None),
            "ceiling_tokens_per_s": round(result["bandwidth_gb_s"] * 1e9 / report["onnx_bytes"], 1)}

    runs: dict[str, list[float]] = {"eager_no_cache": [], "eager_kv_cache": []}
    for p in ids[:1]:  # warm-up
        _eager_forced(model, p, ANSWER_TOKENS, True)
    for p in ids:
        runs["eager_no_cache"].append(_eager_forced(model, p, ANSWER_TOKENS, False))
        runs["eager_kv_cache"].append(_eager_forced(model, p, ANSWER_TOKENS, True))
    cls = load_triton_model_module().GenaiGreedyGenerator
    for precision, vdir in vdirs.items():
        for threads in sorted({1, args.threads}):
            gen = cls(str(vdir), threads=threads)
            assert [gen.encode(served_text(tok, c)) for c in chats] == ids, "served tokenizer differs"
            _served_forced(gen, ids[0], ANSWER_TOKENS)  # warm-up
            label = f"triton_class_{precision}_ort_threads_{threads}"
            runs[label] = [_served_forced(gen, p, ANSWER_TOKENS) for p in ids]
            if threads == args.threads:
                tps = ANSWER_TOKENS / statistics.mean(runs[label])
                result["compile"][precision]["share_of_ceiling"] = round(
                    tps / result["compile"][precision]["ceiling_tokens_per_s"], 3)
            if threads == 1 and precision == "fp32":
                gen.generate(served_text(tok, chats[0]), ANSWER_TOKENS)
                t0 = time.perf_counter()
                for p in ids[:2]:
                    _served_forced(gen, p, ANSWER_TOKENS)
                serial = time.perf_counter() - t0
                workers = [threading.Thread(target=_served_forced, args=(gen, p, ANSWER_TOKENS)) for p in ids[:2]]
                t0 = time.perf_counter()
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                both = time.perf_counter() - t0
                result["two_requests_one_instance"] = {
                    "one_after_the_other_s": round(serial, 4), "two_threads_s": round(both, 4),
                    "speedup": round(serial / both, 2)}
    result["forced_answer"] = {k: _summary(v) for k, v in runs.items()}
    base = statistics.mean(runs["eager_kv_cache"])
    result["speedup_vs_eager_kv_cache"] = {k: round(base / statistics.mean(v), 2) for k, v in runs.items()}
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = args.out or config.home() / "bench" / "compile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True))
    say(f"results: {out}")
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
