"""Compile a fine-tuned model for Triton: merge the adapter, build an ONNX Runtime GenAI model, prove parity.

Embedded default: the merged model saved as an HF directory and turned by ONNX Runtime
GenAI's model builder (`onnxruntime_genai.models.builder`, CPU, at the task's precision)
into an ONNX decoder with a KV cache (GroupQueryAttention), served by the Python backend
through ONNX Runtime GenAI. On GPUs: TensorRT-LLM's LLM API, rendered and checked by
contract in `tuneship.trtllm`. Nothing reaches Triton unless the compiled model is faithful:
an fp32 build must match eager PyTorch (prompt logits within a tolerance AND identical greedy
completions through the exact class Triton will run); a quantized one must pass the task's
gates against the unquantized candidate (`quality_gate`). The model directory is assembled
in a temp dir and renamed into place, so Triton never loads a half-written version.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tuneship import atomic, config
from tuneship.basemodel import sha256_file
from tuneship.generate import prompt_ids

TRITON_TEMPLATE_DIR = config.REPO_ROOT / "serving" / "triton" / "llm"
# Parity of prompt logits, numpy.allclose's rule: |served - eager| <= atol + rtol * |eager| at
# every position. fp32 rounding through 30 layers grows with the logits' size: a sharply
# fine-tuned model (larger logits) differs by more in absolute terms than its base model.
LOGIT_TOLERANCE = 1e-3  # atol
LOGIT_RTOL = 1e-4
# Used when a caller gives no parity prompts of its own (a task gives its smoke prompts).
GENERIC_PARITY_PROMPTS = [
    "Hello",
    "The weather today is",
    "Question: what is two plus two?\nAnswer:",
]
# What ONNX Runtime GenAI's builder writes that the served model needs (its copies of the
# tokenizer files are replaced by the HF tokenizer's own tokenizer.json, see model.py).
BUILD_FILES = ("model.onnx", "model.onnx.data", "genai_config.json")
BUILD_PROVIDER = "cpu"
# fp32 is held to eager PyTorch token for token; int8 and int4 (the builder's weight-only
# MatMulNBits quantization, round-to-nearest in blocks) cannot be, and are held to the task's
# own gates against the unquantized candidate instead (`tuneship.stages.quantization_gate`).
PRECISIONS = ("fp32", "int8", "int4")
# The CPU GroupQueryAttention kernel the builder emits for fp32 rejects other head sizes.
HEAD_SIZE_MULTIPLE = 16


class ParityError(RuntimeError):
    """The compiled model does not reproduce eager PyTorch; it must not be deployed."""


@functools.cache
def load_triton_model_module() -> Any:
    """Import serving/triton/llm/model.py (not part of the package: it ships to Triton), once
    per process."""
    path = TRITON_TEMPLATE_DIR / "model.py"
    spec = importlib.util.spec_from_file_location("tuneship_triton_llm_model", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the Triton model from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def merged_model(base_ref: str, adapter_dir: str | os.PathLike[str] | None) -> tuple[Any, Any]:
    """(base + adapter merged into plain weights, tokenizer); the deployable model."""
    from tuneship.basemodel import load_base

    model, tokenizer = load_base(base_ref)
    if adapter_dir is not None:
        from peft import PeftModel

        adapter = Path(adapter_dir)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter} has no adapter_config.json; pass OUT_DIR/adapter")
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    return model, tokenizer


def _head_size(model_config: Any) -> int:
    head = getattr(model_config, "head_dim", None)
    return int(head) if head else int(model_config.hidden_size) // int(model_config.num_attention_heads)


def builder_command(hf_dir: Path, out_dir: Path, cache_dir: Path, precision: str = "fp32",
                    block_size: int | None = None, accuracy_level: int | None = None,
                    extra_options: dict[str, Any] | None = None) -> list[str]:
    """ONNX Runtime GenAI's model builder for a CPU model at `precision`; int8/int4 with their
    weight-only quantization's block size and accuracy level (the builder's defaults: 32 and
    4, int8 activations); `extra_options`: any other of the builder's (adapter_path: LoRA slots)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
           "-p", precision, "-e", BUILD_PROVIDER, "-c", str(cache_dir)]
    options = {k: v for k, v in (("block_size", block_size), ("accuracy_level", accuracy_level))
               if v is not None and precision != "fp32"} | dict(extra_options or {})
    return cmd + (["--extra_options", *(f"{k}={v}" for k, v in options.items())] if options else [])


