"""The fine-tune beside a busy process: why the embedded default sets OMP_WAIT_POLICY=PASSIVE.

On the embedded default the local trainer (and evaluate, compile) share the machine with
Airflow, MLflow, the gateway and Triton, whose model answers traffic during every release
window. PyTorch's CPU wheels run their intra-op threads on GNU OpenMP, whose threads spin at
each barrier: when another process preempts one of them, its partner burns its core waiting.

Each contender is `python -m tuneship.train` on the real SmolLM2-135M-Instruct with the triage
task's shipped recipe (`smollm2-lora`) for `--steps` optimizer steps on the triage generator's
data, in its own process; tokens/s is the trainer's own figure at its last step (non-padding
tokens over the training loop's time). The busy process is one Python loop pinned to nothing,
like a Triton model instance answering one request after another:

- quiet, torch's default threads (the baseline, alone on the machine);
- busy, default: what the embedded default did before;
- busy, OMP_WAIT_POLICY=PASSIVE: what it does now;
- busy, one torch thread;
- quiet, OMP_WAIT_POLICY=PASSIVE: what the setting costs when nothing else runs.

    python -m bench.contention [--steps N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tuneship import config

RUNS = (
    ("quiet", False, {}),
    ("busy", True, {}),
    ("busy_passive", True, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("busy_one_thread", True, {"TUNESHIP_TORCH_THREADS": "1"}),
    ("quiet_passive", False, {"OMP_WAIT_POLICY": "PASSIVE"}),
)
_STEP = re.compile(r"step (\d+)/(\d+) loss \S+ tok/s (\d+)")


def _busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


_DONE = re.compile(r"eval loss (\S+),")


def run_trainer(data: Path, out: Path, steps: int, env: dict[str, str], sets: tuple[str, ...] = (),
           recipe: str = "smollm2-lora") -> dict[str, Any]:
    """`python -m tuneship.train` with a shipped recipe (`sets`: more `--set key=value`) on the
    packaged SmolLM2, in its own process: its last tokens/s figure, steps, eval loss, wall."""
    from tuneship.train.recipe import default_recipe_path

    cmd = [sys.executable, "-m", "tuneship.train", "--recipe", str(default_recipe_path(recipe)),
           "--data", str(data), "--base", "smollm2-135m-instruct", "--output", str(out),
           "--set", f"max_steps={steps}", "--set", "checkpoint_every=0"]
    for s in sets:
        cmd += ["--set", s]
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "TUNESHIP_TORCH_THREADS")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"trainer exited {proc.returncode}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    steps_seen = _STEP.findall(proc.stdout + proc.stderr)
    done = _DONE.findall(proc.stdout + proc.stderr)
    return {"tokens_per_s": int(steps_seen[-1][2]), "steps": int(steps_seen[-1][0]), "wall_s": round(wall, 1),
            "eval_loss": float(done[-1]) if done and done[-1] != "None" else None}


def triage_data(tmp: Path) -> Path:
    """The packaged SmolLM2 ready and the triage generator's 600/40 rows under `tmp`: what the
    trainer benchmarks train on (make demo's first batch)."""
    from tuneship.basemodel import ensure_packaged
    from tuneship.tasks import load_task

    ensure_packaged("smollm2-135m-instruct")
    task = load_task("triage")
    data = tmp / "data"
    task.resolve(task.demo.generator)(data, 600, 40, 0)
    return data


def save(results: dict[str, Any], out: Path | None, name: str) -> Path:
    """Write a benchmark's results (default: TUNESHIP_HOME/bench/<name>.json)."""
    out = out or config.home() / "bench" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    results: dict[str, Any] = {"steps": args.steps, "cpus": os.cpu_count(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-contention-") as tmp:
        data = triage_data(Path(tmp))
        for name, busy, env in RUNS:
            hog = _busy() if busy else None
            try:
                r = run_trainer(data, Path(tmp) / name, args.steps, env)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
            results["runs"][name] = {**r, "env": env, "beside_busy_process": busy}
            print(f"[contention] {name:16s} {r['tokens_per_s']:5d} tokens/s  ({r['wall_s']} s wall)", flush=True)
    runs = results["runs"]
    results["ratios"] = {
        "busy_vs_quiet": round(runs["busy"]["tokens_per_s"] / runs["quiet"]["tokens_per_s"], 3),
        "passive_vs_default_when_busy": round(runs["busy_passive"]["tokens_per_s"] / runs["busy"]["tokens_per_s"], 3),
        "passive_vs_default_when_quiet": round(runs["quiet_passive"]["tokens_per_s"] / runs["quiet"]["tokens_per_s"],
                                               3),
        "one_thread_vs_passive_when_busy": round(runs["busy_one_thread"]["tokens_per_s"]
                                                 / runs["busy_passive"]["tokens_per_s"], 3),
    }
    for k, v in results["ratios"].items():
        print(f"[contention] {k}: {v}x", flush=True)
    save(results, args.out, "contention")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
