"""Fine-tune throughput and peak memory: Tuneship's trainer vs plain transformers Trainer + peft.

Both contenders run the same number of optimizer steps with the same LoRA adapter (rank,
alpha, dropout, target modules), optimizer hyper-parameters, batch size and gradient
accumulation, on the same base model and the same demo data (the triage task's generator, the 600
prompt/completion training rows `make demo` uses), loss on completion tokens only. Each runs
in its own process; peak memory is the summed RSS of that process tree (sampled every 50 ms)
and, on CUDA, `torch.cuda.max_memory_allocated()`.

- tuneship: `tuneship.train.trainer.train()` (what `python -m tuneship.train` calls) with the
  shipped `tiny-lora` recipe and its own settings, plus `packing: true` (the recipe key that
  packs several examples into one row of up to `max_seq_len` tokens, each example attending
  only to itself). On CUDA the recipe runs with `precision: bf16` (bf16 frozen base weights,
  fp32 LoRA weights, bf16 autocast).
- baseline: what a team writes with the libraries alone and no packing: `AutoModelForCausalLM`
  + `peft.get_peft_model` + `transformers.Trainer`, rows tokenized prompt (with BOS) +
  completion + EOS with prompt labels at -100, `DataCollatorForSeq2Seq` padding each batch to
  its longest row, the library's default optimizer (fused AdamW), checkpoints at the recipe's
  cadence like Tuneship's, no evaluation. On CUDA, bf16 weights and `bf16=True`.

tokens/s counts the non-padding tokens of the batches trained (prompt + completion, the
attention-mask sum), divided by the training loop's time: for Tuneship its own `train_s`,
for the baseline `on_train_begin` to the end of the last optimizer step. Both include the
periodic checkpoints and exclude model loading, tokenization and the final save. The child's
whole wall time is reported beside it. On CPU Tuneship's trainer picks 1 torch thread for
the tiny model; the baseline gets the same count (`--baseline-threads default` leaves it at
torch's default instead, which on 2 cores makes it about 3.5x slower on the tiny model).

On CPU the tiny local base model is used (built into TUNESHIP_HOME if missing); with
`--device cuda` a Llama of realistic size is built from a config with random weights (bf16),
by default the shape of Llama 3.2 1B (`--model-config llama-1b`, or a JSON file of
LlamaConfig keys).

    python -m bench.trainer [--device cpu|cuda] [--steps N] [--model-config NAME|FILE]
                            [--batch-size N] [--max-seq-len N] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.tree import run_measured

GOAL_SPEEDUP = 1.5  # issue 4: at least 1.5x the baseline's tokens/s on GPU
DEFAULT_STEPS = {"cpu": 100, "cuda": 200}
DATA = {"n_train": 600, "n_eval": 120, "seed": 0}  # what `make demo` trains on

# Model shapes for --model-config (random weights serve for throughput). The tokenizer is the
# tiny base model's; a larger embedding table than the tokenizer needs is harmless and keeps
# the LM head at its real cost.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-1b": {  # the shape of Llama 3.2 1B, about 1.24B parameters
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": True,
    },
}


class NotOnGpu(RuntimeError):
    """The contender finished a step without allocating any CUDA memory."""


# ---------------------------------------------------------------- preparation (untimed)


def _data_dir() -> Path:
    from tuneship import config
    from tuneship.tasks import load_task

    _triage = load_task("triage").module("triage_task")
    write_dataset = _triage.write_dataset

    d = config.home() / "bench" / "trainer-data-{n_train}-{n_eval}-seed{seed}".format(**DATA)
    if not (d / ".complete").exists():
        write_dataset(d, DATA["n_train"], DATA["n_eval"], seed=DATA["seed"])
        (d / ".complete").touch()
    return d


def _tiny_model() -> Path:
    """The repo's own tiny base model, pre-trained on the triage task's demo text (reused when
    its manifest matches, else built: ~35 s)."""
    from tuneship.basemodel import default_dir

    subprocess.run([sys.executable, "-m", "tuneship.basemodel", "--out", str(default_dir()), "--task", "triage"],
                   check=True, stdout=sys.stderr)
    return default_dir()


def _model_config(spec: str) -> tuple[str, dict[str, Any]]:
    if spec in PRESETS:
        return spec, PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"--model-config {spec!r}: neither a preset ({', '.join(PRESETS)}, "
                         "tiny) nor a JSON file of LlamaConfig keys")
    return path.stem, json.loads(path.read_text())


def _big_model(name: str, cfg: dict[str, Any], tiny: Path) -> Path:
    """Build (once) a random-weight bf16 Llama from `cfg` under TUNESHIP_HOME/bench/models."""
    from tuneship import config

    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    out = config.home() / "bench" / "models" / f"{name}-{digest}"
    if (out / "bench_model.json").is_file():
        return out
    print(f"[trainer] building {name} (random weights, bf16) into {out} ...", file=sys.stderr,
          flush=True)
    subprocess.run([sys.executable, "-m", "bench.trainer", "--build-model", json.dumps(cfg),
                    "--build-out", str(out), "--build-tokenizer", str(tiny)],
                   check=True, stdout=sys.stderr)
    return out


def build_model(cfg: dict[str, Any], out: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    conf = LlamaConfig(**{**cfg, "bos_token_id": tok.bos_token_id,
                          "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    if conf.vocab_size < len(tok):
        raise SystemExit(f"vocab_size {conf.vocab_size} is smaller than the tokenizer ({len(tok)})")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "bench_model.json").write_text(json.dumps(
        {"config": cfg, "parameters": params, "weights": "random (seed 0)", "dtype": "bfloat16"},
        indent=2))
    os.replace(tmp, out)
    print(f"built {out}: {params:,} parameters", file=sys.stderr, flush=True)


def _lr_scheduler_type(recipe: dict[str, Any]) -> str:
    if recipe["lr_schedule"] == "constant":
        return "constant_with_warmup" if recipe["warmup_steps"] else "constant"
    return str(recipe["lr_schedule"])


# ---------------------------------------------------------------- the two contenders


def _cuda_peak_mb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def run_tuneship(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from tuneship.train.recipe import validate_recipe
    from tuneship.train.trainer import train

    recipe = validate_recipe(spec["recipe"], "bench recipe")
    cuda = spec["device"] == "cuda"

    def log(msg: str) -> None:
        print(f"  [tuneship] {msg}", file=sys.stderr, flush=True)
        if cuda and msg.startswith("step 1/") and torch.cuda.max_memory_allocated() == 0:
            raise NotOnGpu(
                "tuneship.train ran its first step without allocating CUDA memory: the trainer "
                "keeps the model and batches on the CPU, so there is no GPU figure to compare"
            )

    try:
        m = train(recipe, spec["data"], Path(spec["workdir"]) / "out", log=log)
    except NotOnGpu as e:
        return {"error": str(e), "torch_threads": torch.get_num_threads()}
    return {
        "steps": m["steps"],
        "tokens": m["tokens_seen"],
        "seconds": m["train_s"],
        "train_loss": m["train_loss"],
        "eval_loss": m["eval_loss"],
        "torch_threads": torch.get_num_threads(),
        "cuda_max_allocated_mb": _cuda_peak_mb(),
        "device_name": _device_name(),
    }


def _encode(row: dict[str, str], tok: Any, max_len: int) -> dict[str, list[int]]:
    """Prompt (with BOS) + completion + EOS; loss on the completion only; cut the prompt's head."""
    p = tok(row["prompt"])["input_ids"]
    c = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if len(p) + len(c) > max_len:
        p = p[len(p) + len(c) - max_len:]
    return {"input_ids": p + c, "attention_mask": [1] * (len(p) + len(c)),
            "labels": [-100] * len(p) + c}


