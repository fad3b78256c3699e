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

    def warm_up(self, model: str, prompts: list[str], max_tokens: int = 4, timeout: float = 120.0) -> dict[str, Any]:
        """Send `prompts` straight to `model` before any traffic can reach it, so no user
        request pays the first-run costs (ONNX Runtime plans and allocates on its first run,
        the tokenizer and the Python backend stub warm up). Triton's `generate` endpoint takes
        decoupled and ordinary models alike. Any failed request raises RuntimeError naming
        the model, the request and Triton's answer. Returns the count and latencies."""
        import httpx

        latencies = []
        with httpx.Client(base_url=f"http://{self.url}", timeout=timeout) as c:
            for i, prompt in enumerate(prompts, 1):
                t0 = time.perf_counter()
                try:
                    r = c.post(f"/v2/models/{model}/generate", json={"PROMPT": prompt, "MAX_TOKENS": max_tokens})
                    body = r.json()
                except (httpx.HTTPError, ValueError) as exc:
                    raise RuntimeError(f"warm-up request {i}/{len(prompts)} to {model} failed: "
                                       f"{type(exc).__name__}: {exc}") from exc
                if r.status_code != 200 or "error" in body:
                    raise RuntimeError(f"warm-up request {i}/{len(prompts)} to {model} failed: HTTP "
                                       f"{r.status_code} {str(body.get('error', body))[:300]}")
                latencies.append(round((time.perf_counter() - t0) * 1000, 1))
        return {"model": model, "requests": len(latencies), "latency_ms": latencies}
