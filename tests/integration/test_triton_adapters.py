"""Adapter delta through the real tritonserver (issue 13): one shared base with two LoRA
adapters in one Triton model, each request naming its adapter in the ADAPTER input, held
token for token to the merged builds of the same adapters served beside it, over tritonclient.

The two adapters: the demo fine-tune's (`triage`) and a weaker copy of it (B halved: `half`),
which answers differently on some prompts, so "each request gets its own adapter" can fail.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from ml_fixtures import adapter_variant, base_model, dataset, finetuned, read_jsonl
from triton_server import generate, start_triton

SHARED = "llm_shared"
MERGED = {"triage": "merged_triage", "half": "merged_half"}
N_PROMPTS = 8
MAX_TOKENS = 12


def _dir_bytes(path: Path) -> int:
    """What a model directory ships (not the __pycache__ the Python backend writes on load)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The shared package (base with slots + triage + half) and each adapter's merged build
    (compile_for_triton: parity-checked against eager PyTorch) in one repository, all loaded."""
    import tritonclient.http as httpclient

    from tuneship import lora_delta
    from tuneship.compile import compile_for_triton

    base, adapter = str(base_model(tmp_path_factory)), finetuned(tmp_path_factory) / "adapter"
    root = tmp_path_factory.mktemp("adapters")
    half = adapter_variant(adapter, root / "half-adapter", scale_b=0.5)
    repo = root / "repo"
    t0 = time.perf_counter()
    shared = lora_delta.build_shared_base(base, adapter, root / "shared", root / "work", adapter_name="triage")
    lora_delta.export_adapter(half, root / "shared", "half")
    package = lora_delta.package_for_triton(root / "shared", repo, SHARED, deployment={"version": "3"})
    shared_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    merged = {name: compile_for_triton(base, src, repo, MERGED[name], instances=1)
              for name, src in (("triage", adapter), ("half", half))}
    merged_s = time.perf_counter() - t0
    server = start_triton(repo, root / "triton.log")
    try:
        http = httpclient.InferenceServerClient(server.url)
        t0 = time.perf_counter()
        for model in (SHARED, *MERGED.values()):
            http.load_model(model)
        load_s = time.perf_counter() - t0
        print(f"\nbuild seconds: shared base + 2 adapters + package {shared_s:.1f} (builder "
              f"{shared['build_seconds']}), two merged builds with parity {merged_s:.1f}; load 3 models {load_s:.1f}")
        rows = read_jsonl(dataset(tmp_path_factory) / "eval.jsonl")[:N_PROMPTS]
        yield {"server": server, "http": http, "package": package, "merged": merged, "repo": repo,
               "shared_dir": root / "shared", "prompts": [r["prompt"].encode() for r in rows]}
    finally:
        server.stop()


def _ask(served, model: str, prompt: bytes, stream: bool = False, adapter: str | None = None):
    return generate(served["server"], model, prompt, MAX_TOKENS, stream, adapter)


def test_the_shared_model_declares_adapter_and_records_its_adapters(served):
    http, package = served["http"], served["package"]
    assert package["adapters"] == ["half", "triage"]
    assert sorted(p.name for p in (Path(package["model_dir"]) / "1" / "adapters").iterdir()) == \
        ["half.onnx_adapter", "triage.onnx_adapter"]
    cfg = http.get_model_config(SHARED)
    adapter_input = [i for i in cfg["input"] if i["name"] == "ADAPTER"]
    assert adapter_input and adapter_input[0]["data_type"] == "TYPE_STRING" and adapter_input[0]["optional"]
    deployment = cfg["parameters"]["tuneship_deployment"]["string_value"]
    assert '"triage": {"bytes"' in deployment and '"half": {"bytes"' in deployment and '"version": "3"' in deployment


def test_each_adapter_answers_as_its_merged_build_whole_and_streamed(served):
    """(1) Through Triton, on the same prompts: the shared model with ADAPTER=<name> gives its
    merged build's completion token for token (text and token counts), whole and streamed;
    no ADAPTER (or an empty one) is the base alone, which neither adapter answers like."""
    from tuneship.compile import load_triton_model_module

    base_alone = load_triton_model_module().GenaiGreedyGenerator(str(served["shared_dir"]))
    differs_from_base = {"triage": 0, "half": 0}
    for prompt in served["prompts"]:
        for name, merged in MERGED.items():
            [want] = _ask(served, merged, prompt)
            assert _ask(served, SHARED, prompt, adapter=name) == [want], (name, prompt)
            pieces = _ask(served, SHARED, prompt, stream=True, adapter=name)
            assert "".join(p[0] for p in pieces) == want[0] and pieces[-1][1:] == want[1:], (name, prompt)
            assert pieces == _ask(served, merged, prompt, stream=True), (name, prompt)  # same pieces, too
            differs_from_base[name] += want[0] != base_alone.generate(prompt.decode(), MAX_TOKENS)[0]
        [plain] = _ask(served, SHARED, prompt)
        assert plain == base_alone.generate(prompt.decode(), MAX_TOKENS)
        assert _ask(served, SHARED, prompt, adapter="") == [plain]
    print(f"\nprompts where the adapter changes the base's answer: {differs_from_base} of {len(served['prompts'])}")
    assert min(differs_from_base.values()) > 0, "an adapter that answers as the base proves nothing"


def test_adapters_differ_where_their_merged_builds_do_and_interleave(served):
    """(2) The two adapters answer differently exactly where their merged builds do (on at
    least one prompt), and concurrent requests alternating the two adapters, whole and
    streamed, each get their own adapter's answer."""
    expected = {(name, p): _ask(served, MERGED[name], p)[0] for name in MERGED for p in served["prompts"]}
    merged_differ = [p for p in served["prompts"] if expected[("triage", p)] != expected[("half", p)]]
    shared_differ = [p for p in served["prompts"]
                     if _ask(served, SHARED, p, adapter="triage") != _ask(served, SHARED, p, adapter="half")]
    print(f"\nprompts where triage and half answer differently: {len(merged_differ)} of {len(served['prompts'])}")
    assert merged_differ and shared_differ == merged_differ

    jobs = [(name, p, i % 4 >= 2) for i, p in enumerate(served["prompts"] * 2) for name in ("triage", "half")]

    def run(job):
        name, prompt, stream = job
        pieces = _ask(served, SHARED, prompt, stream=stream, adapter=name)
        return "".join(x[0] for x in pieces), pieces[-1][1], pieces[-1][2]

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(run, jobs))
    wrong = [(job, got, expected[job[:2]]) for job, got in zip(jobs, answers, strict=True) if got != expected[job[:2]]]
    assert not wrong, wrong


