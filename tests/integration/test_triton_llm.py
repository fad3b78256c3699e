"""The compiled fine-tuned model served by the real tritonserver, called with tritonclient.

What `llm_release` relies on: the package `compile_for_triton` writes loads through Triton's
model-control API (Python backend, ONNX Runtime inside, its own NumPy 1.x environment) and
answers exactly what eager PyTorch generates; bad requests come back as errors, not crashes.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
from ml_fixtures import base_model, dataset, finetuned, read_jsonl

from tuneship import tritonserver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import os

    from tuneship.compile import compile_for_triton

    repo = tmp_path_factory.mktemp("llm-repo")
    compile_for_triton(str(base_model(tmp_path_factory)), finetuned(tmp_path_factory) / "adapter", repo,
                       "llm_blue", deployment={"version": "7", "colour": "blue"})
    old = os.environ.get("TUNESHIP_HOME")
    os.environ["TUNESHIP_HOME"] = os.environ["TUNESHIP_TEST_TRITON_HOME"]
    try:
        tritonserver.install()
        server = tritonserver.TritonServer(repository=repo, http_port=free_port(), grpc_port=free_port(),
                                           metrics_port=free_port(),
                                           log_path=tmp_path_factory.mktemp("log") / "triton.log")
        server.start(timeout=60)
    finally:
        os.environ["TUNESHIP_HOME"] = old or ""
    try:
        yield server
    finally:
        server.stop()


def _http_infer(url: str, prompt: bytes, max_tokens: int | None):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    inputs = [httpclient.InferInput("PROMPT", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([prompt], dtype=np.object_))
    if max_tokens is not None:
        mt = httpclient.InferInput("MAX_TOKENS", [1], "INT32")
        mt.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
        inputs.append(mt)
    return client.infer("llm_blue", inputs)


def test_load_ready_and_exact_answers(served, tmp_path_factory):
    import tritonclient.grpc as grpcclient
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
        eager_text, n_prompt, n_completion = generate_ids(model, tok, row["prompt"], 12)
        result = _http_infer(served.url, row["prompt"].encode(), 12)
        assert result.as_numpy("COMPLETION")[0].decode() == eager_text
        assert int(result.as_numpy("PROMPT_TOKENS")[0]) == n_prompt
        assert int(result.as_numpy("COMPLETION_TOKENS")[0]) == n_completion

    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    inp = grpcclient.InferInput("PROMPT", [1], "BYTES")
    first = read_jsonl(dataset(tmp_path_factory) / "eval.jsonl")[0]
    inp.set_data_from_numpy(np.array([first["prompt"].encode()], dtype=np.object_))
    out = grpc.infer("llm_blue", [inp]).as_numpy("COMPLETION")[0].decode()  # MAX_TOKENS optional
    assert out.startswith(" category=")


def test_bad_requests_are_errors_and_the_model_stays_up(served):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    http = httpclient.InferenceServerClient(served.url)
    if not http.is_model_ready("llm_blue"):
        http.load_model("llm_blue")
    with pytest.raises(InferenceServerException, match="MAX_TOKENS"):
        _http_infer(served.url, b"Ticket: x\nTriage:", -1)
    with pytest.raises(InferenceServerException):
        _http_infer(served.url, ("word " * 5000).encode(), 4)  # longer than the model's context
    ok = _http_infer(served.url, b"Ticket: My card was declined at payment.\nTriage:", 8)
    assert ok.as_numpy("COMPLETION")[0].decode().startswith(" category=")
    http.unload_model("llm_blue")
    assert not http.is_model_ready("llm_blue")
