"""Trainer: recipe validation, a real fine-tune that learns, exact resume, chat data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ml_fixtures import base_model, dataset, finetuned, read_jsonl, run_trainer

from tuneship import config, datagen
from tuneship.train.recipe import RecipeError, default_recipe_path, load_recipe, recipe_hash

RECIPE = default_recipe_path()


def _recipe_file(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(RECIPE.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


# ----------------------------------------------------------------------------- recipes


def test_default_recipe_loads_and_hash_is_canonical(tmp_path):
    r = load_recipe(RECIPE)
    assert r.version == 1 and r.lora.r > 0 and r.base_model
    reordered = tmp_path / "r.yaml"
    reordered.write_text(yaml.safe_dump(dict(reversed(list(yaml.safe_load(RECIPE.read_text()).items())))))
    assert recipe_hash(load_recipe(reordered)) == recipe_hash(r)
    assert recipe_hash(load_recipe(RECIPE, {"lora.r": 4})) != recipe_hash(r)
    assert load_recipe(RECIPE, {"lora.r": 4, "max_steps": 7}).max_steps == 7


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"lora.r": 0}, "lora.r"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr_schedule": "exponential"}, "lr_schedule"),
        ({"precision": "int3"}, "precision"),
        ({"lora.dropout": 1.5}, "lora.dropout"),
        ({"lora.target_modules": []}, "lora.target_modules"),
        ({"learning_rat": 0.1}, "learning_rat"),
        ({"lora.rank": 8}, "lora.rank"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
    ],
)
def test_invalid_values_name_the_key(overrides, key):
    with pytest.raises(RecipeError) as e:
        load_recipe(RECIPE, overrides)
    assert f"'{key}'" in str(e.value)


def test_missing_base_model_and_length_are_named(tmp_path):
    with pytest.raises(RecipeError, match="'base_model'.*missing"):
        load_recipe(_recipe_file(tmp_path, base_model=None))
    with pytest.raises(RecipeError, match="epochs or max_steps"):
        load_recipe(_recipe_file(tmp_path, epochs=None))


def test_cli_exit_2_with_one_line_message(tmp_path, tmp_path_factory):
    data, base = dataset(tmp_path_factory), base_model(tmp_path_factory)
    common = ["--data", str(data), "--base", str(base), "--output", str(tmp_path / "o")]
    rc, _, err = run_trainer(["--recipe", str(RECIPE), *common, "--set", "lora.r=0"])
    assert rc == 2 and "'lora.r'" in err and err.count("\n") == 1
    rc, _, err = run_trainer(["--recipe", str(RECIPE), *common, "--set", "qlora=true"])
    assert rc == 2 and "'qlora'" in err and "GPU" in err
    rc, _, err = run_trainer(["--recipe", str(RECIPE), *common, "--set", "bogus=1"])
    assert rc == 2 and "'bogus'" in err
    rc, _, err = run_trainer(["--recipe", str(tmp_path / "missing.yaml"), *common])
    assert rc == 2 and "missing.yaml" in err
    rc, _, err = run_trainer(["--recipe", str(RECIPE), "--data", str(tmp_path), "--base", str(base),
                              "--output", str(tmp_path / "o")])
    assert rc == 2 and "train.jsonl" in err
    rc, _, err = run_trainer(["--recipe", str(RECIPE), "--data", str(data), "--base",
                              str(tmp_path / "no-model"), "--output", str(tmp_path / "o")])
    assert rc == 2 and "'base_model'" in err
    assert not (tmp_path / "o" / "adapter").exists()


# ----------------------------------------------------------------------------- the demo fine-tune


def test_demo_finetune_beats_base_on_eval(tmp_path_factory):
    from peft import PeftModel

    from tuneship.basemodel import load_base
    from tuneship.generate import triage_accuracy

    out = finetuned(tmp_path_factory)
    rows = read_jsonl(dataset(tmp_path_factory) / "eval.jsonl")
    base, tok = load_base(str(base_model(tmp_path_factory)))
    base_acc = triage_accuracy(base, tok, rows)
    tuned = PeftModel.from_pretrained(base, str(out / "adapter"))
    tuned_acc = triage_accuracy(tuned, tok, rows)
    print(f"eval exact match: base {base_acc['exact_match']:.3f} -> tuned {tuned_acc['exact_match']:.3f}")
    assert base_acc["exact_match"] <= 0.2
    assert tuned_acc["exact_match"] >= 0.85
    assert tuned_acc["exact_match"] >= base_acc["exact_match"] + 0.5


def test_demo_finetune_outputs_contract(tmp_path_factory):
    out = finetuned(tmp_path_factory)
    assert {p.name for p in (out / "adapter").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    assert not any(p.name == "model.safetensors" for p in out.rglob("*")), "only the delta is written"
    metrics = json.loads((out / "metrics.json").read_text())
    for k in ("train_loss", "eval_loss", "steps", "tokens_per_s", "wall_s", "history"):
        assert k in metrics, k
    hist = metrics["history"]
    assert len(hist) == metrics["steps"] and {"step", "loss", "lr"} <= hist[0].keys()
    assert hist[-1]["loss"] < hist[0]["loss"] / 5
    assert metrics["eval_loss"] < 0.5
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    ref = json.loads((out / "tokenizer_ref.json").read_text())
    assert ref["base_weights_sha256"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe_hash"] == recipe_hash(load_recipe(RECIPE, {"base_model": ref["base_model"]}))
    from tuneship.basemodel import sha256_file

    assert set(manifest["files"]) >= {"adapter/adapter_model.safetensors", "metrics.json",
                                      "loss_curve.png", "tokenizer_ref.json"}
    for rel, sha in manifest["files"].items():
        assert sha256_file(out / rel) == sha, rel


def test_rerun_of_finished_output_is_a_no_op(tmp_path_factory):
    out = finetuned(tmp_path_factory)
    before = (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    rc, stdout, _ = run_trainer(["--recipe", str(RECIPE), "--data", str(dataset(tmp_path_factory)),
                                 "--base", str(base_model(tmp_path_factory)), "--output", str(out)])
    assert rc == 0 and "already complete" in stdout
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == before


# ----------------------------------------------------------------------------- resume


def _adapter_tensors(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, tmp_path_factory):
    import torch

    data, base = dataset(tmp_path_factory), base_model(tmp_path_factory)
    args = ["--recipe", str(RECIPE), "--data", str(data), "--base", str(base),
            "--set", "max_steps=48", "--set", "checkpoint_every=8", "--set", "warmup_steps=4"]
    rc, _, err = run_trainer([*args, "--output", str(tmp_path / "straight")])
    assert rc == 0, err

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(config.REPO_ROOT / "include")}
    proc = subprocess.Popen([sys.executable, "-u", "-m", "tuneship.train", *args, "--output", str(killed)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    seen = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append(line)
            if line.startswith("checkpoint step-16"):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert not (killed / "adapter").exists(), "the run must have died before finishing"
    assert (killed / "checkpoints" / "step-16" / "COMPLETE").is_file()

    rc, stdout, err = run_trainer([*args, "--output", str(killed)])
    assert rc == 0, err
    resumed_from = [ln for ln in stdout.splitlines() if ln.startswith("resumed from")]
    assert resumed_from and ("step-16" in resumed_from[0] or "step-24" in resumed_from[0])

    a, b = _adapter_tensors(tmp_path / "straight"), _adapter_tensors(killed)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    ma = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    mb = json.loads((killed / "metrics.json").read_text())
    assert [h["loss"] for h in ma["history"]] == pytest.approx([h["loss"] for h in mb["history"]], abs=1e-5)
    assert len(list((killed / "checkpoints").glob("step-*"))) <= 2  # keep_checkpoints


def test_resume_refuses_checkpoints_of_another_recipe(tmp_path, tmp_path_factory):
    data, base = dataset(tmp_path_factory), base_model(tmp_path_factory)
    args = ["--recipe", str(RECIPE), "--data", str(data), "--base", str(base),
            "--output", str(tmp_path / "o"), "--set", "checkpoint_every=2"]
    rc, _, err = run_trainer([*args, "--set", "max_steps=3"])
    assert rc == 0, err
    (tmp_path / "o" / "manifest.json").unlink()  # pretend the run never finished
    rc, _, err = run_trainer([*args, "--set", "max_steps=3", "--set", "learning_rate=0.01"])
    assert rc == 2 and "different recipe" in err


# ----------------------------------------------------------------------------- data shapes


def test_chat_shaped_data_trains_with_packing(tmp_path, tmp_path_factory):
    data = tmp_path / "chat"
    datagen.write_dataset(data, n_train=120, n_eval=20, seed=5, chat=True)
    assert "messages" in read_jsonl(data / "train.jsonl")[0]
    out = tmp_path / "out"
    rc, stdout, err = run_trainer([
        "--recipe", str(RECIPE), "--data", str(data), "--base", str(base_model(tmp_path_factory)),
        "--output", str(out), "--set", "max_steps=25", "--set", "packing=true",
        "--set", "grad_accum=2", "--set", "lr_schedule=linear", "--set", "batch_size=4",
    ])
    assert rc == 0, err
    assert any(line.startswith("step 25/25 loss ") and " tok/s " in line and " eta " in line
               for line in stdout.splitlines())
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 25 and m["eval_examples"] == 20
    first, last = m["history"][0]["loss"], m["history"][-1]["loss"]
    assert last < first / 3, (first, last)
    assert m["history"][-1]["lr"] < m["history"][5]["lr"]  # linear decay
