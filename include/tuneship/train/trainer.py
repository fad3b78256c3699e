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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneship.train.recipe import Recipe, RecipeError, recipe_hash

CHECKPOINT_DONE = "COMPLETE"
RESUME_ATOL = 1e-6  # resumed vs uninterrupted adapter tensors (same machine, same threads)

# Set by the CLI's SIGTERM handler (tuneship.train.__main__): the loop checkpoints after the
# step in flight and raises Stopped, so a deleted or preempted pod keeps its work.
STOP = threading.Event()


class DataError(ValueError):
    """Missing or malformed dataset files; the message names the file and line."""


class Stopped(RuntimeError):
    """Training stopped early on request (SIGTERM) after saving a checkpoint."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"stopped at step {step}/{total} on SIGTERM; rerun the same command to resume")
        self.step, self.total = step, total


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    # Set on packed rows: positions restart at 0 for each example, which is how the model
    # knows where one example ends (see collate and _batch_loss_sum).
    position_ids: list[int] | None = None


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
    """Greedy packing into rows of up to max_seq_len tokens, each example kept separate.

    Labels stay per example, and position ids restart at 0 at every example boundary. The
    model is then called with those position ids and no 2D attention mask, so transformers
    builds a block-diagonal causal mask from them (`find_packed_sequence_indices`): a token
    attends only to earlier tokens of its own example, and rotary positions are the same as
    if the example were alone in the row. Tested: a packed example's logits equal its
    logits alone (tests/unit/test_train.py::test_packed_examples_do_not_attend_to_each_other).
    """
    packed: list[Example] = []
    cur = Example([], [], [])
    for ex in examples:
        if cur.input_ids and len(cur.input_ids) + len(ex.input_ids) > max_seq_len:
            packed.append(cur)
            cur = Example([], [], [])
        cur.input_ids.extend(ex.input_ids)
        cur.labels.extend(ex.labels)
        cur.position_ids.extend(range(len(ex.input_ids)))  # type: ignore[union-attr]
    if cur.input_ids:
        packed.append(cur)
    return packed


def collate(batch: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors. Packed rows also get `position_ids`; their padding counts from 0
    again, so it is a separate block that no real token attends to."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids, labels, mask, pos = [], [], [], []
    for e in batch:
        pad = width - len(e.input_ids)
        ids.append(e.input_ids + [pad_id] * pad)
        labels.append(e.labels + [-100] * pad)
        mask.append([1] * len(e.input_ids) + [0] * pad)
        if e.position_ids is not None:
            pos.append(e.position_ids + list(range(pad)))
    out = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
    }
    if pos:
        if len(pos) != len(batch):
            raise ValueError("a batch mixes packed and unpacked rows")
        out["position_ids"] = torch.tensor(pos, dtype=torch.long)
    return out


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


def check_init_adapter(recipe: Recipe) -> Path | None:
    """The warm start's adapter directory, checked before any model loads: it exists, and its
    rank, alpha and target modules are the recipe's (the weights are loaded into the LoRA
    layers the recipe builds)."""
    if not recipe.init_adapter:
        return None
    init = Path(recipe.init_adapter)
    cfg_path, weights = init / "adapter_config.json", init / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise RecipeError(f"key 'init_adapter': {init} is not a LoRA adapter directory (it needs "
                          "adapter_config.json and adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise RecipeError(f"key 'init_adapter': {cfg_path} is not valid JSON: {e}") from None
    theirs = {"lora.r": cfg.get("r"), "lora.alpha": cfg.get("lora_alpha"),
              "lora.target_modules": sorted(cfg.get("target_modules") or [])}
    ours = {"lora.r": recipe.lora.r, "lora.alpha": recipe.lora.alpha,
            "lora.target_modules": sorted(recipe.lora.target_modules)}
    differ = [f"{k} {theirs[k]} vs {ours[k]}" for k in ours if theirs[k] != ours[k]]
    if differ:
        raise RecipeError(f"key 'init_adapter': {init} was trained with a different LoRA shape "
                          f"({'; '.join(differ)} in the recipe); start from an adapter of the same "
                          "shape or leave init_adapter empty")
    return init


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


def _check_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a CUDA library it cannot load
        raise RecipeError(
            "key 'qlora': QLoRA needs bitsandbytes (pinned in serving/docker/"
            "requirements-trainer-gpu.txt, installed in the trainer image); it could not be "
            f"imported here ({type(e).__name__}: {e}); install it or set qlora: false"
        ) from None


def _half_dtype(precision: str) -> Any:
    """The torch dtype a bf16/fp16 recipe computes in; None for fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def compute_precision(precision: str, cuda: bool) -> str:
    """What a recipe's `precision` computes in on this machine. `auto` is bf16 where the
    device computes bf16 natively (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX
    tiles, where oneDNN's bf16 matmul measured 4.2x fp32's, `bench.train_precision`), else fp32
    (a CPU without them emulates bf16, slower than fp32). The others are what they say."""
    if precision != "auto":
        return precision
    import torch

    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # a torch without these probes: assume nothing
        native = False
    return "bf16" if native else "fp32"