def run_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    r, cuda = spec["recipe"], spec["device"] == "cuda"
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    set_seed(r["seed"])
    base = spec["base"]
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = torch.float32
    if cuda and r["precision"] == "bf16":
        dtype = torch.bfloat16
    elif r["precision"] == "fp16":
        dtype = torch.float16
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, local_files_only=True)
    model = get_peft_model(model, LoraConfig(
        r=r["lora"]["r"], lora_alpha=r["lora"]["alpha"], lora_dropout=r["lora"]["dropout"],
        target_modules=r["lora"]["target_modules"], task_type="CAUSAL_LM", bias="none",
    ))
    with open(Path(spec["data"]) / "train.jsonl", encoding="utf-8") as f:
        train_rows = [_encode(json.loads(line), tok, r["max_seq_len"]) for line in f if line.strip()]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class Clock(TrainerCallback):
        t0 = t1 = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step >= state.max_steps:
                sync()
                self.t1 = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                print(f"  [baseline] step {state.global_step}/{state.max_steps} "
                      f"loss {logs['loss']:.4f}", file=sys.stderr, flush=True)

    class CountingTrainer(Trainer):
        """Counts the non-padding tokens of each trained micro-batch (on device, no sync)."""

        tokens: Any = 0

        def training_step(self, model: Any, inputs: Any, *a: Any, **kw: Any) -> Any:
            self.tokens = self.tokens + inputs["attention_mask"].sum()
            return super().training_step(model, inputs, *a, **kw)

    ckpt = int(r["checkpoint_every"])
    steps = int(r["max_steps"])
    args = TrainingArguments(
        output_dir=str(Path(spec["workdir"]) / "out"),
        max_steps=steps,
        per_device_train_batch_size=r["batch_size"],
        gradient_accumulation_steps=r["grad_accum"],
        learning_rate=r["learning_rate"],
        lr_scheduler_type=_lr_scheduler_type(r),
        warmup_steps=r["warmup_steps"],
        weight_decay=r["weight_decay"],
        max_grad_norm=r["max_grad_norm"],
        seed=r["seed"],
        bf16=r["precision"] == "bf16",
        fp16=r["precision"] == "fp16",
        use_cpu=not cuda,
        save_strategy="steps" if ckpt else "no",
        save_steps=ckpt or 500,
        save_total_limit=r["keep_checkpoints"],
        eval_strategy="no",
        logging_steps=max(1, steps // 10),
        report_to="none",
        disable_tqdm=True,
        label_names=["labels"],
        dataloader_num_workers=0,
    )
    clock = Clock()
    trainer = CountingTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        callbacks=[clock],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": trainer.state.global_step,
        "tokens": int(trainer.tokens),
        "seconds": clock.t1 - clock.t0,
        "train_loss": losses[-1] if losses else None,
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "base_dtype": str(dtype).removeprefix("torch."),
        "padding": "dynamic, to the longest row of each batch",
        "torch_threads": torch.get_num_threads(),
        "trainable_parameters": model.get_nb_trainable_parameters()[0],
        "cuda_max_allocated_mb": _cuda_peak_mb(),
        "device_name": _device_name(),
    }


