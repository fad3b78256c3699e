"""SmolLM2-135M-Instruct through the real compile path: ONNX Runtime GenAI build + parity.

The tiny test model cannot show what the real base model brings: grouped-query attention
(9 query heads over 3 key/value heads), tied embeddings at a 49k vocabulary, a chat template
whose prompt carries its own special tokens and no BOS. Marked `smollm2` (about a minute and
a half on 2 cores: conversion from the packaged GGUF, the build, parity).
"""

from __future__ import annotations

import json

import pytest

from tuneship import compile as tcompile

NAME = "smollm2-135m-instruct"
pytestmark = pytest.mark.smollm2


def test_smollm2_builds_with_gqa_and_matches_eager(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TUNESHIP_MODELS", str(tmp_path_factory.mktemp("models")))
    repo = tmp_path_factory.mktemp("repo")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    report = tcompile.compile_for_triton(NAME, None, repo, "llm", deployment={"test": "smollm2"},
                                         max_new_tokens=12, parity_prompts=[chat])
    print(f"SmolLM2: builder {report['export_seconds']}s, "
          f"max |logit diff| {report['parity']['max_abs_logit_diff']:.3g}")
    assert report["parity"]["generation_equal"] and report["parity"]["prompts"] == 4
    assert report["parity"]["max_abs_logit_diff"] <= tcompile.LOGIT_TOLERANCE
    vdir = repo / "llm" / "1"
    decoder = json.loads((vdir / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"]) == (9, 3, 64)

    gen = tcompile.load_triton_model_module().GenaiGreedyGenerator(str(vdir))
    model, tok = tcompile.merged_model(NAME, None)
    assert model.config.tie_word_embeddings
    text = tcompile.served_text(tok, chat)
    assert gen.encode(text) == tcompile.prompt_ids(tok, chat)  # chat special tokens, no BOS added
    answer, n_prompt, n_out = gen.generate(text, 12)
    assert "Paris" in answer and 0 < n_out <= 12 and n_prompt == len(tcompile.prompt_ids(tok, chat))


def test_smollm2_int8_keeps_the_tied_head_and_the_grouped_heads(tmp_path_factory, monkeypatch):
    """The builder's int8 path on SmolLM2's pitfalls: a tied embedding that is both the input
    table (a Gather) and the output head (a MatMul), and 3 key/value heads shared by 9 query
    heads. A head quantized apart from its table, or heads mis-grouped, shows in the logits:
    the int8 build's next-token choice must agree with eager's at nearly every prompt position
    and its logits must track eager's closely, while its bytes are half fp32's."""
    import numpy as np
    import torch

    monkeypatch.setenv("TUNESHIP_MODELS", str(tmp_path_factory.mktemp("models")))
    repo = tmp_path_factory.mktemp("repo-int8")
    chats = [[{"role": "user", "content": q}] for q in
             ("What is the capital of France?", "How many legs does a spider have?", "Say hello in Spanish.")]
    kept: dict = {}

    def record(answers):
        kept["answers"] = answers(chats, 12)
        return {"answers": kept["answers"]}

    report = tcompile.compile_for_triton(NAME, None, repo, "llm", precision="int8", parity_prompts=chats[:1],
                                         quality_gate=record, max_new_tokens=12)
    vdir = repo / "llm" / "1"
    decoder = json.loads((vdir / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"]) == (9, 3, 64)
    assert report["onnx_bytes"] < 0.6 * 540e6 and report["parity"]["tokenizer_equal"]
    gen = tcompile.load_triton_model_module().GenaiGreedyGenerator(str(vdir))
    model, tok = tcompile.merged_model(NAME, None)
    agree, total, corr = 0, 0, []
    for chat in chats:
        ids = tcompile.prompt_ids(tok, chat)
        with torch.no_grad():
            eager = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
        got = gen.prompt_logits(ids)
        agree += int((got.argmax(-1) == eager.argmax(-1)).sum())
        total += len(ids)
        corr += [float(np.corrcoef(g, e)[0, 1]) for g, e in zip(got, eager, strict=True)]
    print(f"SmolLM2 int8: {report['onnx_bytes'] / 1e6:.0f} MB, top-1 agreement {agree}/{total}, "
          f"min logit correlation {min(corr):.4f}; answers {kept['answers']}")
    assert agree / total >= 0.9 and min(corr) >= 0.98
    assert len(kept["answers"]) == len(chats) and all(kept["answers"])  # it answers through model.py
