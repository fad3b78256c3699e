"""The bundled tritonserver for tests: installed once into the checkout's home
(TUNESHIP_TEST_TRITON_HOME, set by tests/conftest.py), started on free ports over a test's
own model repository."""

from __future__ import annotations

import os
import queue
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from envs import override_env
from ports import free_port

from tuneship import tritonserver


@dataclass(frozen=True)
class TritonUrl:
    """What a gateway needs of a Triton server (tests/integration/conftest's spawn_gateway)."""

    url: str


def start_triton(repository: Path, log_path: Path) -> tritonserver.TritonServer:
    """A live tritonserver (explicit model control) over `repository`; stop() it when done."""
    with override_env(TUNESHIP_HOME=os.environ["TUNESHIP_TEST_TRITON_HOME"]):
        tritonserver.install()
        server = tritonserver.TritonServer(repository=repository, http_port=free_port(), grpc_port=free_port(),
                                           metrics_port=free_port(), log_path=log_path)
        server.start(timeout=60)
    return server


def generate(server: tritonserver.TritonServer, model: str, prompt: bytes, max_tokens: int | None = None,
             stream: bool = False, adapter: str | None = None) -> list[tuple[str, int, int]]:
    """A compiled model's responses to one request over tritonclient's gRPC stream (the model
    is decoupled: KServe /infer does not take it); (text, prompt_tokens, completion_tokens)
    each. `adapter`: the ADAPTER input (a shared base's LoRA adapter). An error response
    raises InferenceServerException."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        inputs = [grpcclient.InferInput("PROMPT", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([prompt], dtype=np.object_))
        if max_tokens is not None:
            inputs.append(grpcclient.InferInput("MAX_TOKENS", [1], "INT32"))
            inputs[-1].set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
        inputs.append(grpcclient.InferInput("STREAM", [1], "BOOL"))
        inputs[-1].set_data_from_numpy(np.array([stream], dtype=bool))
        if adapter is not None:
            inputs.append(grpcclient.InferInput("ADAPTER", [1], "BYTES"))
            inputs[-1].set_data_from_numpy(np.array([adapter.encode()], dtype=np.object_))
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        out = []
        while True:
            result, error = got.get(timeout=60)
            if error is not None:
                raise error
            if result.as_numpy("COMPLETION") is not None:
                out.append((result.as_numpy("COMPLETION")[0].decode(), int(result.as_numpy("PROMPT_TOKENS")[0]),
                            int(result.as_numpy("COMPLETION_TOKENS")[0])))
            if result.get_response().parameters["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()
        client.close()
