"""The bundled tritonserver for tests: installed once into the checkout's home
(TUNESHIP_TEST_TRITON_HOME, set by tests/conftest.py), started on free ports over a test's
own model repository."""

from __future__ import annotations

import os
from pathlib import Path

from envs import override_env
from ports import free_port

from tuneship import tritonserver


def start_triton(repository: Path, log_path: Path) -> tritonserver.TritonServer:
    """A live tritonserver (explicit model control) over `repository`; stop() it when done."""
    with override_env(TUNESHIP_HOME=os.environ["TUNESHIP_TEST_TRITON_HOME"]):
        tritonserver.install()
        server = tritonserver.TritonServer(repository=repository, http_port=free_port(), grpc_port=free_port(),
                                           metrics_port=free_port(), log_path=log_path)
        server.start(timeout=60)
    return server