def _child(who: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not fill the pipe the parent reads at the end
    try:
        result = (run_tuneship if who == "tuneship" else run_baseline)(spec)
    finally:
        sys.stdout = out
    print(json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------- driver


def _fmt(who: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"[trainer] {who}: FAILED: {r['error']}"
    gpu = (f", CUDA peak allocated {r['cuda_max_allocated_mb']:,.0f} MB"
           if r.get("cuda_max_allocated_mb") is not None else "")
    return (f"[trainer] {who}: {r['steps']} steps, {r['tokens']:,} tokens in {r['seconds']:.1f} s "
            f"= {r['tokens_per_s']:,.0f} tokens/s, peak RSS {r['peak_rss_mb']:,.0f} MB{gpu} "
            f"(process wall {r['wall_s']:.0f} s, {r['torch_threads']} torch threads)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    help="default: cuda when torch sees a GPU, else cpu")
    ap.add_argument("--steps", type=int, help="optimizer steps for each contender "
                    f"(default {DEFAULT_STEPS['cpu']} on cpu, {DEFAULT_STEPS['cuda']} on cuda)")
    ap.add_argument("--model-config", help="'tiny' (the local base model, default on cpu), a "
                    f"preset ({', '.join(PRESETS)}; default on cuda) or a JSON file of "
                    "LlamaConfig keys")
    ap.add_argument("--recipe", type=Path, help="recipe YAML (default: the shipped tiny-lora)")
    ap.add_argument("--batch-size", type=int, help="override the recipe's batch_size")
    ap.add_argument("--grad-accum", type=int, help="override the recipe's grad_accum")
    ap.add_argument("--max-seq-len", type=int, help="override the recipe's max_seq_len")
    ap.add_argument("--threads", type=int, help="torch threads for every contender")
    ap.add_argument("--baseline-threads", choices=["same", "default"], default="same",
                    help="same: the baseline gets the torch thread count Tuneship's trainer "
                    "picked for itself (default); default: torch's own default (all cores)")
    ap.add_argument("--unpacked-too", action="store_true",
                    help="also run Tuneship's trainer without packing (reported, not in the ratio)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", choices=["tuneship", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--build-model", help=argparse.SUPPRESS)
    ap.add_argument("--build-out", help=argparse.SUPPRESS)
    ap.add_argument("--build-tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.only:  # child process: one contender, one JSON line
        return _child(args.only, args.spec)
    if args.build_model:
        build_model(json.loads(args.build_model), Path(args.build_out), Path(args.build_tokenizer))
        return 0

    from tuneship.train.recipe import default_recipe_path, load_recipe

    has_cuda = False
    if args.device != "cpu":  # importing torch costs seconds; --device cpu does without
        import torch

        has_cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if has_cuda else "cpu")
    if device == "cuda" and not has_cuda:
        print("[trainer] --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    steps = args.steps or DEFAULT_STEPS[device]
    model_spec = args.model_config or ("llama-1b" if device == "cuda" else "tiny")

    data = _data_dir()
    tiny = _tiny_model()
    if model_spec == "tiny":
        base, model_name = tiny, "tiny-llama"
    else:
        model_name, cfg = _model_config(model_spec)
        base = _big_model(model_name, cfg, tiny)

    overrides: dict[str, Any] = {"base_model": str(base), "max_steps": steps, "packing": True}
    if device == "cuda":
        overrides["precision"] = "bf16"
    for key, value in (("batch_size", args.batch_size), ("grad_accum", args.grad_accum),
                       ("max_seq_len", args.max_seq_len)):
        if value is not None:
            overrides[key] = value
    recipe = load_recipe(args.recipe or default_recipe_path(), overrides).model_dump(mode="json")

    results: dict[str, Any] = {
        "device": device,
        "cpus": os.cpu_count(),
        "model": model_name,
        "base_model_dir": str(base),
        "data": {**DATA, "dir": str(data)},
        "steps": steps,
        "recipe": recipe,
        "versions": {d: _version(d) for d in ("torch", "transformers", "peft")},
        "baseline_threads": args.threads or args.baseline_threads,
        "packing": {"tuneship": True, "baseline": False,
                    **({"tuneship_unpacked": False} if args.unpacked_too else {})},
    }
    env = {"CUDA_VISIBLE_DEVICES": "" if device == "cpu" else os.environ.get("CUDA_VISIBLE_DEVICES"),
           "TUNESHIP_TORCH_THREADS": str(args.threads) if args.threads else None,
           "TOKENIZERS_PARALLELISM": "false"}
    print(f"[trainer] {device}, model {model_name}, {steps} steps, batch {recipe['batch_size']} x "
          f"accum {recipe['grad_accum']}, max_seq_len {recipe['max_seq_len']}, LoRA r="
          f"{recipe['lora']['r']} alpha={recipe['lora']['alpha']}", flush=True)
    contenders = [("tuneship", "tuneship", recipe), ("baseline", "baseline", recipe)]
    if args.unpacked_too:  # Tuneship's loop alone, without its packing (not part of the ratio)
        contenders.append(("tuneship_unpacked", "tuneship", {**recipe, "packing": False}))
    for who, kind, rec in contenders:
        threads = args.threads
        if kind == "baseline" and threads is None and args.baseline_threads == "same":
            threads = results["tuneship"].get("torch_threads")  # 1 for the tiny model on CPU
        with tempfile.TemporaryDirectory(prefix=f"bench-trainer-{who}-") as wd:
            spec = {"recipe": rec, "data": str(data), "base": str(base), "device": device,
                    "workdir": wd, "threads": threads}
            (Path(wd) / "spec.json").write_text(json.dumps(spec))
            print(f"[trainer] {who} ...", flush=True)
            t0 = time.perf_counter()
            r = run_measured([sys.executable, "-m", "bench.trainer", "--only", kind,
                              "--spec", str(Path(wd) / "spec.json")], env=env)
            r["wall_s"] = round(time.perf_counter() - t0, 1)
        if "error" not in r:
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            r["tokens_per_step"] = r["tokens"] / r["steps"]
        results[who] = r
        print(_fmt(who, r), flush=True)

    t, b = results["tuneship"], results["baseline"]
    ok = "error" not in t and "error" not in b
    if ok:
        results["speedup"] = t["tokens_per_s"] / b["tokens_per_s"]
        results["memory_ratio"] = t["peak_rss_mb"] / b["peak_rss_mb"]
        if device == "cuda":
            results["cuda_memory_ratio"] = t["cuda_max_allocated_mb"] / b["cuda_max_allocated_mb"]
        results["goal"] = {"speedup": GOAL_SPEEDUP, "applies_to": "cuda",
                           "met": results["speedup"] >= GOAL_SPEEDUP if device == "cuda" else None}
        goal = {None: "applies on GPU only", True: "met", False: "NOT met"}[results["goal"]["met"]]
        cuda_mem = (f", {results['cuda_memory_ratio']:.2f}x the CUDA peak"
                    if device == "cuda" else "")
        print(f"[trainer] tuneship vs transformers Trainer + peft ({device}, {model_name}): "
              f"{results['speedup']:.2f}x the tokens/s, {results['memory_ratio']:.2f}x the peak "
              f"RSS{cuda_mem}; goal (>= {GOAL_SPEEDUP}x on GPU) {goal}", flush=True)
    else:
        print("[trainer] no ratio: a contender failed (see above)", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, sort_keys=True))
    return 0 if ok else 1


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    raise SystemExit(main())
