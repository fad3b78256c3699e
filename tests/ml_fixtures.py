"""Shared, expensive ML artefacts for the unit tests, built once per test session.

Pytest would run an imported session fixture once per importing module, so the work is cached
here at module level (and every builder is idempotent on disk anyway): the tiny base model,
the demo dataset and the demo fine-tune are made once in the session's base temp dir.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

_CACHE: dict[str, Path] = {}


def shared_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.getbasetemp() / "ml-shared"
    d.mkdir(exist_ok=True)
    return d


def build_tiny(out: Path, **kwargs) -> Path:
    """The tiny test model, pre-trained on the triage task's demo text (its task file's
    demo.pretrain_corpus and demo.vocab)."""
    from tuneship.basemodel import build_base_model
    from tuneship.tasks import load_task

    task = load_task("triage")
    return build_base_model(out, task.resolve(task.demo.pretrain_corpus), vocab_texts=task.demo.vocab, **kwargs)


def base_model(tmp_path_factory) -> Path:
    """The tiny test base model (default spec), built once."""
    if "base" not in _CACHE:
        _CACHE["base"] = build_tiny(shared_dir(tmp_path_factory) / "tiny-llama", seed=0)
    return _CACHE["base"]


def dataset(tmp_path_factory) -> Path:
    if "data" not in _CACHE:
        from tests.tasks import triage

        write_dataset = triage().write_dataset

        out = shared_dir(tmp_path_factory) / "dataset"
        write_dataset(out, n_train=600, n_eval=120, seed=0)
        _CACHE["data"] = out
    return _CACHE["data"]


def run_trainer(argv: list[str]) -> tuple[int, str, str]:
    """Call the trainer CLI in-process (same code path as the subprocess); rc, stdout, stderr."""
    from tuneship.train.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def finetuned(tmp_path_factory) -> Path:
    """The demo fine-tune with the default recipe (tiny-lora.yaml), run once."""
    if "ft" not in _CACHE:
        from tuneship.train.recipe import default_recipe_path

        out = shared_dir(tmp_path_factory) / "ft-demo"
        rc, stdout, stderr = run_trainer([
            "--recipe", str(default_recipe_path()), "--data", str(dataset(tmp_path_factory)),
            "--base", str(base_model(tmp_path_factory)), "--output", str(out),
        ])
        assert rc == 0, f"demo fine-tune failed rc={rc}\n{stdout[-2000:]}\n{stderr[-2000:]}"
        _CACHE["ft"] = out
    return _CACHE["ft"]


def adapter_variant(adapter: Path, dest: Path, scale_b: float = 1.0, rank: int | None = None,
                    keep: tuple[str, ...] | None = None) -> Path:
    """Another peft adapter from the demo one: B scaled, or A/B cut to `rank` (alpha kept in
    proportion), or only the modules in `keep`; written with safetensors as peft saves it."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, value in tensors.items():
        if keep and not any(f".{m}." in key for m in keep):
            continue
        if rank is not None:
            value = value[:rank] if ".lora_A." in key else value[:, :rank]
        out[key] = np.ascontiguousarray(value * scale_b if ".lora_B." in key else value)
    if rank is not None:
        cfg["lora_alpha"] = cfg["lora_alpha"] * rank / cfg["r"]
        cfg["r"] = rank
    if keep:
        cfg["target_modules"] = list(keep)
    dest.mkdir(parents=True)
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(out, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dest


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
