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

from tests.tasks import triage
from tuneship import config
from tuneship.train.recipe import RecipeError, default_recipe_path, load_recipe, recipe_hash

datagen = triage()

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
    from tuneship.generate import generate

    def triage_accuracy(model, tok, rows):
        """Exact match of both parsed fields (the triage task's own parser)."""
        preds = generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=16)
        hits = sum(datagen.parse_answer(p) == datagen.parse_answer(r["completion"]) for p, r in zip(preds, rows, strict=True))
        return {"exact_match": hits / len(rows)}

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


def _resume_args(data: Path, base: Path) -> list[str]:
    return ["--recipe", str(RECIPE), "--data", str(data), "--base", str(base),
            "--set", "max_steps=48", "--set", "checkpoint_every=8", "--set", "warmup_steps=4"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """The uninterrupted run the interrupted ones must end equal to."""
    out = tmp_path_factory.mktemp("straight") / "out"
    data, base = dataset(tmp_path_factory), base_model(tmp_path_factory)
    rc, _, err = run_trainer([*_resume_args(data, base), "--output", str(out)])
    assert rc == 0, err
    return out


def _assert_same_run(straight: Path, resumed: Path) -> None:
    import torch

    a, b = _adapter_tensors(straight), _adapter_tensors(resumed)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:  # bit-exact: same RNG streams, data order, optimizer state and deterministic kernels
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max().item():.3g}"
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((resumed / "metrics.json").read_text())
    assert [h["loss"] for h in ma["history"]] == [h["loss"] for h in mb["history"]]


