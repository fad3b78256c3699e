"""The LoRA training loop: one entrypoint for the local subprocess, the container and the pod.

A plain loop (not HF Trainer) so every piece that matters for reproducibility is visible:
loss only on completion tokens, token-weighted gradient accumulation, a stateless data order
(epoch permutations from the seed, so the data position is just the micro-batch counter),
and checkpoints that hold everything needed to continue bit-for-bit on the same machine:
adapter, optimizer, scheduler, RNG states and data position. Checkpoints are written to a
temp dir and renamed, so a SIGKILL never leaves a half checkpoint that resume would trust.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneship.train.recipe import Recipe, RecipeError, recipe_hash

CHECKPOINT_DONE = "COMPLETE"
RESUME_ATOL = 1e-6  # resumed vs uninterrupted adapter tensors (same machine, same threads)


class DataError(ValueError):
    """Missing or malformed dataset files; the message names the file and line."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


# ----------------------------------------------------------------------------- data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"data file {path} not found; the dataset dir needs train.jsonl/eval.jsonl")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not (
                {"prompt", "completion"} <= row.keys() or "messages" in row
            ):
                raise DataError(
                    f"{path}:{lineno}: row needs 'prompt'+'completion' or 'messages'"
                )
            rows.append(row)
    if not rows:
        raise DataError(f"data file {path} has no rows")
    return rows


def split_prompt_completion(row: dict[str, Any], tokenizer: Any) -> tuple[str, str, bool]:
    """(prompt text, completion text, prompt_has_special_tokens) for either row shape.

    Chat rows are rendered with the tokenizer's chat template; the completion is whatever the
    template adds after the generation prompt for the final assistant turn, so any template
    works without knowing its syntax.
    """
    if "messages" not in row:
        return str(row["prompt"]), str(row["completion"]), False
    messages = row["messages"]
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError("chat row must end with an assistant message (the completion to learn)")
    prompt = tokenizer.apply_chat_template(
        messages[:-1], add_generation_prompt=True, tokenize=False
    )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if full.startswith(prompt):
        completion = full[len(prompt) :]
    else:  # template re-renders history differently: fall back to the raw content
        completion = " " + str(messages[-1]["content"])
    return prompt, completion, True


def encode_rows(
    rows: list[dict[str, Any]], tokenizer: Any, max_seq_len: int, source: str = ""
) -> tuple[list[Example], int]:
    """Tokenize rows; prompt tokens get label -100. Returns (examples, n_truncated)."""
    eos = tokenizer.eos_token_id
    out: list[Example] = []
    truncated = 0
    for i, row in enumerate(rows):
        try:
            prompt, completion, templated = split_prompt_completion(row, tokenizer)
        except DataError as e:
            raise DataError(f"{source} row {i + 1}: {e}") from None
        # A rendered chat template already carries its own special tokens (e.g. <s>).
        p_ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
        if len(c_ids) >= max_seq_len:
            raise DataError(
                f"{source} row {i + 1}: completion is {len(c_ids)} tokens, max_seq_len is "
                f"{max_seq_len}; raise max_seq_len"
            )
        if len(p_ids) + len(c_ids) > max_seq_len:  # keep the answer, drop the oldest prompt
            truncated += 1
            p_ids = p_ids[len(p_ids) + len(c_ids) - max_seq_len :]
        out.append(Example(p_ids + c_ids, [-100] * len(p_ids) + c_ids))
    return out, truncated


def pack_examples(examples: list[Example], max_seq_len: int) -> list[Example]:
    """Greedy packing into rows of up to max_seq_len tokens (labels stay per example)."""
    packed: list[Example] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    for ex in examples:
        if cur_ids and len(cur_ids) + len(ex.input_ids) > max_seq_len:
            packed.append(Example(cur_ids, cur_labels))
            cur_ids, cur_labels = [], []
        cur_ids = cur_ids + ex.input_ids
        cur_labels = cur_labels + ex.labels
    if cur_ids:
        packed.append(Example(cur_ids, cur_labels))
    return packed