def build_genai_model(model: Any, tokenizer: Any, out_dir: Path, work_dir: Path, precision: str = "fp32",
                      block_size: int | None = None, accuracy_level: int | None = None,
                      extra_options: dict[str, Any] | None = None) -> float:
    """Save the merged model as an HF directory under work_dir and run ONNX Runtime GenAI's
    model builder on it (CPU, `precision`) into out_dir; returns the seconds the build took.

    The builder runs as a subprocess: it puts its own modules on sys.path and loads the
    weights again, neither of which belongs in the calling process."""
    head = _head_size(model.config)
    if head % HEAD_SIZE_MULTIPLE:
        raise ValueError(
            f"ONNX Runtime GenAI's CPU attention (GroupQueryAttention) needs a head size that is a "
            f"multiple of {HEAD_SIZE_MULTIPLE}; this model has {head} (hidden_size "
            f"{model.config.hidden_size} / {model.config.num_attention_heads} heads). Pick "
            "num_attention_heads (or head_dim) so the head size is a multiple of 16."
        )
    hf_dir = work_dir / "hf"
    cmd = builder_command(hf_dir, out_dir, work_dir / "cache", precision, block_size, accuracy_level, extra_options)
    model.save_pretrained(str(hf_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(hf_dir))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work_dir)
    seconds = time.perf_counter() - t0
    missing = [f for f in BUILD_FILES if not (out_dir / f).is_file()]
    if proc.returncode != 0 or missing:
        tail = (proc.stderr or proc.stdout or "").strip()[-4000:]
        raise RuntimeError(
            f"ONNX Runtime GenAI model builder failed (exit {proc.returncode}"
            f"{', missing ' + ', '.join(missing) if missing else ''}): {' '.join(cmd)}\n{tail}"
        )
    return seconds


def model_sha256(version_dir: Path) -> str:
    """One digest for the served model: graph and external weights (a fine-tune changes only
    the weights, so the graph's digest alone would not tell two versions apart)."""
    import hashlib

    lines = "".join(f"{name} {sha256_file(version_dir / name)}\n" for name in BUILD_FILES)
    return hashlib.sha256(lines.encode()).hexdigest()


def generation_config(tokenizer: Any, model_config: Any, max_new_tokens: int) -> dict[str, Any]:
    """generation.json: what the served model (model.py) and the gateway read besides the graph."""
    return {
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "max_new_tokens": max_new_tokens,
        "max_tokens_limit": 256,
        "max_context": int(getattr(model_config, "max_position_embeddings", 4096)),
        "stop": ["eos", "newline"],
        "decoding": "greedy",
        # what the gateway needs to render a chat request as training rendered it
        "chat_template": getattr(tokenizer, "chat_template", None),
        # the BOS the model's tokenizer adds itself ("" when it adds none): the gateway strips
        # it from a rendered chat prompt so it is not there twice
        "bos_token": tokenizer.bos_token if _adds_bos(tokenizer) else "",
    }


def _adds_bos(tokenizer: Any) -> bool:
    return bool(tokenizer.bos_token) and \
        tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]


def served_text(tokenizer: Any, prompt: Any) -> str:
    """What the Triton model receives for a prompt: the text as is, or the chat template's
    rendering less the BOS the model's tokenizer adds itself (as the gateway sends it)."""
    from tuneship.generate import render_prompt

    text, add_special = render_prompt(tokenizer, prompt)
    bos = tokenizer.bos_token
    if not add_special and _adds_bos(tokenizer) and text.startswith(bos):
        text = text[len(bos):]
    return text


def served_answers(version_dir: Path, tokenizer: Any, threads: int | None = None) -> Any:
    """`(prompts, max_new) -> answers` from the built model through the class Triton runs,
    each prompt rendered as the gateway sends it (`served_text`): how a quantized build, which
    cannot match eager token for token, is scored on the task's suites."""
    generator = load_triton_model_module().GenaiGreedyGenerator(str(version_dir),
                                                                threads=threads or os.cpu_count() or 1)

    def answers(prompts: list[Any], max_new: int) -> list[str]:
        return [generator.generate(served_text(tokenizer, p), max_new)[0] for p in prompts]

    return answers