def test_unknown_adapter_is_a_clear_error_and_the_model_stays_ready(served):
    """(3) A name not loaded: that request's error, naming it and the loaded ones, whole and
    streamed; the model stays ready and the next request is answered. A merged model has no
    adapters, so a non-empty ADAPTER is refused there the same way."""
    from tritonclient.utils import InferenceServerException

    prompt = served["prompts"][0]
    for stream in (False, True):
        with pytest.raises(InferenceServerException,
                           match=r"UnknownAdapterError: adapter 'nope' is not loaded \(loaded: \['half', 'triage'\]\)"):
            _ask(served, SHARED, prompt, stream=stream, adapter="nope")
    with pytest.raises(InferenceServerException, match=r"adapter 'triage' is not loaded \(loaded: \[\]\)"):
        _ask(served, MERGED["triage"], prompt, adapter="triage")
    assert served["http"].is_model_ready(SHARED) and served["http"].is_model_ready(MERGED["triage"])
    assert _ask(served, SHARED, prompt, adapter="triage") == _ask(served, MERGED["triage"], prompt)


def test_the_shared_package_is_smaller_than_two_merged_packages(served):
    """(4) Disk: one base plus two adapter files against two full merged models."""
    shared = _dir_bytes(Path(served["package"]["model_dir"]))
    merged = {name: _dir_bytes(Path(report["model_dir"])) for name, report in served["merged"].items()}
    adapters = served["package"]["adapter_bytes"]
    print(f"\nshared package {shared} B (base {served['package']['base_bytes']} B, adapters {adapters}); "
          f"merged packages {merged} = {sum(merged.values())} B; shared / two merged = "
          f"{shared / sum(merged.values()):.2f}; an adapter file is 1/{min(merged.values()) / max(adapters.values()):.1f} "
          "of a merged package")
    assert shared == served["package"]["package_bytes"]
    assert shared < sum(merged.values())
    assert max(adapters.values()) * 4 < min(merged.values())


def test_gateway_routes_served_models_to_adapters_of_one_triton_model(served, tmp_path):
    """The gateway: two served models whose routes name the same Triton model with different
    adapters answer as the two merged builds (chat and completions, whole and streamed, over
    the openai SDK); live and shadow may be one model's two adapters, and the mirrored copy
    runs with the shadow's adapter (the inference log's shadow answer)."""
    import httpx
    import openai
    from conftest import spawn_gateway, wait_live
    from triton_server import TritonUrl

    from tuneship.inference_log import read_inference_log

    gw = wait_live(spawn_gateway(TritonUrl(served["server"].url), tmp_path / "home", tmp_path, "adapters"))
    try:
        plain = {"prompt_format": "plain"}
        for served_model, live, shadow in (("triage-lora", "triage", "half"), ("half-lora", "half", None)):
            body = {"live": {"colour": "blue", "model": SHARED, "adapter": live, "metadata": plain},
                    "shadow": shadow and {"colour": "green", "model": SHARED, "adapter": shadow, "metadata": plain},
                    "mirror_sample": 1.0}
            r = httpx.put(f"{gw.url}/admin/routes", params={"model": served_model}, headers=gw.admin, json=body,
                          timeout=10)
            assert r.status_code == 200, r.text
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-anything", max_retries=0)
        prompts = served["prompts"][:4]
        for prompt in prompts:
            for served_model, adapter in (("triage-lora", "triage"), ("half-lora", "half")):
                want = _ask(served, MERGED[adapter], prompt)[0][0]
                chat = client.chat.completions.create(model=served_model, max_tokens=MAX_TOKENS,
                                                      messages=[{"role": "user", "content": prompt.decode()}])
                assert chat.choices[0].message.content == want.strip(), (served_model, prompt)  # chat strips
                chunks = client.completions.create(model=served_model, prompt=prompt.decode(), max_tokens=MAX_TOKENS,
                                                   stream=True)
                assert "".join(c.choices[0].text for c in chunks if c.choices) == want, (served_model, prompt)
    finally:
        gw.stop()  # flushes the inference log (and the mirror's queue)
    records = read_inference_log(gw.log_root, model="triage-lora")
    shadowed = [r for r in records if (r.get("shadow") or {}).get("status") == 200]
    assert len(shadowed) == 2 * len(prompts), records[:2]
    half = {p.decode(): _ask(served, MERGED["half"], p)[0][0] for p in prompts}
    for r in shadowed:
        assert r["shadow"]["completion"].strip() == half[r["prompt"]].strip(), r
    # each answer is logged with the model's confidence in it (the drift monitor's calibration)
    answered = [a for r in records for a in (r["live"], r["shadow"]) if a and a.get("status") == 200]
    assert answered and all(0 < a["confidence"] <= 1 for a in answered), answered[:2]