def collate(batch: list[Example], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class DataOrder:
    """Micro-batch m of the run, derived from (seed, m) alone: resume needs only m."""

    def __init__(self, n_items: int, batch_size: int, seed: int) -> None:
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.per_epoch = math.ceil(n_items / batch_size)
        self._cache: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        import torch

        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n_items, generator=g).tolist()}
        return self._cache[epoch]

    def position(self, m: int) -> dict[str, int]:
        return {"micro_batch": m, "epoch": m // self.per_epoch, "offset": m % self.per_epoch}

    def indices(self, m: int) -> list[int]:
        pos = self.position(m)
        start = pos["offset"] * self.batch_size
        return self._perm(pos["epoch"])[start : start + self.batch_size]


# ----------------------------------------------------------------------------- schedule


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


# ----------------------------------------------------------------------------- checkpoints


def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints, oldest first (a dir without the COMPLETE marker is ignored)."""
    found = []
    if ckpt_root.is_dir():
        for d in ckpt_root.iterdir():
            if d.name.startswith("step-") and (d / CHECKPOINT_DONE).is_file():
                try:
                    found.append((int(d.name[5:]), d))
                except ValueError:
                    continue
    return sorted(found)


def _save_checkpoint(
    ckpt_root: Path, step: int, model: Any, state: dict[str, Any], keep: int
) -> Path:
    import torch

    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=ckpt_root))
    model.save_pretrained(tmp / "adapter", safe_serialization=True)
    torch.save(state, tmp / "state.pt")
    (tmp / CHECKPOINT_DONE).write_text(str(step))
    final = ckpt_root / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in complete_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-step-*"):  # leftovers of killed writers
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _load_adapter_weights(model: Any, adapter_dir: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(adapter_dir / "adapter_model.safetensors"))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"checkpoint {adapter_dir} has unexpected adapter keys {unexpected[:3]}")


# ----------------------------------------------------------------------------- outputs


def _sha256(path: Path) -> str:
    from tuneship.basemodel import sha256_file

    return sha256_file(path)


def _write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def plot_loss_curve(history: list[dict[str, float]], eval_loss: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
    if eval_loss is not None and history:
        ax.axhline(eval_loss, color="tab:orange", linestyle="--", label=f"eval loss {eval_loss:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _data_fingerprint(paths: list[Path]) -> dict[str, str]:
    return {p.name: _sha256(p) for p in paths if p.is_file()}


# ----------------------------------------------------------------------------- the loop


def _set_threads(model: Any) -> None:
    """TUNESHIP_TORCH_THREADS if set; else 1 thread for tiny models, where more threads only
    add synchronisation (measured: 1 thread beats 2 on the demo model), torch's default otherwise.
    The count is part of bit-exact resume: resume on the same machine with the same setting."""
    import torch

    env = os.environ.get("TUNESHIP_TORCH_THREADS")
    if env:
        torch.set_num_threads(int(env))
    elif sum(p.numel() for p in model.parameters()) < 10_000_000:
        torch.set_num_threads(1)


def _batch_loss_sum(model: Any, batch: dict[str, Any], autocast: Any) -> tuple[Any, int]:
    """Sum of token cross-entropies over completion tokens, and how many there were."""
    import torch.nn.functional as F

    device = next(model.parameters()).device  # the GPU in a GPU pod, else the CPU (a no-op)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    n = int((labels != -100).sum())
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, n


def evaluate_loss(model: Any, examples: list[Example], pad_id: int, batch_size: int,
                  autocast: Any) -> float | None:
    import torch

    if not examples:
        return None
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            loss, n = _batch_loss_sum(model, collate(examples[i : i + batch_size], pad_id), autocast)
            total += float(loss)
            count += n
    model.train()
    return total / max(count, 1)


def train(
    recipe: Recipe,
    data_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune a LoRA adapter per `recipe`; resumes from OUT/checkpoints; returns metrics.

    Raises RecipeError / DataError for problems the caller should report as exit 2.
    """
    import contextlib

    import torch

    def say(msg: str) -> None:
        (log or (lambda m: print(m, flush=True)))(msg)

    data = Path(data_dir)
    out = Path(output_dir)
    rhash = recipe_hash(recipe)

    # --- validate everything cheap before loading a model
    cuda = torch.cuda.is_available()
    if recipe.qlora and not cuda:
        raise RecipeError(
            "key 'qlora': QLoRA (4-bit base weights via bitsandbytes) needs a CUDA GPU; "
            "this machine has none, set qlora: false"
        )
    if recipe.precision == "fp16" and not cuda:
        raise RecipeError("key 'precision': fp16 training needs a CUDA GPU; use fp32 or bf16 on CPU")
    if recipe.qlora:  # pragma: no cover - GPU only
        raise RecipeError(
            "key 'qlora': QLoRA is not wired in this trainer build yet; use the GPU image's trainer"
        )
    from tuneship.basemodel import resolve_base_ref

    try:
        resolve_base_ref(recipe.base_model)
    except FileNotFoundError as e:
        raise RecipeError(f"key 'base_model': {e}") from None
    train_path = data / "train.jsonl"
    train_rows = read_jsonl(train_path)
    eval_rows: list[dict[str, Any]] = []
    data_files = [train_path]
    if recipe.eval_file and (data / recipe.eval_file).is_file():
        eval_rows = read_jsonl(data / recipe.eval_file)
        data_files.append(data / recipe.eval_file)
    elif recipe.eval_fraction > 0:
        rng = random.Random(recipe.seed)
        idx = list(range(len(train_rows)))
        rng.shuffle(idx)
        n_eval = max(1, int(len(idx) * recipe.eval_fraction))
        held = set(idx[:n_eval])
        eval_rows = [r for i, r in enumerate(train_rows) if i in held]
        train_rows = [r for i, r in enumerate(train_rows) if i not in held]
    elif recipe.eval_file:
        raise DataError(
            f"eval file {data / recipe.eval_file} not found (key 'eval_file'); add it to the "
            "dataset or set eval_fraction > 0"
        )
    fingerprint = _data_fingerprint(data_files)

    # --- idempotency: a finished run with the same recipe and data is not redone
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        try:
            done = json.loads(manifest_path.read_text())
        except ValueError:
            done = {}
        if done.get("recipe_hash") == rhash and done.get("data_sha256") == fingerprint:
            say(f"already complete: {out} (recipe {rhash[:12]}), nothing to do")
            return json.loads((out / "metrics.json").read_text())
        if done:
            raise RecipeError(
                f"output {out} already holds a finished run of a different recipe or data; "
                "use a new --output directory"
            )

    from peft import LoraConfig, get_peft_model

    from tuneship.basemodel import load_base

    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    model, tokenizer = load_base(recipe.base_model)
    _set_threads(model)
    pad_id = tokenizer.pad_token_id
    train_ex, trunc = encode_rows(train_rows, tokenizer, recipe.max_seq_len, str(train_path))
    eval_ex, _ = encode_rows(eval_rows, tokenizer, recipe.max_seq_len, "eval")
    if trunc:
        say(f"warning: {trunc} training rows longer than max_seq_len had their prompt cut")
    items = pack_examples(train_ex, recipe.max_seq_len) if recipe.packing else train_ex

    torch.manual_seed(recipe.seed)  # LoRA A init draws from the global RNG
    lcfg = LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=recipe.lora.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    try:
        model = get_peft_model(model, lcfg)
    except ValueError as e:
        raise RecipeError(f"key 'lora.target_modules': {e}".replace("\n", " ")) from None
    if cuda:  # train where the GPU is; batches follow the model (_batch_loss_sum)
        model.to("cuda")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)

    order = DataOrder(len(items), recipe.batch_size, recipe.seed)
    steps_per_epoch = math.ceil(order.per_epoch / recipe.grad_accum)
    total = recipe.max_steps or max(1, math.ceil(recipe.epochs * steps_per_epoch))  # type: ignore[operator]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(recipe.lr_schedule, recipe.warmup_steps, total)
    )
    autocast: Callable[[], Any]
    if recipe.precision == "bf16":
        autocast = lambda: torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext

    # --- resume
    step, history, tokens_seen, train_seconds = 0, [], 0, 0.0
    system_before: list[dict[str, Any]] = []  # system-metric samples of an interrupted attempt
    ckpt_root = out / "checkpoints"
    ckpts = complete_checkpoints(ckpt_root)
    if ckpts:
        n, cdir = ckpts[-1]
        state = torch.load(cdir / "state.pt", weights_only=False)
        if state["recipe_hash"] != rhash or state.get("data_sha256") != fingerprint:
            raise RecipeError(
                f"checkpoint {cdir} was written by a different recipe or dataset; "
                f"use a new --output or delete {ckpt_root}"
            )
        _load_adapter_weights(model, cdir / "adapter")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        step, history = state["step"], state["history"]
        tokens_seen, train_seconds = state["tokens_seen"], state["train_seconds"]
        system_before = state.get("system", [])
        say(f"resumed from {cdir} at step {step}/{total}")

    log_every = max(1, total // 40)
    start_step = step
    t_loop = time.perf_counter()
    tokens_at_loop = tokens_seen
    from tuneship.train.sysmetrics import SystemSampler

    sampler = SystemSampler(step=lambda: step, samples=system_before).start()
    try:
        while step < total:
            micro = [collate([items[i] for i in order.indices(step * recipe.grad_accum + k)], pad_id)
                     for k in range(recipe.grad_accum)]
            n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            loss_total = 0.0
            for b in micro:
                loss_sum, _ = _batch_loss_sum(model, b, autocast)
                loss = loss_sum / max(n_tokens, 1)
                loss.backward()
                loss_total += float(loss.detach())
                tokens_seen += int(b["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            history.append({"step": step, "loss": round(loss_total, 6), "lr": lr})

            elapsed = train_seconds + (time.perf_counter() - t_loop)
            if step % log_every == 0 or step == total or step == 1:
                rate = (tokens_seen - tokens_at_loop) / max(time.perf_counter() - t_loop, 1e-9)
                per_step = (time.perf_counter() - t_loop) / max(step - start_step, 1)
                eta = per_step * (total - step)
                say(f"step {step}/{total} loss {loss_total:.4f} tok/s {rate:.0f} eta {eta:.0f}s")
            if recipe.checkpoint_every and step % recipe.checkpoint_every == 0 and step < total:
                state = {
                    "step": step,
                    "recipe_hash": rhash,
                    "data_sha256": fingerprint,
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                    "data_position": order.position(step * recipe.grad_accum),
                    "history": history,
                    "tokens_seen": tokens_seen,
                    "train_seconds": elapsed,
                    "system": sampler.snapshot(),
                }
                path = _save_checkpoint(ckpt_root, step, model, state, recipe.keep_checkpoints)
                say(f"checkpoint {path.name} saved")
    finally:
        system = sampler.stop()
    train_seconds += time.perf_counter() - t_loop

    # --- outputs (the delta only), manifest last: its presence means "complete"
    eval_loss = evaluate_loss(model, eval_ex, pad_id, recipe.batch_size, autocast)
    out.mkdir(parents=True, exist_ok=True)
    adapter_tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out))
    model.save_pretrained(adapter_tmp, safe_serialization=True)
    if (out / "adapter").exists():
        shutil.rmtree(out / "adapter")
    os.replace(adapter_tmp, out / "adapter")

    resolved, local = resolve_base_ref(recipe.base_model)
    base_manifest = Path(resolved) / "base_model.json" if local else None
    _write_json_atomic(out / "tokenizer_ref.json", {
        "base_model": recipe.base_model,
        "resolved": resolved,
        "local": local,
        "base_weights_sha256": (
            json.loads(base_manifest.read_text()).get("weights_sha256")
            if base_manifest and base_manifest.is_file() else None
        ),
        "tokenizer": "base",  # the adapter does not change the tokenizer
    })
    tail = history[-max(1, min(20, len(history))):]
    metrics = {
        "train_loss": round(sum(h["loss"] for h in tail) / len(tail), 6),
        "eval_loss": None if eval_loss is None else round(eval_loss, 6),
        "steps": step,
        "epochs": round(step * recipe.grad_accum / order.per_epoch, 3),
        "train_examples": len(train_ex),
        "eval_examples": len(eval_ex),
        "tokens_seen": tokens_seen,
        "tokens_per_s": round(tokens_seen / max(train_seconds, 1e-9), 1),
        "wall_s": round(time.perf_counter() - t_start, 2),
        "train_s": round(train_seconds, 2),
        "history": history,
        "system": system,  # CPU/memory/GPU samples by step, see tuneship.train.sysmetrics
    }
    _write_json_atomic(out / "metrics.json", metrics)
    plot_loss_curve(history, eval_loss, out / "loss_curve.png")
    files = sorted(
        p for p in out.rglob("*")
        if p.is_file() and "checkpoints" not in p.relative_to(out).parts and p.name != "manifest.json"
    )
    _write_json_atomic(manifest_path, {
        "recipe_hash": rhash,
        "recipe": recipe.model_dump(mode="json"),
        "data_sha256": fingerprint,
        "files": {str(p.relative_to(out)): _sha256(p) for p in files},
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    })
    say(f"done: {step} steps, train loss {metrics['train_loss']:.4f}, eval loss "
        f"{metrics['eval_loss']}, {metrics['wall_s']}s -> {out}")
    return metrics
