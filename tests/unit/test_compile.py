"""Compile for Triton: the ONNX Runtime GenAI build, its parity with PyTorch, the Triton model
class, atomic writes, the TRT contract."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from ml_fixtures import base_model, dataset, finetuned, read_jsonl

from tuneship import compile as tcompile
from tuneship.compile import (
    ParityError,
    compile_for_triton,
    load_triton_model_module,
)

_CACHE: dict = {}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if "report" not in _CACHE:
        repo = tmp_path_factory.mktemp("triton-repo")
        adapter = finetuned(tmp_path_factory) / "adapter"
        report = compile_for_triton(
            str(base_model(tmp_path_factory)), adapter, repo, "llm_blue", version=3,
            deployment={"registry_version": "7", "colour": "blue"},
        )
        _CACHE["report"], _CACHE["repo"] = report, repo
    return _CACHE["report"], _CACHE["repo"]


def test_model_directory_layout(compiled):
    report, repo = compiled
    vdir = repo / "llm_blue" / "3"
    assert {p.name for p in vdir.iterdir()} == {
        "model.py", "model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "generation.json",
        "deployment.json"}
    assert not [p for p in repo.iterdir() if p.name.startswith(".")], "no staging leftovers"
    deployment = json.loads((vdir / "deployment.json").read_text())
    assert deployment["registry_version"] == "7" and deployment["colour"] == "blue"
    assert deployment["onnx_sha256"] == report["onnx_sha256"] == tcompile.model_sha256(vdir)
    assert len(deployment["adapter_sha256"]) == 64
    gen = json.loads((vdir / "generation.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["max_new_tokens"] == 16
    cfg = (repo / "llm_blue" / "config.pbtxt").read_text()
    assert 'name: "llm_blue"' in cfg and "KIND_CPU" in cfg and "max_batch_size: 0" in cfg
    assert 'backend: "python"' in cfg and "versions: [ 3 ]" in cfg and "$" not in cfg
    assert "count: 2" in cfg  # a second request decodes while the first is still generating
    for name, typ in (("PROMPT", "TYPE_STRING"), ("MAX_TOKENS", "TYPE_INT32"), ("COMPLETION", "TYPE_STRING"),
                      ("PROMPT_TOKENS", "TYPE_INT32"), ("COMPLETION_TOKENS", "TYPE_INT32"), ("CONFIDENCE", "TYPE_FP32")):
        assert f'name: "{name}"\n    data_type: {typ}' in cfg, name


def test_build_is_a_kv_cache_decoder_with_parity_report(compiled):
    import onnx

    report, _ = compiled
    print(f"ORT GenAI parity: max |logit diff| {report['parity']['max_abs_logit_diff']:.3g}, "
          f"build {report['export_seconds']}s")
    assert report["parity"]["max_abs_logit_diff"] < 1e-3
    assert report["parity"]["prompts"] >= 3 and report["parity"]["generation_equal"] is True
    assert report["builder"] == {"tool": "onnxruntime_genai.models.builder", "precision": "fp32",
                                 "execution_provider": "cpu"}
    graph = onnx.load(report["onnx_path"], load_external_data=False).graph
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    # the decoder takes and returns the attention keys/values: one position per new token
    assert {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.1.value"} <= inputs
    assert {"logits", "present.0.key", "present.1.value"} <= outputs
    assert any(n.op_type == "GroupQueryAttention" for n in graph.node)
    genai = json.loads((Path(report["onnx_path"]).parent / "genai_config.json").read_text())
    assert genai["model"]["eos_token_id"] == 2 and genai["model"]["decoder"]["num_hidden_layers"] == 2


def test_served_tokenizer_encodes_as_the_eager_one(compiled, tmp_path_factory):
    """The served model encodes prompts with the build's tokenizer.json: the same ids as the
    eager tokenizer, BOS and special tokens included (ONNX Runtime GenAI's own tokenizer
    drops the BOS, which is why it is not used)."""
    from tuneship.compile import merged_model, prompt_ids, served_text

    _, repo = compiled
    gen = load_triton_model_module().GenaiGreedyGenerator(str(repo / "llm_blue" / "3"))
    _, tok = merged_model(str(base_model(tmp_path_factory)), None)
    chat = [{"role": "user", "content": "My card was declined."}]
    for prompt in ("Hello", "Ticket: caf\u00e9 order late\nTriage:", "</s> inside <s> text", chat):
        assert gen.encode(served_text(tok, prompt)) == prompt_ids(tok, prompt), prompt
    assert gen.encode("Hello")[0] == tok.bos_token_id == 1


def test_triton_generator_matches_eager_generate(compiled, tmp_path_factory):
    """The class Triton runs (numpy + onnxruntime-genai + tokenizers only) == tuneship.generate."""
    from tests.tasks import triage
    from tuneship.compile import merged_model

    _triage = triage()
    parse_triage = _triage.parse_answer
    from tuneship.generate import generate_ids

    report, repo = compiled
    gen = load_triton_model_module().GenaiGreedyGenerator(str(repo / "llm_blue" / "3"))
    model, tok = merged_model(str(base_model(tmp_path_factory)), finetuned(tmp_path_factory) / "adapter")
    rows = read_jsonl(dataset(tmp_path_factory) / "eval.jsonl")[:12]
    correct = 0
    for row in rows:
        eager = generate_ids(model, tok, row["prompt"], 16, kv_cache=False)
        served = gen.generate(row["prompt"], 16)
        assert served == eager, row["prompt"]
        pieces = list(gen.stream(row["prompt"], 16))  # what a streaming request gets, in order
        assert "".join(p[0] for p in pieces) == served[0] and pieces[-1][1:] == served[1:]
        correct += parse_triage(served[0]) == parse_triage(row["completion"])
    assert correct >= 9, "the served model is the fine-tuned one"
    # evaluation decodes with the KV cache: the same greedy completions as the full recompute
    assert [generate_ids(model, tok, r["prompt"], 16)[0] for r in rows] == \
        [generate_ids(model, tok, r["prompt"], 16, kv_cache=False)[0] for r in rows]
    text, n_prompt, n_completion = gen.generate(rows[0]["prompt"], 2)
    assert n_completion == 2 and n_prompt == len(tok(rows[0]["prompt"])["input_ids"])
    with pytest.raises(ValueError, match="MAX_TOKENS"):
        gen.generate("hi", 0)


def test_served_confidence_is_the_eval_suites_mean_token_rule(compiled, tmp_path_factory):
    """The CONFIDENCE Triton returns with each answer (what the drift monitor holds against
    users' feedback) is the eval suites' `mean_token` confidence of the same answer: the
    geometric mean of the probabilities eager PyTorch gives the answer's tokens, eos included.
    A streamed answer's last piece carries the same figure."""
    import math

    from tuneship.compile import merged_model
    from tuneship.evaluate import token_confidence
    from tuneship.generate import generate_and_score

    _, repo = compiled
    gen = load_triton_model_module().GenaiGreedyGenerator(str(repo / "llm_blue" / "3"))
    model, tok = merged_model(str(base_model(tmp_path_factory)), finetuned(tmp_path_factory) / "adapter")
    prompts = [row["prompt"] for row in read_jsonl(dataset(tmp_path_factory) / "eval.jsonl")[:8]]
    eager = generate_and_score(model, tok, prompts, 16, [])
    seen = set()
    for prompt, answer, logprobs in zip(prompts, eager.answers, eager.answer_logprobs, strict=True):
        text, _, _, confidence = gen.answer(prompt, 16)
        assert text == answer, prompt
        assert 0 < confidence <= 1
        assert math.isclose(confidence, token_confidence("mean_token", logprobs), rel_tol=2e-3), prompt
        assert list(gen.stream_scored(prompt, 16))[-1][3] == confidence
        seen.add(round(confidence, 3))
    assert len(seen) > 1, "one confidence for every answer is no confidence"


def _unfaithful_copy(compiled, dest, change):
    """The compiled version directory with one weight of the built model changed in place,
    in model.onnx.data where the graph's external-data reference points."""
    import shutil

    import numpy as np
    import onnx

    _, repo = compiled
    shutil.copytree(repo / "llm_blue" / "3", dest)
    graph = onnx.load(str(dest / "model.onnx"), load_external_data=False).graph
    norm = next(t for t in graph.initializer if t.name.endswith("final_norm_layernorm.weight"))
    where = {e.key: e.value for e in norm.external_data}
    offset, length = int(where.get("offset", 0)), int(where["length"])
    with open(dest / where["location"], "r+b") as f:
        f.seek(offset)
        weight = np.frombuffer(f.read(length), dtype=np.float32)
        f.seek(offset)
        f.write(change(weight).astype(np.float32).tobytes())
    return dest


@pytest.mark.parametrize(("change", "tolerance", "refusal"), [
    (lambda w: w * 1.01, tcompile.LOGIT_TOLERANCE, "logits differ from PyTorch"),  # a 1 % drift
    (lambda w: -w, 1e9, "greedy completions differ"),  # logits waved through: the answers differ
])
def test_parity_check_refuses_an_unfaithful_export(compiled, tmp_path, tmp_path_factory, change, tolerance, refusal):
    """The check that guards every deployment bites: the final norm's weights altered in the
    built model are refused, by the logit comparison and, past it, by the greedy answers."""
    from tuneship.compile import check_parity, merged_model

    model, tok = merged_model(str(base_model(tmp_path_factory)), finetuned(tmp_path_factory) / "adapter")
    vdir = _unfaithful_copy(compiled, tmp_path / "3", change)
    with pytest.raises(ParityError, match=refusal):
        check_parity(model, tok, vdir, tolerance=tolerance)


def test_stream_holds_back_an_incomplete_utf8_character():
    """A byte-level token can end mid-character (decoded as U+FFFD): that piece waits for
    the token that completes it, so a client never sees a replacement character."""
    cls = load_triton_model_module().GenaiGreedyGenerator
    gen = cls.__new__(cls)  # the decoding loop replaced by a scripted one
    gen._steps = lambda prompt, max_tokens, adapter=None: iter(
        [("", 3, 0, None), (" ca", 3, 1, 0.9), (" caf\ufffd", 3, 2, 0.8), (" café", 3, 3, 0.85), (" café!", 3, 4, 0.7)])
    assert list(gen.stream("x")) == [(" ca", 3, 1), ("fé", 3, 3), ("!", 3, 4), ("", 3, 4)]
    # the scored pieces carry the confidence so far; the last one the answer's
    assert [p[3] for p in gen.stream_scored("x")] == [0.9, 0.85, 0.7, 0.7]
    gen._steps = lambda prompt, max_tokens, adapter=None: iter([("", 5, 0, None)])  # nothing decoded
    assert list(gen.stream("x")) == [("", 5, 0)]


def test_failed_parity_leaves_nothing_behind(tmp_path, tmp_path_factory, monkeypatch):
    def fake_build(model, tok, out_dir, work_dir, *options):
        out_dir.mkdir(parents=True)
        for name in tcompile.BUILD_FILES:
            (out_dir / name).write_bytes(b"not a model")
        return 0.0

    def failing_parity(*a, **k):
        raise ParityError("logits differ")

    monkeypatch.setattr(tcompile, "build_genai_model", fake_build)
    monkeypatch.setattr(tcompile, "check_parity", failing_parity)
    with pytest.raises(ParityError):
        compile_for_triton(str(base_model(tmp_path_factory)), None, tmp_path, "llm_green")
    assert list(tmp_path.iterdir()) == []


def test_head_size_the_cpu_attention_cannot_run_is_refused_before_building(tmp_path):
    """ONNX Runtime GenAI's fp32 CPU attention needs head sizes in multiples of 16; the
    builder would write a model that fails at its first request, so compile refuses first."""
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(hidden_size=96, num_attention_heads=4, head_dim=None))
    with pytest.raises(ValueError, match=r"multiple of 16; this model has 24 \(hidden_size 96 / 4 heads\)"):
        tcompile.build_genai_model(model, None, tmp_path / "out", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_builder_failure_carries_its_stderr(tmp_path, tmp_path_factory, monkeypatch):
    """A failing model builder (here: a precision it does not know) is reported with its
    command and its own error text, not a bare exit status."""
    from tuneship.compile import merged_model

    model, tok = merged_model(str(base_model(tmp_path_factory)), None)
    monkeypatch.setattr(tcompile, "PRECISIONS", (*tcompile.PRECISIONS, "fp7"))
    with pytest.raises(RuntimeError, match=r"(?s)model builder failed \(exit 2.*-p fp7.*invalid choice: 'fp7'"):
        tcompile.build_genai_model(model, tok, tmp_path / "out", tmp_path, "fp7")
    with pytest.raises(ValueError, match="precision must be one of fp32, int8, int4"):
        tcompile.build_genai_model(model, tok, tmp_path / "out", tmp_path, "fp8")


def test_config_template_placeholders_are_all_filled():
    tmpl = (tcompile.TRITON_TEMPLATE_DIR / "config.pbtxt.tmpl").read_text()
    names = {m.group("named") or m.group("braced")
             for m in string.Template.pattern.finditer(tmpl) if m.group("named") or m.group("braced")}
    assert names == {"name", "version", "instance_count", "deployment_json"}
    cfg = tcompile.render_config("llm_green", 2, {"note": 'quote " and \\ backslash'})
    assert '\\"note\\"' in cfg and "versions: [ 2 ]" in cfg


