"""The compiled fine-tuned model served by the real tritonserver, called with tritonclient.

What `llm_release` relies on: the package `compile_for_triton` writes loads through Triton's
model-control API (Python backend, ONNX Runtime GenAI inside, its own NumPy 1.x environment) and
answers exactly what eager PyTorch generates; bad requests come back as errors, not crashes.
"""

from __future__ import annotations

import pytest
from ml_fixtures import base_model, dataset, finetuned, read_jsonl
from triton_server import generate, start_triton


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tuneship.compile import compile_for_triton

    repo = tmp_path_factory.mktemp("llm-repo")
    compile_for_triton(str(base_model(tmp_path_factory)), finetuned(tmp_path_factory) / "adapter", repo,
                       "llm_blue", deployment={"version": "7", "colour": "blue"})
    server = start_triton(repo, tmp_path_factory.mktemp("log") / "triton.log")
    try:
        yield server
    finally:
        server.stop()


def _generate(served, prompt: bytes, max_tokens: int | None, stream: bool = False) -> list[tuple[str, int, int]]:
    return generate(served, "llm_blue", prompt, max_tokens, stream)


def test_load_ready_and_exact_answers_whole_and_streamed(served, tmp_path_factory):
    import tritonclient.http as httpclient

    from tuneship.compile import merged_model
    from tuneship.generate import generate_ids

    http = httpclient.InferenceServerClient(served.url)
    assert not http.is_model_ready("llm_blue")  # explicit model control: nothing until loaded
    http.load_model("llm_blue")
    assert http.is_model_ready("llm_blue")
    assert [m["name"] for m in http.get_model_repository_index() if m.get("state") == "READY"] == ["llm_blue"]

    model, tok = merged_model(str(base_model(tmp_path_factory)), finetuned(tmp_path_factory) / "adapter")
    for row in read_jsonl(dataset(tmp_path_factory) / "eval.jsonl")[:6]:
        eager = generate_ids(model, tok, row["prompt"], 12, kv_cache=False)
        assert _generate(served, row["prompt"].encode(), 12) == [eager]  # one final response
        # Streamed: several responses while decoding, the same text in order, counts growing,
        # the last one carrying the totals.
        pieces = _generate(served, row["prompt"].encode(), 12, stream=True)
        assert len(pieces) > 2
        assert "".join(p[0] for p in pieces) == eager[0]
        assert [p[2] for p in pieces] == sorted(p[2] for p in pieces)
        assert pieces[-1][1:] == eager[1:]

    first = read_jsonl(dataset(tmp_path_factory) / "eval.jsonl")[0]
    [(out, _, _)] = _generate(served, first["prompt"].encode(), None)  # MAX_TOKENS optional
    assert out.startswith(" category=")


def test_each_answer_carries_the_models_confidence_to_the_gateway(served, tmp_path_factory):
    """The gateway's Triton client (aiohttp to the generate endpoints, as the gateway calls
    them) reads CONFIDENCE: the figure the model class computes for the same answer, whole or
    streamed (the last piece carries it); what the inference log records for calibration."""
    import asyncio

    import tritonclient.http as httpclient

    from serving.gateway.triton import TritonClient
    from tuneship.compile import load_triton_model_module

    http = httpclient.InferenceServerClient(served.url)
    if not http.is_model_ready("llm_blue"):
        http.load_model("llm_blue")
    local = load_triton_model_module().GenaiGreedyGenerator(str(served.repository / "llm_blue" / "1"))
    prompts = [row["prompt"] for row in read_jsonl(dataset(tmp_path_factory) / "eval.jsonl")[:4]]

    async def ask() -> list[tuple]:
        client = TritonClient(served.url)
        try:
            out = []
            for prompt in prompts:
                whole = await client.complete("llm_blue", prompt, 12)
                pieces = [c async for c in await client.stream("llm_blue", prompt, 12)]
                out.append((whole, pieces))
            return out
        finally:
            await client.aclose()

    for prompt, (whole, pieces) in zip(prompts, asyncio.run(ask()), strict=True):
        text, _, _, confidence = local.answer(prompt, 12)
        assert whole.text == text and whole.confidence == pytest.approx(confidence, rel=1e-5), prompt
        assert "".join(p.text for p in pieces) == text and pieces[-1].confidence == whole.confidence


def test_bad_requests_are_errors_and_the_model_stays_up(served):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    http = httpclient.InferenceServerClient(served.url)
    if not http.is_model_ready("llm_blue"):
        http.load_model("llm_blue")
    with pytest.raises(InferenceServerException, match="MAX_TOKENS"):
        _generate(served, b"Ticket: x\nTriage:", -1)
    with pytest.raises(InferenceServerException, match="context"):
        _generate(served, ("word " * 5000).encode(), 4, stream=True)  # longer than the model's context
    [(ok, _, _)] = _generate(served, b"Ticket: My card was declined at payment.\nTriage:", 8)
    assert ok.startswith(" category=")
    http.unload_model("llm_blue")
    assert not http.is_model_ready("llm_blue")