def check_parity(
    model: Any, tokenizer: Any, version_dir: Path, prompts: list[Any] | None = None,
    tolerance: float = LOGIT_TOLERANCE, max_new_tokens: int = 16, rtol: float = LOGIT_RTOL,
    tokens: bool = True,
) -> dict[str, Any]:
    """Compare the built model, through the class Triton runs, with eager PyTorch: the served
    tokenizer's ids, the prompt pass's logits (every position) and greedy completions. Raises
    ParityError. `tokens=False` (a quantized build): the tokenizer only; its answers are held
    to the task's gates instead."""
    import numpy as np
    import torch

    from tuneship.generate import generate_ids

    prompts = [*(prompts or []), *GENERIC_PARITY_PROMPTS]
    generator = load_triton_model_module().GenaiGreedyGenerator(str(version_dir))
    max_diff = excess = max_logit = 0.0
    for p in prompts:
        ids = prompt_ids(tokenizer, p)
        served_ids = generator.encode(served_text(tokenizer, p))
        if served_ids != ids:
            raise ParityError(f"the served tokenizer encodes {p!r} as {served_ids}, eager as {ids}")
        if not tokens:
            continue
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False).logits[0].numpy()
        got = generator.prompt_logits(ids)
        if got.shape != ref.shape:
            raise ParityError(f"ONNX Runtime GenAI logits shape {got.shape} != PyTorch {ref.shape} for {p!r}")
        diff = np.abs(got - ref)
        max_diff = max(max_diff, float(diff.max()))
        max_logit = max(max_logit, float(np.abs(ref).max()))
        excess = max(excess, float((diff - rtol * np.abs(ref)).max()))
    if not tokens:
        return {"prompts": len(prompts), "tokenizer_equal": True, "generation_equal": None,
                "held_to": "the task's gates against the unquantized candidate"}
    if excess > tolerance:
        raise ParityError(
            f"ONNX Runtime GenAI logits differ from PyTorch by {max_diff:.3g} (beyond tolerance {tolerance} + "
            f"{rtol} x |logit|, logits up to {max_logit:.3g}); the build is not faithful, do not deploy it"
        )
    mismatches = []
    for p in prompts:
        # eager with its KV cache, as evaluation decodes: the same rule the served model follows
        eager = generate_ids(model, tokenizer, p, max_new_tokens, kv_cache=True)
        served = generator.generate(served_text(tokenizer, p), max_new_tokens)
        if eager != served:
            mismatches.append({"prompt": p, "pytorch": eager, "triton_model": served})
    if mismatches:
        raise ParityError(f"greedy completions differ between PyTorch and the Triton model: {mismatches}")
    return {
        "max_abs_logit_diff": max_diff,
        "max_abs_logit": max_logit,
        "tolerance": tolerance,
        "rtol": rtol,
        "prompts": len(prompts),
        "generation_equal": True,
    }


def render_config(model_name: str, version: int, deployment: dict[str, Any],
                  instance_count: int = 1) -> str:
    template = string.Template((TRITON_TEMPLATE_DIR / "config.pbtxt.tmpl").read_text())
    escaped = json.dumps(json.dumps(deployment, sort_keys=True, default=str))[1:-1]
    return template.substitute(
        name=model_name, version=version, instance_count=instance_count, deployment_json=escaped
    )


def publish_model_dir(stage: Path, final: Path, model_name: str, version: int, deployment: dict[str, Any],
                      instances: int) -> None:
    """Finish a staged Triton model directory (`stage/<version>/` holding the model files):
    its deployment.json and config.pbtxt, then swap it into place as `final`."""
    (stage / str(version) / "deployment.json").write_text(json.dumps(deployment, indent=2, sort_keys=True, default=str))
    (stage / "config.pbtxt").write_text(render_config(model_name, version, deployment, instance_count=instances))
    os.chmod(stage, 0o755)
    atomic.replace_dir(stage, final)


