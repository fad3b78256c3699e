"""Adapter delta (issue 13): a task's LoRA adapter served on a shared base model through ONNX
Runtime GenAI's Adapters API, held to the merged build token for token."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from ml_fixtures import adapter_variant, base_model, dataset, finetuned, read_jsonl

from tuneship import lora_delta
from tuneship.compile import (
    LOGIT_TOLERANCE,
    compile_for_triton,
    load_triton_model_module,
    model_sha256,
)

_CACHE: dict = {}
N_PROMPTS = 8


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The shared base (slots + the demo fine-tune's adapter), and for reference the merged
    build and the plain base build, both through compile_for_triton (parity-checked)."""
    if not _CACHE:
        base, adapter = str(base_model(tmp_path_factory)), finetuned(tmp_path_factory) / "adapter"
        root = tmp_path_factory.mktemp("lora-delta")
        t0 = time.perf_counter()
        shared = lora_delta.build_shared_base(base, adapter, root / "shared", root / "work", adapter_name="triage")
        shared_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        merged = compile_for_triton(base, adapter, root / "repo", "merged", version=1)
        merged_s = time.perf_counter() - t0
        plain = compile_for_triton(base, None, root / "repo", "base", version=1)
        print(f"\nbuild seconds: shared base {shared_s:.1f} (builder {shared['build_seconds']}), "
              f"merged {merged_s:.1f} (builder {merged['export_seconds']})")
        _CACHE.update(shared=shared, merged=merged, plain=plain, root=root, base=base, adapter=adapter,
                      rows=read_jsonl(dataset(tmp_path_factory) / "eval.jsonl")[:N_PROMPTS])
    return _CACHE


def _generators(builds):
    gen = load_triton_model_module().GenaiGreedyGenerator
    return (load_triton_model_module().GenaiGreedyGenerator(builds["shared"]["model_dir"]),
            gen(str(Path(builds["merged"]["model_dir"]) / "1")), gen(str(Path(builds["plain"]["model_dir"]) / "1")))


