"""Pooled async client for Triton's KServe v2 HTTP/REST API (JSON, BYTES tensors).

One `aiohttp.ClientSession` per gateway process (keep-alive pool to Triton). Inputs follow
the LLM contract in docs/CONTRACTS.md: PROMPT (BYTES [1]), MAX_TOKENS (INT32 [1], optional)
-> COMPLETION, PROMPT_TOKENS, COMPLETION_TOKENS[, CONFIDENCE]; ADAPTER (BYTES [1], optional: the LoRA adapter
of a shared-base model, a route's `adapter`) is sent only when the route names one. If a model
was configured with max_batch_size > 0, a leading batch dimension is added (learnt once per
model from /v2/models/{name}/config).

Decoupled models (the compiled LLM, `model_transaction_policy.decoupled`, also learnt from
the config) do not take KServe /infer: a whole answer comes from Triton's `generate`
endpoint (one response), a streamed one from `generate_stream` with STREAM true (server-sent
events, one per decoded piece, relayed by `stream()` as they arrive).

Why aiohttp and not httpx: this call is most of the gateway's own CPU per request. httpx
(pure-Python h11 parsing, anyio, a pool check and two socket writes per request) cost about
1 ms of CPU per call here; aiohttp parses in C and sends headers and body in one write.
The body is assembled from prebuilt bytes around the msgspec-encoded prompt, and the
response decoded by msgspec into the three outputs only.

Failures raise `UpstreamError` with the status the gateway should answer:
    connection refused / reset        -> 503 upstream_unavailable
    timeout                           -> 504 upstream_timeout
    model unknown / not ready         -> 503 model_unavailable
    model returned an error, bad body -> 502 upstream_error
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
from yarl import URL

OUTPUTS = ("COMPLETION", "PROMPT_TOKENS", "COMPLETION_TOKENS")

# loopback/cluster-local: compressing each answer costs Triton and the gateway CPU and saves
# nothing (aiohttp, like httpx, asks for gzip/deflate by default)
_HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
_encode = msgspec.json.encode


def _body_parts(shape: list[int]) -> tuple[bytes, bytes, bytes]:
    """The constant bytes of an infer body, around the prompt and MAX_TOKENS:
    prefix + prompt + [with_tokens + max_tokens] + suffix."""
    prompt_in = _encode({"name": "PROMPT", "shape": shape, "datatype": "BYTES", "data": []})
    tokens_in = _encode({"name": "MAX_TOKENS", "shape": shape, "datatype": "INT32", "data": []})
    outputs = _encode([{"name": n, "parameters": {"binary_data": False}} for n in OUTPUTS])
    prefix = b'{"inputs":[' + prompt_in[:-2]  # ...,"data":[
    with_tokens = b"]}," + tokens_in[:-2]
    suffix = b"]}],\"outputs\":" + outputs + b"}"
    return prefix, with_tokens, suffix


_PARTS = {False: _body_parts([1]), True: _body_parts([1, 1])}


def infer_body(prompt: str, max_tokens: int | None, batched: bool = False) -> bytes:
    """The KServe v2 JSON body for one prompt (what `TritonClient.complete` sends)."""
    prefix, with_tokens, suffix = _PARTS[batched]
    if max_tokens is None:
        return prefix + _encode(prompt) + suffix
    return prefix + _encode(prompt) + with_tokens + str(int(max_tokens)).encode() + suffix


class _Output(msgspec.Struct):
    name: str
    data: list[Any]


class _InferResponse(msgspec.Struct):
    outputs: list[_Output]


_decode_infer = msgspec.json.Decoder(_InferResponse).decode


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
    # the model's CONFIDENCE output (the compiled LLM's; None where a model has none)
    confidence: float | None = None


class TritonClient:
    """Create it inside the running event loop (the app's lifespan); `aclose()` on shutdown."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 2.0,
        max_connections: int = 64,
    ) -> None:
        self.base_url = f"http://{url}"
        self._base = URL(self.base_url)
        self._connect_timeout = connect_timeout_s
        self._timeout = self._make_timeout(timeout_s)
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {timeout_s: self._timeout}
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections),
            timeout=self._timeout,
            headers=_HEADERS,
            skip_auto_headers=("User-Agent",),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._info: dict[str, ModelInfo] = {}
        self._urls: dict[tuple[str, str], URL] = {}

    def _make_timeout(self, total_s: float) -> aiohttp.ClientTimeout:
        # total bounds the whole call (pool wait included); sock_connect the TCP connect alone
        return aiohttp.ClientTimeout(total=total_s, sock_connect=self._connect_timeout)

    def _timeout_for(self, timeout_s: float | None) -> aiohttp.ClientTimeout:
        if timeout_s is None:
            return self._timeout
        t = self._timeouts.get(timeout_s)
        if t is None:
            t = self._timeouts[timeout_s] = self._make_timeout(timeout_s)
        return t

    async def aclose(self) -> None:
        await self._session.close()

    def _url(self, model: str, suffix: str = "") -> URL:
        u = self._urls.get((model, suffix))
        if u is None:
            u = self._urls[(model, suffix)] = self._base.join(
                URL(f"/v2/models/{quote(model, safe='')}{suffix}", encoded=True))
        return u

    async def _get_status(self, url: URL, timeout_s: float) -> int | None:
        try:
            async with self._session.get(url, timeout=self._timeout_for(timeout_s)) as r:
                await r.read()
                return r.status
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def server_ready(self, timeout_s: float = 2.0) -> bool:
        return await self._get_status(self._base.join(URL("/v2/health/ready")), timeout_s) == 200

    async def model_ready(self, model: str, timeout_s: float = 2.0) -> bool:
        return await self._get_status(self._url(model, "/ready"), timeout_s) == 200

    async def _model_info(self, model: str) -> ModelInfo:
        info = self._info.get(model)
        if info is not None:
            return info
        try:
            async with self._session.get(self._url(model, "/config"), timeout=self._timeout_for(5.0)) as r:
                body = await r.read()
                status = r.status
            cfg = msgspec.json.decode(body) if status == 200 else {}
            info = ModelInfo(batched=int(cfg.get("max_batch_size", 0)) > 0,
                             decoupled=bool((cfg.get("model_transaction_policy") or {}).get("decoupled")))
        except (aiohttp.ClientError, TimeoutError, ValueError, TypeError, AttributeError, msgspec.MsgspecError):
            return ModelInfo()  # not cached: ask again next time
        if status == 200:
            self._info[model] = info
        return info

    async def _post(self, model: str, suffix: str, body: bytes, timeout_s: float | None) -> aiohttp.ClientResponse:
        """POST and return the open response if it is 200; else raise the mapped UpstreamError."""
        try:
            r = await self._session.post(self._url(model, suffix), data=body, timeout=self._timeout_for(timeout_s))
            if r.status == 200:
                return r
            detail = _error_text(await r.read())
            r.release()
        except TimeoutError as exc:  # aiohttp's ServerTimeoutError is a TimeoutError too
            raise UpstreamError(504, "upstream_timeout", f"Triton did not answer in time ({type(exc).__name__})") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(503, "upstream_unavailable", f"Triton is unreachable ({type(exc).__name__})") from exc
        self._info.pop(model, None)  # the model may have been reloaded with another config
        if r.status == 404 or (
            r.status in (400, 503) and any(w in detail for w in ("unknown model", "not found", "not ready", "unavailable"))
        ):
            raise UpstreamError(503, "model_unavailable", f"model {model} is not available on Triton")
        raise UpstreamError(502, "upstream_error", f"Triton returned {r.status}: {detail[:300]}")

    @staticmethod
    async def _read(r: aiohttp.ClientResponse) -> bytes:
        try:
            return await r.read()
        except TimeoutError as exc:
            raise UpstreamError(504, "upstream_timeout", f"Triton did not answer in time ({type(exc).__name__})") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(503, "upstream_unavailable", f"Triton is unreachable ({type(exc).__name__})") from exc
        finally:
            r.release()

    async def complete(
        self, model: str, prompt: str, max_tokens: int | None, timeout_s: float | None = None,
        adapter: str | None = None,
    ) -> Completion:
        info = await self._model_info(model)
        if info.decoupled:
            r = await self._post(model, "/generate", generate_body(prompt, max_tokens, False, adapter), timeout_s)
            return _completion(await self._read(r), _decode_generated)
        if adapter is not None:  # a shared base is always the decoupled compiled model
            raise UpstreamError(502, "upstream_error", f"model {model} is not decoupled; it takes no ADAPTER")
        r = await self._post(model, "/infer", infer_body(prompt, max_tokens, info.batched), timeout_s)
        return _completion(await self._read(r), _decode_infer_outputs)

    async def stream(
        self, model: str, prompt: str, max_tokens: int | None, timeout_s: float | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[Completion]:
        """Pieces of the answer as Triton produces them: (new text, prompt_tokens, completion
        tokens so far) each. Upstream failures before the first piece raise here, so the
        caller can still answer with a status; later ones raise while iterating. A model that
        is not decoupled gives its whole answer as one piece."""
        info = await self._model_info(model)
        if not info.decoupled:
            whole = await self.complete(model, prompt, max_tokens, timeout_s, adapter)
            return _one(whole)
        r = await self._post(model, "/generate_stream", generate_body(prompt, max_tokens, True, adapter), timeout_s)
        return self._events(r)

    async def _events(self, r: aiohttp.ClientResponse) -> AsyncIterator[Completion]:
        try:
            async for line in r.content:  # `data: {...}` lines, blank lines between events
                if not line.startswith(b"data:"):
                    continue
                yield _completion(line[5:], _decode_generated)
        except TimeoutError as exc:
            raise UpstreamError(504, "upstream_timeout", f"Triton did not finish in time ({type(exc).__name__})") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(503, "upstream_unavailable", f"Triton stream broke ({type(exc).__name__})") from exc
        finally:
            r.close()  # also when the client went away mid-stream: drop the connection to Triton


async def _one(c: Completion) -> AsyncIterator[Completion]:
    yield c


@dataclass(frozen=True)
class ModelInfo:
    batched: bool = False
    decoupled: bool = False


def generate_body(prompt: str, max_tokens: int | None, stream: bool, adapter: str | None = None) -> bytes:
    """The body of Triton's generate endpoints: inputs by name (scalars become [1] tensors)."""
    body: dict[str, Any] = {"PROMPT": prompt, "STREAM": stream}
    if max_tokens is not None:
        body["MAX_TOKENS"] = int(max_tokens)
    if adapter is not None:
        body["ADAPTER"] = adapter
    return _encode(body)


class _Generated(msgspec.Struct):
    COMPLETION: str | None = None
    PROMPT_TOKENS: int = 0
    COMPLETION_TOKENS: int = 0
    CONFIDENCE: float | None = None
    error: str | None = None


def _decode_generated(body: bytes) -> dict[str, list[Any]]:
    g = msgspec.json.decode(body, type=_Generated)
    if g.error is not None:
        raise UpstreamError(502, "upstream_error", f"Triton returned an error: {g.error[:300]}")
    return {"COMPLETION": [g.COMPLETION], "PROMPT_TOKENS": [g.PROMPT_TOKENS], "COMPLETION_TOKENS": [g.COMPLETION_TOKENS],
            "CONFIDENCE": [g.CONFIDENCE]}


def _decode_infer_outputs(body: bytes) -> dict[str, list[Any]]:
    return {o.name: o.data for o in _decode_infer(body).outputs}


def _completion(body: bytes, decode: Any) -> Completion:
    try:
        outputs = decode(body)
        text = outputs["COMPLETION"][0]
        if text is None:
            raise KeyError("COMPLETION")
        return Completion(
            text=text if isinstance(text, str) else str(text),
            prompt_tokens=int(outputs.get("PROMPT_TOKENS", [0])[0]),
            completion_tokens=int(outputs.get("COMPLETION_TOKENS", [0])[0]),
            confidence=_confidence(outputs.get("CONFIDENCE", [None])[0]),
        )
    except (msgspec.MsgspecError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise UpstreamError(502, "upstream_error", f"unexpected Triton response ({type(exc).__name__})") from exc


def _confidence(value: Any) -> float | None:
    """A CONFIDENCE output as logged: a probability rounded to 6 places, else None."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return round(v, 6) if 0.0 <= v <= 1.0 else None


def _error_text(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace")
    try:
        data = msgspec.json.decode(body)
    except msgspec.MsgspecError:
        return text
    return str(data.get("error", text)) if isinstance(data, dict) else text