# On the CPU, the eager attention (plain matmuls) beats SDPA's flash kernel for short rows,
# in bf16 by far (its backward is slow there): SmolLM2, batch 8, one LoRA step at 60 tokens
# 1.39 s against 1.75 s, at 128 tokens 2.51 against 2.96, at 256 even (4.97 against 4.84).
CPU_EAGER_ATTENTION_MAX_LEN = 256


def _load_for_training(recipe: Recipe, cuda: bool, precision: str) -> tuple[Any, Any]:
    """The frozen base model in the precision the recipe trains in (`precision`: the
    recipe's, resolved by `compute_precision`).

    fp32 loads fp32 weights. bf16/fp16 load the frozen base weights in that half type (half
    the memory and no per-step weight casts under autocast: on the CPU, casting fp32 weights
    at every step ate most of bf16's gain); the LoRA weights peft adds stay fp32, so the
    optimizer updates full-precision values. On the CPU, rows up to
    CPU_EAGER_ATTENTION_MAX_LEN tokens use the eager attention. QLoRA loads the base weights as
    4-bit NF4 with double quantization (bitsandbytes), computes in bf16 (fp16 if the recipe
    says fp16), and lets peft prepare the quantized model for training (norms in fp32,
    input gradients on, no gradient checkpointing).
    """
    import torch

    from tuneship.basemodel import load_base

    half = _half_dtype(precision)
    if not recipe.qlora:
        attention = {} if cuda or recipe.max_seq_len > CPU_EAGER_ATTENTION_MAX_LEN else {"attn_implementation": "eager"}
        return load_base(recipe.base_model, dtype=half, **attention)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    compute = half or torch.bfloat16
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
    )
    model, tokenizer = load_base(recipe.base_model, dtype=compute,
                                 quantization_config=quant, device_map={"": torch.cuda.current_device()})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, tokenizer


def _batch_loss_sum(model: Any, batch: dict[str, Any], autocast: Any) -> tuple[Any, int]:
    """Sum of token cross-entropies over completion tokens, and how many there were.

    Logits are computed only where a label follows (`logits_to_keep` as a boolean mask, which
    transformers applies before the LM head): prompt and padding positions never reach the
    vocabulary projection, which on a 128k-vocabulary model is a large share of the compute
    and of the activation memory. A model that ignores the mask returns every position's
    logits, and the same mask selects them here.
    """
    import torch.nn.functional as F

    device = next(model.parameters()).device  # the GPU in a GPU pod, else the CPU (a no-op)
    labels = batch["labels"]
    keep = labels.new_zeros(labels.shape, dtype=bool)
    keep[:, :-1] = labels[:, 1:] != -100  # the logit at t predicts the token at t + 1
    targets = labels[:, 1:][keep[:, :-1]]
    n = int(targets.numel())
    inputs = {"input_ids": batch["input_ids"]}
    if "position_ids" in batch:  # packed rows: the mask comes from the position ids
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    keep_dev = keep.to(device, non_blocking=True)
    with autocast():
        logits = model(**inputs, use_cache=False, logits_to_keep=keep_dev).logits
    if logits.ndim == 3:
        logits = logits[keep_dev]
    loss = F.cross_entropy(logits.float(), targets.to(device, non_blocking=True), reduction="sum")
    return loss, n