def test_shared_base_layout_and_slots(builds):
    """The graph's LoRA weights are overridable inputs with empty defaults (rank axis 0, any
    rank at run time) and hold none of the adapter's numbers; the adapter is its own file."""
    import onnx

    shared = builds["shared"]
    mdir = Path(shared["model_dir"])
    assert {p.name for p in mdir.iterdir()} == {
        "model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "generation.json",
        lora_delta.SLOTS_FILE, lora_delta.ADAPTERS_DIR}
    assert [p.name for p in (mdir / "adapters").iterdir()] == ["triage.onnx_adapter"]
    assert not [p for p in mdir.parent.iterdir() if p.name.startswith(".")], "no staging leftovers"
    # 2 layers x 7 modules x (A, B); the builder's tensors are what export_adapter computes
    assert shared["slots"] == 28 and shared["mapping_max_diff"] <= lora_delta.MAPPING_TOLERANCE
    assert shared["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    graph = onnx.load(str(mdir / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: i for i in graph.input}
    lora = {t.name: t for t in graph.initializer if ".lora_" in t.name}
    assert len(lora) == 28 and set(lora) <= set(inputs)
    for name, init in lora.items():
        rank_axis = 1 if ".lora_A." in name else 0
        assert init.dims[rank_axis] == 0 and not init.raw_data and not init.float_data, name
        assert inputs[name].type.tensor_type.shape.dim[rank_axis].dim_param == "lora_r", name
    assert json.loads((mdir / "generation.json").read_text()) == \
        json.loads((Path(builds["merged"]["model_dir"]) / "1" / "generation.json").read_text())


def test_adapter_on_shared_base_equals_the_merged_build(builds):
    """(1) The demo fine-tune's adapter active on the shared base gives the merged build's
    greedy answers token for token and its prompt logits within the parity tolerance."""
    shared, merged, plain = _generators(builds)
    max_diff, differs_from_base = 0.0, 0
    for row in builds["rows"]:
        prompt = row["prompt"]
        got = shared.generate(prompt, 16, adapter="triage")
        assert got == merged.generate(prompt, 16), prompt
        differs_from_base += got != plain.generate(prompt, 16)
        pieces = list(shared.stream(prompt, 16, adapter="triage"))
        assert "".join(p[0] for p in pieces) == got[0] and pieces[-1][1:] == got[1:]
        ids = shared.encode(prompt)
        max_diff = max(max_diff, float(np.abs(shared.prompt_logits(ids, adapter="triage")
                                              - merged.prompt_logits(ids)).max()))
    print(f"\nadapter on shared base vs merged build: max |logit diff| {max_diff:.3g} over {len(builds['rows'])} prompts")
    assert max_diff < LOGIT_TOLERANCE
    assert differs_from_base == len(builds["rows"]), "the adapter must change the answers, else (1) proves nothing"


def test_no_adapter_is_the_plain_base_build(builds):
    """(2) With no adapter active the empty LoRA slots add nothing: the plain base's build."""
    shared, _, plain = _generators(builds)
    max_diff = 0.0
    for row in builds["rows"]:
        assert shared.generate(row["prompt"], 16) == plain.generate(row["prompt"], 16), row["prompt"]
        ids = shared.encode(row["prompt"])
        max_diff = max(max_diff, float(np.abs(shared.prompt_logits(ids) - plain.prompt_logits(ids)).max()))
    print(f"\nshared base without adapter vs plain base build: max |logit diff| {max_diff:.3g}")
    assert max_diff < LOGIT_TOLERANCE


def test_adapters_switch_per_request_on_one_loaded_base(builds, tmp_path):
    """(3) Adapters exported later (no rebuild: the base files are unchanged) load into the
    running generator and switch per request; each matches eager PyTorch with that adapter
    merged, the zero adapter is the base, and a rank-8 adapter fits the same slots."""
    import torch

    from tuneship.compile import merged_model
    from tuneship.generate import generate_ids

    shared_info, base, adapter = builds["shared"], builds["base"], builds["adapter"]
    mdir = Path(shared_info["model_dir"])
    shared, merged, _ = _generators(builds)
    model_object = shared.model
    variants = {"double": adapter_variant(adapter, tmp_path / "double", scale_b=2.0),
                "zero": adapter_variant(adapter, tmp_path / "zero", scale_b=0.0),
                "rank8": adapter_variant(adapter, tmp_path / "rank8", rank=8)}
    for name, vdir in variants.items():
        report = lora_delta.export_adapter(vdir, mdir, name)
        assert report["rank"] == (8 if name == "rank8" else 16) and Path(report["path"]).is_file()
        shared.load_adapter(name, report["path"])
    assert model_sha256(mdir) == shared_info["onnx_sha256"], "exporting an adapter must not touch the base"
    assert shared.model is model_object and sorted(shared.loaded) == ["double", "rank8", "triage", "zero"]

    eager = {name: merged_model(base, vdir) for name, vdir in variants.items() if name != "zero"}
    worst: dict[str, float] = {}
    for row in builds["rows"]:
        prompt = row["prompt"]
        ids = shared.encode(prompt)
        # a request still decoding with one adapter while others are served in between
        stream = shared.stream(prompt, 16, adapter="triage")
        first = next(stream)
        answers = {name: shared.generate(prompt, 16, adapter=name) for name in ("double", None, "zero", "rank8")}
        streamed = "".join(p[0] for p in [first, *stream])
        assert streamed == merged.generate(prompt, 16)[0] == shared.generate(prompt, 16, adapter="triage")[0]
        assert answers["zero"] == answers[None] and answers["double"] != answers[None]
        base_logits = shared.prompt_logits(ids)
        assert np.allclose(shared.prompt_logits(ids, adapter="zero"), base_logits, atol=1e-6, rtol=0)
        for name, (model, tok) in eager.items():
            assert answers[name] == generate_ids(model, tok, prompt, 16), (name, prompt)
            with torch.no_grad():
                ref = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
            diff = float(np.abs(shared.prompt_logits(ids, adapter=name) - ref).max())
            worst[name] = max(worst.get(name, 0.0), diff)
    print(f"\nper-request adapters vs eager PyTorch (merged): max |logit diff| {worst}")
    assert max(worst.values()) < LOGIT_TOLERANCE
    with pytest.raises(KeyError, match="'missing' is not loaded"):
        shared.generate("hi", 2, adapter="missing")


def test_adapter_of_other_modules_is_refused(builds, tmp_path):
    """An adapter that does not fill the slots (here: q and v only) is refused before any file
    is written; so is a peft option the LoRA graph cannot express."""
    mdir = Path(builds["shared"]["model_dir"])
    qv = adapter_variant(builds["adapter"], tmp_path / "qv", keep=("q_proj", "v_proj"))
    with pytest.raises(lora_delta.AdapterShapeError, match=r"does not fit .* \(20 missing, 0 extra\)"):
        lora_delta.export_adapter(qv, mdir, "qv")
    assert not (mdir / "adapters" / "qv.onnx_adapter").exists()
    dora = tmp_path / "dora"
    shutil.copytree(builds["adapter"], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(lora_delta.AdapterShapeError, match="use_dora"):
        lora_delta.export_adapter(dora, mdir, "dora")


def test_adapter_file_is_a_fraction_of_the_merged_model(builds):
    """(4) What a task ships: the adapter file, not a merged copy of the base."""
    import onnxruntime as ort

    shared, merged = builds["shared"], builds["merged"]
    adapter_bytes, merged_bytes = shared["adapter"]["bytes"], merged["onnx_bytes"]
    params = ort.AdapterFormat.read_adapter(shared["adapter"]["path"]).get_parameters()
    n_params = sum(int(np.prod(v.shape())) for v in params.values())
    print(f"\nadapter file {adapter_bytes} B ({n_params} fp32 parameters), merged model {merged_bytes} B "
          f"({merged_bytes / adapter_bytes:.1f}x), shared base {shared['base_bytes']} B")
    assert len(params) == 28 and n_params * 4 <= adapter_bytes <= n_params * 4 + 16384
    assert adapter_bytes * 4 < merged_bytes
