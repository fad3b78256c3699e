"""What the demo recipes' `precision: auto` and `lora.dropout: 0` buy on the CPU.

Each contender is `python -m tuneship.train` on the real SmolLM2-135M-Instruct with the triage
task's shipped recipe (`smollm2-lora`) and one or two keys overridden, for `--steps` optimizer
steps on the triage generator's data (600 rows), alone on the machine, in its own process,
one after another; tokens/s is the trainer's own figure at its last step (non-padding tokens
over the training loop's time) and the eval loss is on the dataset's 40 eval rows:

- fp32, dropout 0.05: the recipe as it was (the baseline);
- fp32, dropout 0;
- auto, dropout 0.05: bf16 frozen base weights and bf16 autocast where the CPU computes bf16
  natively (AVX512-BF16 / AMX; `trainer.compute_precision`), else the same as fp32;
- auto, dropout 0: the recipe as shipped.

On the CPU every contender uses the eager attention for these short rows (the trainer's own
choice, `CPU_EAGER_ATTENTION_MAX_LEN`), so the baseline is slightly faster than the trainer
before that choice was made. The resolved precision is printed: on a CPU without native bf16
`auto` is fp32 and the ratios show only dropout's share.

    python -m bench.train_precision [--steps N] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.contention import run_trainer, save, triage_data

RUNS = (
    ("fp32_dropout", ("precision=fp32", "lora.dropout=0.05")),
    ("fp32_no_dropout", ("precision=fp32", "lora.dropout=0.0")),
    ("auto_dropout", ("precision=auto", "lora.dropout=0.05")),
    ("auto_no_dropout", ("precision=auto", "lora.dropout=0.0")),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    import torch

    from tuneship.train.trainer import compute_precision

    auto = compute_precision("auto", torch.cuda.is_available())
    results: dict[str, Any] = {"steps": args.steps, "cpus": os.cpu_count(), "auto_is": auto, "runs": {}}
    print(f"[train_precision] precision: auto computes in {auto} here", flush=True)
    env = {"OMP_WAIT_POLICY": "PASSIVE"}  # as the embedded default runs the trainer
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        data = triage_data(Path(tmp))
        for name, sets in RUNS:
            r = run_trainer(data, Path(tmp) / name, args.steps, env, sets)
            results["runs"][name] = {**r, "set": list(sets)}
            print(f"[train_precision] {name:16s} {r['tokens_per_s']:5d} tokens/s  eval loss {r['eval_loss']}  "
                  f"({r['wall_s']} s wall)", flush=True)
    runs = results["runs"]
    base = runs["fp32_dropout"]["tokens_per_s"]
    results["ratios"] = {name: round(r["tokens_per_s"] / base, 3) for name, r in runs.items()}
    for k, v in results["ratios"].items():
        print(f"[train_precision] {k} vs fp32_dropout: {v}x", flush=True)
    save(results, args.out, "train_precision")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