def evaluate_loss(model: Any, examples: list[Example], pad_id: int, batch_size: int,
                  autocast: Any) -> float | None:
    import torch

    if not examples:
        return None
    model.eval()
    total, count = 0.0, 0
    # No activations are kept for a backward pass here, so batches 4x the training micro-batch
    # fit where it did; rows sorted by length pad least. On the CPU: a chat demo task's 80 eval
    # rows 7.1 s at 8 a batch, 4.8 sorted at 16, 4.1 at 80 (SmolLM2, bf16).
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    batch_size *= 4
    with torch.no_grad():
        for i in range(0, len(ordered), batch_size):
            loss, n = _batch_loss_sum(model, collate(ordered[i : i + batch_size], pad_id), autocast)
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
    if recipe.qlora:
        _check_bitsandbytes()
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
    init = check_init_adapter(recipe)
    if init is not None:  # the starting weights are an input: a changed adapter is a new run
        data_files.append(init / "adapter_model.safetensors")
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

    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    # Bit-exact on the CPU (the tests compare resumed and uninterrupted adapters). On a GPU the
    # deterministic kernels (e.g. the sort-based backward of indexing) cost throughput, and a
    # resumed GPU run matches an uninterrupted one to bf16 tolerance rather than bit for bit.
    torch.use_deterministic_algorithms(not cuda, warn_only=True)

    precision = compute_precision(recipe.precision, cuda)
    model, tokenizer = _load_for_training(recipe, cuda, precision)
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
    if init is not None:
        try:
            _load_adapter_weights(model, init)
        except RuntimeError as e:  # shapes that differ although rank and targets were checked
            raise RecipeError(f"key 'init_adapter': {init} does not fit this recipe's LoRA: {e}"
                              .replace("\n", " ")[:600]) from None
        say(f"warm start: LoRA weights from {init}")
    if cuda and not recipe.qlora:  # train where the GPU is; batches follow the model
        model.to("cuda")            # (a 4-bit model was placed on the GPU when it was loaded)
    model.train()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all adapter tensors instead of a loop of small ones on the GPU
    opt = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay,
                            fused=cuda or None)

    order = DataOrder(len(items), recipe.batch_size, recipe.seed)
    steps_per_epoch = math.ceil(order.per_epoch / recipe.grad_accum)
    total = recipe.max_steps or max(1, math.ceil(recipe.epochs * steps_per_epoch))  # type: ignore[operator]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(recipe.lr_schedule, recipe.warmup_steps, total)
    )
    autocast: Callable[[], Any] = contextlib.nullcontext
    if (half := _half_dtype(precision)) is not None:
        autocast = lambda: torch.autocast("cuda" if cuda else "cpu", dtype=half)  # noqa: E731
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

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
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
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

    def checkpoint() -> Path:
        state = {
            "step": step,
            "recipe_hash": rhash,
            "data_sha256": fingerprint,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "data_position": order.position(step * recipe.grad_accum),
            "history": history,
            "tokens_seen": tokens_seen,
            "train_seconds": train_seconds + (time.perf_counter() - t_loop),
            "system": sampler.snapshot(),
        }
        return _save_checkpoint(ckpt_root, step, model, state, recipe.keep_checkpoints)

    last_saved = start_step
    try:
        while step < total:
            if STOP.is_set():  # SIGTERM (pod deleted or preempted): keep the work, then stop
                where = checkpoint().name if step > last_saved else f"step-{last_saved}"
                say(f"stopping at step {step}/{total} on SIGTERM; resume from {where}")
                raise Stopped(step, total)
            micro = [collate([items[i] for i in order.indices(step * recipe.grad_accum + k)], pad_id)
                     for k in range(recipe.grad_accum)]
            n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            loss_total = torch.zeros((), device=device)  # read once per step, not per micro-batch
            for b in micro:
                loss_sum, _ = _batch_loss_sum(model, b, autocast)
                loss = loss_sum / max(n_tokens, 1)
                scaler.scale(loss).backward()
                loss_total += loss.detach()
                tokens_seen += int(b["attention_mask"].sum())
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            lr = sched.get_last_lr()[0]
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            step_loss = float(loss_total)
            history.append({"step": step, "loss": round(step_loss, 6), "lr": lr})

            if step % log_every == 0 or step == total or step == 1:
                rate = (tokens_seen - tokens_at_loop) / max(time.perf_counter() - t_loop, 1e-9)
                per_step = (time.perf_counter() - t_loop) / max(step - start_step, 1)
                eta = per_step * (total - step)
                say(f"step {step}/{total} loss {step_loss:.4f} tok/s {rate:.0f} eta {eta:.0f}s")
            if recipe.checkpoint_every and step % recipe.checkpoint_every == 0 and step < total:
                path = checkpoint()
                last_saved = step
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
        "precision": precision,  # what `precision: auto` (or the recipe's) computed in here
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
