"""The tiny base model: builds deterministically, is reused, loads back, generates."""

from __future__ import annotations

import json

import pytest
from ml_fixtures import base_model

from tests.ml_fixtures import build_tiny
from tuneship import basemodel
from tuneship.generate import generate

TINY = {"corpus_docs": 120, "pretrain_steps": 3, "batch_size": 4, "seq_len": 32, "vocab_size": 400}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return base_model(tmp_path_factory)


def test_build_writes_model_tokenizer_and_manifest(base_dir):
    m = json.loads((base_dir / basemodel.MANIFEST).read_text())
    assert m["architecture"] == "LlamaForCausalLM"
    assert m["weights_sha256"] == basemodel.sha256_file(base_dir / "model.safetensors")
    assert m["corpus_docs"] == basemodel.DEFAULT_SPEC["corpus_docs"]
    assert 0 < m["final_loss"] < 2.0, "pre-training should have learned the support language"
    assert m["config"]["num_hidden_layers"] == 2
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (base_dir / f).is_file(), f


def test_reuse_when_manifest_matches(base_dir):
    before = (base_dir / "model.safetensors").stat().st_mtime_ns
    said: list[str] = []
    assert build_tiny(base_dir, seed=0, log=said.append) == base_dir
    assert said == [f"base model: reusing {base_dir} (manifest matches)"], said  # nothing trained
    assert (base_dir / "model.safetensors").stat().st_mtime_ns == before


def test_build_is_deterministic_and_seed_sensitive(tmp_path):
    a = build_tiny(tmp_path / "a", seed=1, spec=TINY, log=lambda m: None)
    b = build_tiny(tmp_path / "b", seed=1, spec=TINY, log=lambda m: None)
    c = build_tiny(tmp_path / "c", seed=2, spec=TINY, log=lambda m: None)
    sha = [json.loads((d / basemodel.MANIFEST).read_text())["weights_sha256"] for d in (a, b, c)]
    assert sha[0] == sha[1] != sha[2]


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a Tuneship base model"):
        build_tiny(tmp_path / "x", spec=TINY)
    assert (tmp_path / "x" / "precious.txt").read_text() == "keep me"


def test_load_base_round_trip_generates(base_dir):
    model, tok = basemodel.load_base(str(base_dir))
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.pad_token_id == 3
    ids = tok("Ticket: my package is late\nTriage:")["input_ids"]
    assert ids[0] == tok.bos_token_id
    # label words are whole tokens, so the answer is short to learn and to emit
    assert len(tok(" category=shipping priority=high", add_special_tokens=False)["input_ids"]) == 6
    # chat-shaped data works through the tokenizer's template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<s>user: hi\nassistant:"
    outs = generate(model, tok, ["Customer: My package", "Customer: My package"], max_new_tokens=8)
    assert outs[0] == outs[1] and outs[0].strip(), "greedy decoding is deterministic and non-empty"
    # a real LM of the domain: the continuation is support language
    assert any(w in outs[0] for w in ("package", "order", "arrive", "tracking", "delivery", "with"))


def test_load_base_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="python -m tuneship.basemodel"):
        basemodel.load_base(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="Hugging Face model id"):
        basemodel.load_base("tuneship-test/does-not-exist")