def _start_trainer(args: list[str]) -> subprocess.Popen:
    path = [str(config.REPO_ROOT / "include"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    return subprocess.Popen([sys.executable, "-u", "-m", "tuneship.train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, tmp_path_factory, straight_run):
    data, base = dataset(tmp_path_factory), base_model(tmp_path_factory)
    args = _resume_args(data, base)
    killed = tmp_path / "killed"
    proc = _start_trainer([*args, "--output", str(killed)])
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
    _assert_same_run(straight_run, killed)
    assert len(list((killed / "checkpoints").glob("step-*"))) <= 2  # keep_checkpoints


def test_sigterm_saves_the_step_in_flight_and_resumes_equal(tmp_path, tmp_path_factory, straight_run):
    """A deleted or preempted pod gets SIGTERM: the trainer checkpoints the step it is on
    (between scheduled checkpoints), exits 143 with a one-line reason, and resumes there."""
    data, base = dataset(tmp_path_factory), base_model(tmp_path_factory)
    args = _resume_args(data, base)
    out = tmp_path / "termed"
    proc = _start_trainer([*args, "--output", str(out)])
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("step 19/48 "):  # past checkpoint step-16, before step-24
                proc.send_signal(signal.SIGTERM)
                break
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    stopped = [ln for ln in rest.splitlines() if ln.startswith("stopping at step")]
    assert stopped, rest
    step = int(stopped[0].split()[3].split("/")[0])
    assert 19 <= step < 24  # stopped within a step or two, not at the next scheduled checkpoint
    assert f"resume from step-{step}" in stopped[0]
    assert (out / "checkpoints" / f"step-{step}" / "COMPLETE").is_file()
    assert "rerun the same command to resume" in err.strip().splitlines()[-1]
    assert not (out / "manifest.json").exists()

    rc, stdout, err = run_trainer([*args, "--output", str(out)])
    assert rc == 0, err
    assert f"resumed from {out / 'checkpoints' / f'step-{step}'} at step {step}/48" in stdout
    _assert_same_run(straight_run, out)


def test_resume_refuses_checkpoints_of_another_recipe(tmp_path, tmp_path_factory):
    data, base = dataset(tmp_path_factory), base_model(tmp_path_factory)
    args = ["--recipe", str(RECIPE), "--data", str(data), "--base", str(base),
            "--output", str(tmp_path / "o"), "--set", "checkpoint_every=2"]
    rc, _, err = run_trainer([*args, "--set", "max_steps=3"])
    assert rc == 0, err
    (tmp_path / "o" / "manifest.json").unlink()  # pretend the run never finished
    rc, _, err = run_trainer([*args, "--set", "max_steps=3", "--set", "learning_rate=0.01"])
    assert rc == 2 and "different recipe" in err


# ----------------------------------------------------------------------------- warm start


def test_warm_start_continues_from_the_adapter(tmp_path, tmp_path_factory):
    """A drift retrain starts from the champion's adapter: its first step already has the
    champion's low loss, where a fresh LoRA starts at the base model's."""
    data, base, champion = dataset(tmp_path_factory), base_model(tmp_path_factory), finetuned(tmp_path_factory)
    fresh_first = json.loads((champion / "metrics.json").read_text())["history"][0]["loss"]
    args = ["--recipe", str(RECIPE), "--data", str(data), "--base", str(base), "--set", "max_steps=2",
            "--set", "warmup_steps=0", "--set", "learning_rate=0.0001"]
    rc, out, err = run_trainer([*args, "--output", str(tmp_path / "warm"),
                                "--set", f"init_adapter={champion / 'adapter'}"])
    assert rc == 0, err
    assert "warm start" in out
    warm_first = json.loads((tmp_path / "warm" / "metrics.json").read_text())["history"][0]["loss"]
    rc, _, err = run_trainer([*args, "--output", str(tmp_path / "cold")])
    assert rc == 0, err
    cold_first = json.loads((tmp_path / "cold" / "metrics.json").read_text())["history"][0]["loss"]
    assert abs(cold_first - fresh_first) < 0.05 * fresh_first  # the same fresh start as the champion's
    assert warm_first < cold_first / 5, (warm_first, cold_first)


def test_warm_start_from_another_shape_or_no_adapter_is_refused(tmp_path, tmp_path_factory):
    data, base, champion = dataset(tmp_path_factory), base_model(tmp_path_factory), finetuned(tmp_path_factory)
    common = ["--recipe", str(RECIPE), "--data", str(data), "--base", str(base), "--output", str(tmp_path / "o")]
    rc, _, err = run_trainer([*common, "--set", "lora.r=8", "--set", f"init_adapter={champion / 'adapter'}"])
    assert rc == 2 and "'init_adapter'" in err and "lora.r 16 vs 8" in err, err
    rc, _, err = run_trainer([*common, "--set", f"init_adapter={tmp_path}"])
    assert rc == 2 and "'init_adapter'" in err and "not a LoRA adapter directory" in err, err
    assert not (tmp_path / "o" / "adapter").exists()


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


# ----------------------------------------------------------------------------- packing and loss


def _tiny(tmp_path_factory):
    import torch

    from tuneship.basemodel import load_base

    model, tok = load_base(str(base_model(tmp_path_factory)))
    torch.manual_seed(0)
    return model, tok


def test_packed_examples_do_not_attend_to_each_other(tmp_path_factory):
    """Each example's logits in a packed row equal its logits alone (positions restart, no
    attention across the boundary); packing without the position ids would leak context."""
    import torch

    from tuneship.train.trainer import collate, encode_rows, pack_examples

    model, tok = _tiny(tmp_path_factory)
    rows = datagen.examples(3, seed=11)
    examples, _ = encode_rows(rows, tok, max_seq_len=128)
    packed = pack_examples(examples, max_seq_len=1000)
    assert len(packed) == 1 and packed[0].position_ids is not None
    alone_row = pack_examples(examples[:1], max_seq_len=1000)[0]  # a shorter row: padded
    batch = collate([packed[0], alone_row], tok.pad_token_id)
    assert batch["position_ids"].shape == batch["input_ids"].shape
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         use_cache=False).logits[0]
        leaky = model(input_ids=batch["input_ids"][:1], use_cache=False).logits[0]
        start = 0
        for i, ex in enumerate(examples):
            n = len(ex.input_ids)
            alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(together[start : start + n], alone, atol=1e-4, rtol=1e-4)
            if i:  # without the position ids, later examples see the earlier ones
                assert not torch.allclose(leaky[start : start + n], alone, atol=1e-3)
            start += n
    assert batch["labels"][0].tolist() == sum((ex.labels for ex in examples), [])


@pytest.mark.parametrize("packed", [False, True])
def test_completion_only_logits_give_the_full_loss(tmp_path_factory, packed):
    """The loss from logits at labelled positions only equals the loss from every position's
    logits, and its gradient too."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from tuneship.train.trainer import _batch_loss_sum, collate, encode_rows, pack_examples

    model, tok = _tiny(tmp_path_factory)
    examples, _ = encode_rows(datagen.examples(6, seed=3), tok, max_seq_len=128)
    items = pack_examples(examples, 96) if packed else examples
    batch = collate(items[:4], tok.pad_token_id)
    emb = model.get_input_embeddings().weight

    loss, n = _batch_loss_sum(model, batch, contextlib.nullcontext)
    (grad,) = torch.autograd.grad(loss, emb)

    kw = ({"position_ids": batch["position_ids"]} if packed
          else {"attention_mask": batch["attention_mask"]})
    logits = model(input_ids=batch["input_ids"], use_cache=False, **kw).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    full = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    (full_grad,) = torch.autograd.grad(full, emb)
    assert n == int((labels != -100).sum()) > 0
    torch.testing.assert_close(loss, full, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(grad, full_grad, atol=1e-5, rtol=1e-4)



def test_batched_generation_matches_one_prompt_at_a_time(tmp_path_factory):
    """Gates decode in batches of 8 (left-padded, transformers' generate); the served model
    decodes one prompt at a time. Same rule, same answers: on prompts of mixed lengths, for the
    base model (which rambles to a newline or max_new_tokens) and the fine-tuned one."""
    from peft import PeftModel

    from tuneship.basemodel import load_base
    from tuneship.generate import generate

    rows = read_jsonl(dataset(tmp_path_factory) / "eval.jsonl")[:40]
    prompts = [r["prompt"] if i % 3 else r["prompt"].replace("Ticket: ", "Ticket: " + "please " * (i % 7))
               for i, r in enumerate(rows)]
    assert len({len(p) for p in prompts}) > 10  # left padding does real work
    base, tok = load_base(str(base_model(tmp_path_factory)))
    one = generate(base, tok, prompts, max_new_tokens=16, batch_size=1)
    seen: list[tuple[int, int]] = []
    assert generate(base, tok, prompts, max_new_tokens=16, batch_size=8,
                    progress=lambda done, total: seen.append((done, total))) == one
    assert seen == [(8 * k, 40) for k in range(1, 6)]
    tuned = PeftModel.from_pretrained(base, str(finetuned(tmp_path_factory) / "adapter"))
    one = generate(tuned, tok, prompts, max_new_tokens=16, batch_size=1)
    assert generate(tuned, tok, prompts, max_new_tokens=16, batch_size=8) == one
    assert all("\n" not in a for a in one) and sum(bool(a.strip()) for a in one) >= 35
