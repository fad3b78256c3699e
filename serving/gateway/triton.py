"""Pooled async client for Triton's KServe v2 HTTP/REST API (JSON, BYTES tensors).

One `httpx.AsyncClient` per gateway process (keep-alive pool to Triton). Inputs follow the
LLM contract in docs/CONTRACTS.md: PROMPT (BYTES [1]), MAX_TOKENS (INT32 [1], optional) ->
COMPLETION, PROMPT_TOKENS, COMPLETION_TOKENS. If a model was configured with
max_batch_size > 0, a leading batch dimension is added (learnt once per model from
/v2/models/{name}/config).

Failures raise `UpstreamError` with the status the gateway should answer:
    connection refused / reset        -> 503 upstream_unavailable
    timeout                           -> 504 upstream_timeout
    model unknown / not ready         -> 503 model_unavailable
    model returned an error, bad body -> 502 upstream_error
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

OUTPUTS = ("COMPLETION", "PROMPT_TOKENS", "COMPLETION_TOKENS")


class UpstreamError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int


class TritonClient:
    def __init__(
        self,
        url: str,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 2.0,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = f"http://{url}"
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=self._timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
            # loopback/cluster-local: compressing each answer costs Triton and the gateway CPU
            # and saves nothing (httpx asks for gzip/br by default)
            headers={"Accept-Encoding": "identity"},
        )
        self._batched: dict[str, bool] = {}

    async def aclose(self) -> None:
        await self._client.aclose()

    @staticmethod
    def _path(model: str, suffix: str = "") -> str:
        return f"/v2/models/{quote(model, safe='')}{suffix}"

    async def server_ready(self, timeout_s: float = 2.0) -> bool:
        try:
            r = await self._client.get("/v2/health/ready", timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def model_ready(self, model: str, timeout_s: float = 2.0) -> bool:
        try:
            r = await self._client.get(self._path(model, "/ready"), timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def _is_batched(self, model: str) -> bool:
        if model not in self._batched:
            try:
                r = await self._client.get(self._path(model, "/config"), timeout=5.0)
                self._batched[model] = r.status_code == 200 and int(r.json().get("max_batch_size", 0)) > 0
            except (httpx.HTTPError, ValueError):
                return False  # not cached: ask again next time
        return self._batched[model]

    async def complete(
        self, model: str, prompt: str, max_tokens: int | None, timeout_s: float | None = None
    ) -> Completion:
        batched = await self._is_batched(model)
        shape = [1, 1] if batched else [1]
        inputs: list[dict[str, Any]] = [{"name": "PROMPT", "shape": shape, "datatype": "BYTES", "data": [prompt]}]
        if max_tokens is not None:
            inputs.append({"name": "MAX_TOKENS", "shape": shape, "datatype": "INT32", "data": [max_tokens]})
        body = {
            "inputs": inputs,
            "outputs": [{"name": n, "parameters": {"binary_data": False}} for n in OUTPUTS],
        }
        timeout = self._timeout if timeout_s is None else httpx.Timeout(timeout_s, connect=self._timeout.connect)
        try:
            r = await self._client.post(self._path(model, "/infer"), json=body, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise UpstreamError(504, "upstream_timeout", f"Triton did not answer in time ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise UpstreamError(503, "upstream_unavailable", f"Triton is unreachable ({type(exc).__name__})") from exc
        if r.status_code != 200:
            detail = _error_text(r)
            self._batched.pop(model, None)  # the model may have been reloaded with another config
            if r.status_code == 404 or (
                r.status_code in (400, 503) and any(w in detail for w in ("unknown model", "not found", "not ready", "unavailable"))
            ):
                raise UpstreamError(503, "model_unavailable", f"model {model} is not available on Triton")
            raise UpstreamError(502, "upstream_error", f"Triton returned {r.status_code}: {detail[:300]}")
        try:
            outputs = {o["name"]: o["data"] for o in r.json()["outputs"]}
            text = outputs["COMPLETION"][0]
            return Completion(
                text=text if isinstance(text, str) else str(text),
                prompt_tokens=int(outputs.get("PROMPT_TOKENS", [0])[0]),
                completion_tokens=int(outputs.get("COMPLETION_TOKENS", [0])[0]),
            )
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise UpstreamError(502, "upstream_error", f"unexpected Triton response ({type(exc).__name__})") from exc


def _error_text(r: httpx.Response) -> str:
    try:
        return str(r.json().get("error", r.text))
    except ValueError:
        return r.text