def compile_for_triton(
    base_ref: str,
    adapter_dir: str | os.PathLike[str] | None,
    repo_dir: str | os.PathLike[str],
    model_name: str,
    *,
    version: int = 1,
    deployment: dict[str, Any] | None = None,
    max_new_tokens: int = 16,
    tolerance: float = LOGIT_TOLERANCE,
    parity_prompts: list[str] | None = None,
    instances: int = 2,
    precision: str = "fp32",
    block_size: int | None = None,
    accuracy_level: int | None = None,
    builder_options: dict[str, Any] | None = None,
    quality_gate: Any = None,
) -> dict[str, Any]:
    """Build repo_dir/model_name/{config.pbtxt, <version>/...} for Triton; returns a report.

    `parity_prompts`: text the compiled model must reproduce eager PyTorch on (the task's own
    prompts, rendered as the model sees them), besides a few generic ones.
    `instances`: Triton model instances (processes, each with the model loaded once). One
    instance runs its requests one after another; two let a second request decode while the
    first is still generating (threads inside one instance measured no gain: bench/compile.py).
    `precision`: fp32 must reproduce eager PyTorch (logits and greedy answers); int8 and int4
    (weight-only quantization, `block_size`, `accuracy_level`, any other of the builder's
    options in `builder_options`: its rounding algorithm, groups kept at int8) only its tokenizer here, their
    answers being gated against the unquantized candidate by `quality_gate(answers)` (given
    `served_answers`; it returns its report, or raises and nothing is written).

    The whole model directory is staged next to its destination and swapped in with a rename.
    Raises ParityError (nothing is written) when the compiled model is not faithful.
    """
    if version < 1:
        raise ValueError(f"version must be >= 1 (Triton numbering), got {version}")
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    if precision != "fp32" and quality_gate is None:
        raise ValueError(f"a {precision} build cannot be held to eager PyTorch token for token: give `quality_gate` "
                         "(the task's gates against the unquantized candidate)")
    deployment = dict(deployment or {})
    repo = Path(repo_dir)
    repo.mkdir(parents=True, exist_ok=True)
    final = repo / model_name
    stage = Path(tempfile.mkdtemp(prefix=f".{model_name}.staging-", dir=repo))
    work = tempfile.mkdtemp(prefix="tuneship-compile-")  # the merged HF dir, the builder's cache
    try:
        model, tokenizer = merged_model(base_ref, adapter_dir)
        vdir = stage / str(version)
        vdir.mkdir()
        built = stage / "build"
        export_s = build_genai_model(model, tokenizer, built, Path(work), precision, block_size, accuracy_level,
                                     builder_options)
        for name in BUILD_FILES:
            os.replace(built / name, vdir / name)
        shutil.rmtree(built)
        shutil.copy2(TRITON_TEMPLATE_DIR / "model.py", vdir / "model.py")
        tokenizer.backend_tokenizer.save(str(vdir / "tokenizer.json"))
        generation = generation_config(tokenizer, model.config, max_new_tokens)
        (vdir / "generation.json").write_text(json.dumps(generation, indent=2, sort_keys=True))
        parity = check_parity(model, tokenizer, vdir, prompts=parity_prompts, tolerance=tolerance,
                              max_new_tokens=max_new_tokens, tokens=precision == "fp32")
        quality = quality_gate(served_answers(vdir, tokenizer)) if precision != "fp32" else None
        onnx_sha = model_sha256(vdir)
        deployment.setdefault("onnx_sha256", onnx_sha)
        deployment.setdefault("base_model", base_ref)
        deployment.setdefault("precision", precision)
        if adapter_dir is not None and (Path(adapter_dir) / "adapter_model.safetensors").is_file():
            deployment.setdefault(
                "adapter_sha256", sha256_file(Path(adapter_dir) / "adapter_model.safetensors")
            )
        publish_model_dir(stage, final, model_name, version, deployment, instances)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "model_dir": str(final),
        "onnx_path": str(final / str(version) / "model.onnx"),
        "onnx_sha256": onnx_sha,
        "onnx_bytes": sum((final / str(version) / n).stat().st_size for n in BUILD_FILES[:2]),
        "parity": parity,
        "quality": quality,
        "export_seconds": round(export_s, 2),  # the model builder's run (incl. its start-up)
        "builder": {"tool": "onnxruntime_genai.models.builder", "precision": precision,
                    "execution_provider": BUILD_PROVIDER,
                    **({"block_size": block_size or 32, "accuracy_level": accuracy_level or 4, **(builder_options or {})}
                       if precision != "fp32" else {})},
        "version": version,
        "model_name": model_name,
    }
