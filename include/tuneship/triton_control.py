"""Model control on Triton in explicit mode (load, unload, readiness, repository index).

One home for it: Airflow's `TritonHook` resolves the connection and delegates here; the
stages and `make up` use it directly.
"""

from __future__ import annotations

import time
from typing import Any


class TritonControl:
    def __init__(self, url: str) -> None:
        self.url = url  # host:port of Triton's HTTP endpoint

    def client(self) -> Any:
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(self.url, connection_timeout=10.0, network_timeout=300.0)

    def load(self, model: str, timeout: float = 180.0) -> None:
        """Load (or reload) `model` and wait until it is ready."""
        client = self.client()
        client.load_model(model)
        deadline = time.monotonic() + timeout
        while not client.is_model_ready(model):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Triton model {model!r} not ready after {timeout:.0f}s")
            time.sleep(0.5)

    def unload(self, model: str) -> None:
        self.client().unload_model(model)

    def is_ready(self, model: str) -> bool:
        try:
            return bool(self.client().is_model_ready(model))
        except Exception:  # noqa: BLE001 - an unknown model is "not ready"
            return False

    def index(self) -> list[dict[str, Any]]:
        """The repository index: one {name, version, state, reason} per model."""
        return list(self.client().get_model_repository_index())
