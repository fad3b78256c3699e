"""Compile for Triton: ONNX parity with PyTorch, the Triton model class, atomic writes, TRT contract."""

from __future__ import annotations

import json
import string

import pytest
from ml_fixtures import base_model, dataset, finetuned, read_jsonl

from tuneship import compile as tcompile
from tuneship.compile import (
    ParityError,
    compile_for_triton,
    load_triton_model_module,
    tensorrt_available,
    tensorrt_build_command,
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
        "model.py", "model.onnx", "tokenizer.json", "generation.json", "deployment.json"}
    assert not [p for p in repo.iterdir() if p.name.startswith(".")], "no staging leftovers"
    deployment = json.loads((vdir / "deployment.json").read_text())
    assert deployment["registry_version"] == "7" and deployment["colour"] == "blue"
    assert deployment["onnx_sha256"] == report["onnx_sha256"]
    assert len(deployment["adapter_sha256"]) == 64
    gen = json.loads((vdir / "generation.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["max_new_tokens"] == 16
    cfg = (repo / "llm_blue" / "config.pbtxt").read_text()
    assert 'name: "llm_blue"' in cfg and "KIND_CPU" in cfg and "max_batch_size: 0" in cfg
    assert 'backend: "python"' in cfg and "versions: [ 3 ]" in cfg and "$" not in cfg
    for name, typ in (("PROMPT", "TYPE_STRING"), ("MAX_TOKENS", "TYPE_INT32"), ("COMPLETION", "TYPE_STRING"),
                      ("PROMPT_TOKENS", "TYPE_INT32"), ("COMPLETION_TOKENS", "TYPE_INT32")):
        assert f'name: "{name}"\n    data_type: {typ}' in cfg, name


def test_onnx_parity_report(compiled):
    import onnx

    report, _ = compiled
    print(f"ONNX parity: max |logit diff| {report['parity']['max_abs_logit_diff']:.3g}, "
          f"export {report['export_seconds']}s")
    assert report["parity"]["max_abs_logit_diff"] < 1e-3
    assert report["parity"]["prompts"] >= 3
    model = onnx.load(report["onnx_path"])
    inp, out = model.graph.input[0], model.graph.output[0]
    assert inp.name == "input_ids" and out.name == "logits"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in dims), f"batch and seq must be dynamic, got {dims}"


def test_triton_generator_matches_eager_generate(compiled, tmp_path_factory):
    """The class Triton runs (numpy + onnxruntime + tokenizers only) == tuneship.generate."""
    from tests.tasks import triage
    from tuneship.compile import merged_model

    _triage = triage()
    parse_triage = _triage.parse_answer
    from tuneship.generate import generate_ids

    report, repo = compiled
    gen = load_triton_model_module().OnnxGreedyGenerator(str(repo / "llm_blue" / "3"))
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


def _unfaithful_copy(compiled, dest, change):
    """The compiled version directory with one weight of its ONNX graph changed."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    _, repo = compiled
    shutil.copytree(repo / "llm_blue" / "3", dest)
    model = onnx.load(str(dest / "model.onnx"))
    norm = next(t for t in model.graph.initializer if t.name.endswith("norm.weight") and "layers" not in t.name)
    norm.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(norm)).astype(np.float32), norm.name))
    onnx.save(model, str(dest / "model.onnx"))
    return dest


@pytest.mark.parametrize(("change", "tolerance", "refusal"), [
    (lambda w: w * 1.01, tcompile.LOGIT_TOLERANCE, "logits differ from PyTorch"),  # a 1 % drift
    (lambda w: -w, 1e9, "greedy completions differ"),  # logits waved through: the answers differ
])
def test_parity_check_refuses_an_unfaithful_export(compiled, tmp_path, tmp_path_factory, change, tolerance, refusal):
    """The check that guards every deployment bites: the final norm's weights altered in the
    exported graph are refused, by the logit comparison and, past it, by the greedy answers."""
    from tuneship.compile import check_parity, merged_model

    model, tok = merged_model(str(base_model(tmp_path_factory)), finetuned(tmp_path_factory) / "adapter")
    vdir = _unfaithful_copy(compiled, tmp_path / "3", change)
    with pytest.raises(ParityError, match=refusal):
        check_parity(model, tok, vdir, tolerance=tolerance)


def test_stream_holds_back_an_incomplete_utf8_character():
    """A byte-level token can end mid-character (decoded as U+FFFD): that piece waits for
    the token that completes it, so a client never sees a replacement character."""
    cls = load_triton_model_module().OnnxGreedyGenerator
    gen = cls.__new__(cls)  # the decoding loop replaced by a scripted one
    gen._steps = lambda prompt, max_tokens: iter(
        [("", 3, 0), (" ca", 3, 1), (" caf\ufffd", 3, 2), (" café", 3, 3), (" café!", 3, 4)])
    assert list(gen.stream("x")) == [(" ca", 3, 1), ("fé", 3, 3), ("!", 3, 4), ("", 3, 4)]
    gen._steps = lambda prompt, max_tokens: iter([("", 5, 0)])  # eos first: one empty final piece
    assert list(gen.stream("x")) == [("", 5, 0)]


def test_failed_parity_leaves_nothing_behind(tmp_path, tmp_path_factory, monkeypatch):
    def fake_export(model, tok, path):
        path.write_bytes(b"not onnx")
        return 0.0

    def failing_parity(*a, **k):
        raise ParityError("logits differ")

    monkeypatch.setattr(tcompile, "export_onnx", fake_export)
    monkeypatch.setattr(tcompile, "check_parity", failing_parity)
    with pytest.raises(ParityError):
        compile_for_triton(str(base_model(tmp_path_factory)), None, tmp_path, "llm_green")
    assert list(tmp_path.iterdir()) == []


def test_config_template_placeholders_are_all_filled():
    tmpl = (tcompile.TRITON_TEMPLATE_DIR / "config.pbtxt.tmpl").read_text()
    names = {m.group("named") or m.group("braced")
             for m in string.Template.pattern.finditer(tmpl) if m.group("named") or m.group("braced")}
    assert names == {"name", "version", "instance_count", "deployment_json"}
    cfg = tcompile.render_config("llm_green", 2, {"note": 'quote " and \\ backslash'})
    assert '\\"note\\"' in cfg and "versions: [ 2 ]" in cfg


def test_tensorrt_build_command_contract(tmp_path):
    cmd = tensorrt_build_command(tmp_path / "ckpt", tmp_path / "engine", 8, 512, 64)
    assert cmd[0] == "trtllm-build"
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert flags["--checkpoint_dir"] == str(tmp_path / "ckpt")
    assert flags["--output_dir"] == str(tmp_path / "engine")
    assert flags["--max_batch_size"] == "8" and flags["--max_input_len"] == "512"
    assert flags["--max_seq_len"] == "576"
    onnx_cmd = tensorrt_build_command(tmp_path / "model.onnx", tmp_path / "engine", 4, 100, 20)
    assert onnx_cmd[0] == "trtexec" and f"--onnx={tmp_path / 'model.onnx'}" in onnx_cmd
    assert "--maxShapes=input_ids:4x120" in onnx_cmd
    assert f"--saveEngine={tmp_path / 'engine' / 'model.plan'}" in onnx_cmd
    with pytest.raises(ValueError, match="max_batch"):
        tensorrt_build_command(tmp_path, tmp_path, 0, 1, 1)
    assert tensorrt_available() is False  # no TensorRT and no GPU on the embedded default
