"""The inference gateway application: OpenAI API in front, Triton behind.

    POST /v1/completions        OpenAI completions (non-streaming), routed to the live colour,
                                optionally mirrored to the shadow colour
    GET  /v1/models[/{id}]      the served model id (while a live colour is set)
    GET  /version               registry facts of the live route
    GET  /health/live           process is up
    GET  /health/ready          503 until a live colour is set and Triton reports it ready
    GET  /metrics               Prometheus
    GET  /admin/routes          routing state            (admin bearer token)
    PUT  /admin/routes          replace it               (admin; If-Match: <generation>; ?force)
    POST /admin/switch          shadow -> live, live -> previous   (admin; ?colour=, ?force)
    POST /admin/rollback        previous -> live, live -> previous (admin; ?force)

Every non-2xx body is OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`.
The application log never carries prompts, completions or credentials.

Slots for the follow-up issue: client API keys -> `authenticate_client`; rate limits -> a
dependency beside it; canary -> `routing.select`; chat + streaming -> new handlers reusing
`_route`, `Gateway.triton` and the log/mirror plumbing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.gateway import routing
from serving.gateway.auth import AdminAuth, load_or_create_token
from serving.gateway.errors import (
    OpenAIError,
    bad_request,
    conflict,
    model_not_found,
    no_live_route,
)
from serving.gateway.inference_log import InferenceLogWriter
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.mirror import Mirror, ShadowJob
from serving.gateway.routing import RouteStore, RoutesUpdate, RoutingState
from serving.gateway.settings import GatewaySettings
from serving.gateway.triton import TritonClient, UpstreamError
from tuneship.inference_log import format_ts, parse_ts, utcnow

log = logging.getLogger("tuneship.gateway")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


# -- request / response models ---------------------------------------------------------------
class CompletionRequest(BaseModel):
    """OpenAI's /v1/completions body. Unknown fields are ignored; sampling knobs are accepted
    and ignored (the served models decode greedily)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[str]
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int | None = None
    stream: bool | None = None
    stop: str | list[str] | None = None
    echo: bool | None = None
    logprobs: int | None = None
    seed: int | None = None
    user: str | None = None


@dataclass
class Gateway:
    """Per-process state hung off app.state.gw."""

    settings: GatewaySettings
    store: RouteStore
    admin: AdminAuth
    metrics: GatewayMetrics
    triton: TritonClient | None = None
    writer: InferenceLogWriter | None = None
    mirror: Mirror | None = None


def _gw(request: Request) -> Gateway:
    return request.app.state.gw


async def authenticate_client(request: Request) -> str | None:
    """Client identity for /v1/*. The walking skeleton accepts any (or no) API key; the
    follow-up issue validates keys here and returns the principal (for rate limits/logs)."""
    return None


def require_admin(request: Request) -> None:
    _gw(request).admin.check(request)


# -- app factory -----------------------------------------------------------------------------
def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    token = settings.admin_token or load_or_create_token(settings.admin_token_path)
    gw = Gateway(
        settings=settings,
        store=RouteStore(settings.routes_path, settings.default_served_model, writer_id=settings.replica_id,
                         default_mirror_sample=settings.mirror_sample),
        admin=AdminAuth(token),
        metrics=GatewayMetrics(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw.triton = TritonClient(
            settings.triton_url, settings.triton_timeout_s, settings.triton_connect_timeout_s,
            settings.triton_max_connections,
        )
        gw.writer = InferenceLogWriter(settings.log_root, settings.replica_id, settings.log_queue_size, gw.metrics)
        gw.writer.start()
        gw.mirror = Mirror(gw.triton, gw.writer, gw.metrics, settings.replica_id,
                           settings.shadow_queue_size, settings.shadow_workers, settings.shadow_timeout_s)
        gw.mirror.start()
        state = gw.store.current()
        log.info("gateway %s up: triton=%s routes=%s generation=%s live=%s",
                 settings.replica_id, settings.triton_url, settings.routes_path, state.generation,
                 state.live.colour if state.live else None)
        try:
            yield
        finally:
            await gw.mirror.close(settings.shadow_drain_s)
            await asyncio.to_thread(gw.writer.close)
            await gw.triton.aclose()
            log.info("gateway %s stopped; inference log flushed", settings.replica_id)

    app = FastAPI(title="Tuneship inference gateway", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.gw = gw
    _install_error_handlers(app)
    _install_routes(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith("/v1/"):  # rejected before the handler: count it here
            m = _gw(request).metrics
            m.requests.labels(request.url.path, "none", "none", "400").inc()
            m.latency.labels("none", "none", "400").observe(0.0)
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return bad_request(
                "We could not parse the JSON body of your request. Make sure the body is valid "
                "JSON and the Content-Type is application/json.", code="invalid_json",
            ).response()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
        # Union types add the member name to loc ("prompt", "str"); keep the field name.
        param = loc[0] if loc else None
        msg = first.get("msg", "Invalid request.")
        if first.get("type") == "missing":
            msg = f"Missing required parameter: '{param}'."
        elif param:
            msg = f"Invalid value for '{param}': {msg}"
        return bad_request(msg, param=param, code="invalid_value" if first.get("type") != "missing" else "missing_required_parameter").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return OpenAIError(exc.status_code, str(exc.detail), kind, code=code,
                           headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return OpenAIError(500, "The gateway had an internal error.", "server_error", code="internal_error").response()


def _install_routes(app: FastAPI) -> None:
    # -- OpenAI ---------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(
        body: CompletionRequest,
        request: Request,
        principal: Annotated[str | None, Depends(authenticate_client)],
    ) -> JSONResponse:
        gw = _gw(request)
        return await _complete(gw, body, request)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        state = _gw(request).store.current()
        return {"object": "list", "data": [_model_card(state)] if state.live else []}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        state = _gw(request).store.current()
        if state.live is None or model_id != state.served_model:
            raise model_not_found(model_id)
        return _model_card(state)

    # -- operations -----------------------------------------------------------------------
    @app.get("/version")
    async def version(request: Request) -> dict[str, Any]:
        gw = _gw(request)
        state = gw.store.current()
        live = state.live
        return {
            "served_model": state.served_model,
            "model": (live.registered_model or live.model) if live else None,
            "version": live.version if live else None,
            "colour": live.colour if live else None,
            "triton_model": live.model if live else None,
            "adapter_sha256": live.adapter_sha256 if live else None,
            "deployed_at": live.deployed_at if live else None,
            "metadata": live.metadata if live else {},
            "shadow": {"colour": state.shadow.colour, "version": state.shadow.version} if state.shadow else None,
            "generation": state.generation,
            "replica": gw.settings.replica_id,
        }

    @app.get("/health/live")
    async def health_live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready")
    async def health_ready(request: Request) -> JSONResponse:
        gw = _gw(request)
        state = gw.store.current()
        if state.live is None:
            return JSONResponse({"status": "not_ready", "reason": "no live route"}, status_code=503)
        assert gw.triton is not None
        if not await gw.triton.model_ready(state.live.model, gw.settings.ready_timeout_s):
            return JSONResponse({"status": "not_ready", "reason": f"model {state.live.model} not ready on Triton",
                                 "colour": state.live.colour}, status_code=503)
        return JSONResponse({"status": "ready", "colour": state.live.colour, "model": state.live.model,
                             "generation": state.generation})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        gw = _gw(request)
        gw.metrics.route_generation.set(gw.store.current().generation)
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- admin ----------------------------------------------------------------------------
    admin = [Depends(require_admin)]

    @app.get("/admin/routes", dependencies=admin)
    async def get_routes(request: Request) -> dict[str, Any]:
        return _gw(request).store.current().model_dump(mode="json")

    @app.put("/admin/routes", dependencies=admin)
    async def put_routes(
        update: RoutesUpdate,
        request: Request,
        force: bool = False,
        if_match: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        gw = _gw(request)
        expected = _expected_generation(if_match, update.generation)
        if update.live is not None and not force:
            await _require_ready(gw, update.live)
        new = await _update(gw, update.apply, expected)
        log.info("routes replaced (generation %s): live=%s shadow=%s sample=%s", new.generation,
                 _label(new.live), _label(new.shadow), new.mirror_sample)
        return new.model_dump(mode="json")

    @app.post("/admin/switch", dependencies=admin)
    async def switch(
        request: Request,
        colour: str | None = Query(default=None, description="guard: the colour expected to go live"),
        force: bool = False,
        if_match: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        gw = _gw(request)
        snap = gw.store.current()
        if snap.shadow is None:
            raise conflict("No shadow/candidate colour to switch to.", code="no_candidate")
        if colour is not None and colour != snap.shadow.colour:
            raise conflict(f"The candidate colour is {snap.shadow.colour}, not {colour}.", code="colour_mismatch")
        if not force:
            await _require_ready(gw, snap.shadow)
        expected = _expected_generation(if_match, None)
        new = await _update(gw, routing.switch, snap.generation if expected is None else expected)
        log.info("switched (generation %s): live %s -> %s", new.generation, _label(new.previous), _label(new.live))
        return new.model_dump(mode="json")

    @app.post("/admin/rollback", dependencies=admin)
    async def rollback(
        request: Request,
        force: bool = False,
        if_match: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        gw = _gw(request)
        snap = gw.store.current()
        if snap.previous is None:
            raise conflict("No previous colour to roll back to.", code="no_previous")
        if not force:
            await _require_ready(gw, snap.previous)
        expected = _expected_generation(if_match, None)
        new = await _update(gw, routing.rollback, snap.generation if expected is None else expected)
        log.warning("rolled back (generation %s): live %s -> %s", new.generation, _label(new.previous), _label(new.live))
        return new.model_dump(mode="json")


# -- helpers ---------------------------------------------------------------------------------
def _label(route: routing.Route | None) -> str | None:
    return f"{route.colour}({route.model} v{route.version})" if route else None


def _model_card(state: RoutingState) -> dict[str, Any]:
    created = 0
    if state.live and state.live.deployed_at:
        try:
            created = int(parse_ts(state.live.deployed_at).timestamp())
        except ValueError:
            pass
    return {"id": state.served_model, "object": "model", "created": created, "owned_by": "tuneship"}


def _expected_generation(if_match: str | None, body_generation: int | None) -> int | None:
    if if_match is not None:
        try:
            return int(if_match.strip().strip('"').removeprefix("W/").strip('"'))
        except ValueError:
            raise bad_request("If-Match must be the routes generation (an integer).", param="If-Match") from None
    return body_generation


async def _require_ready(gw: Gateway, route: routing.Route) -> None:
    assert gw.triton is not None
    if not await gw.triton.model_ready(route.model, gw.settings.ready_timeout_s):
        raise conflict(f"Triton model {route.model} ({route.colour}) is not ready; load it first or pass force=true.",
                       code="model_not_ready")


async def _update(gw: Gateway, change: Any, expected: int | None) -> RoutingState:
    try:
        return await asyncio.to_thread(gw.store.update, change, expected)
    except routing.ConcurrentUpdate as exc:
        raise conflict(f"{exc}; re-read the routes and retry.", code="generation_mismatch") from None
    except routing.InvalidTransition as exc:
        raise conflict(str(exc)) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        raise bad_request(f"Invalid routing state: {first.get('msg')}",
                          param=".".join(str(p) for p in first.get("loc", ())) or None) from None


def _client_request_id(request: Request) -> str | None:
    """A caller's X-Request-ID is logged for tracing but never used as the join key: the
    gateway's own id must be unique for the live/shadow join in the inference log."""
    rid = request.headers.get("x-request-id", "")
    return rid if _REQUEST_ID.match(rid) else None


async def _complete(gw: Gateway, body: CompletionRequest, request: Request) -> JSONResponse:
    t0 = time.perf_counter()
    ts = utcnow()
    rid = uuid.uuid4().hex
    client_rid = _client_request_id(request)
    endpoint = "/v1/completions"
    s = gw.settings
    state = gw.store.current()
    colour, tmodel, status = "none", "none", 500
    try:
        # -- validation that needs no upstream ------------------------------------------------
        if body.model != state.served_model:
            raise model_not_found(body.model)
        prompt = _one_prompt(body.prompt)
        if len(prompt) > s.max_prompt_chars:
            raise bad_request(f"The prompt is longer than {s.max_prompt_chars} characters.", param="prompt",
                              code="context_length_exceeded")
        max_tokens = s.default_max_tokens if body.max_tokens is None else body.max_tokens
        if not 1 <= max_tokens <= s.max_tokens_limit:
            raise bad_request(f"max_tokens must be between 1 and {s.max_tokens_limit}.", param="max_tokens")
        if body.n not in (None, 1):
            raise bad_request("Only n=1 is supported.", param="n")
        if body.stream:
            raise bad_request("Streaming is not supported on /v1/completions yet.", param="stream")

        target = request.headers.get("x-tuneship-target")
        if target:
            # An admin pinning one loaded colour (release smoke tests before traffic moves):
            # answered by `llm_<colour>`, never mirrored, kept out of the inference log.
            gw.admin.check(request)
            live, shadow = routing.Route(colour=target, model=f"llm_{target}"), None
        else:
            live, shadow = routing.select(state, rid)
        if live is None:
            raise no_live_route()
        colour, tmodel = live.colour, live.model

        def mirror() -> dict[str, Any] | None:
            # Offered once the live answer is in, so the copy never competes with the live call
            # of the same request (the gateway and Triton share CPUs); never awaited.
            if shadow is None or gw.mirror is None:
                return None
            sent = gw.mirror.offer(ShadowJob(rid, ts, shadow, prompt, max_tokens))
            return {"colour": shadow.colour, "version": shadow.version, "model": shadow.model,
                    "status": "pending" if sent else "dropped"}

        assert gw.triton is not None
        u0 = time.perf_counter()
        try:
            c = await gw.triton.complete(live.model, prompt, max_tokens)
        except UpstreamError as exc:
            status = exc.status
            if not target:
                _log_request(gw, ts, rid, client_rid, endpoint, body.model, prompt, max_tokens, live, None,
                             status, time.perf_counter() - t0, mirror(), None, exc.code)
            raise OpenAIError(exc.status, f"The {live.colour} model failed to answer: {exc.message}",
                              "server_error", code=exc.code) from None
        finally:
            gw.metrics.upstream_latency.labels("live", live.model).observe(time.perf_counter() - u0)
        shadow_entry = mirror()

        status = 200
        latency = time.perf_counter() - t0
        if not target:
            _log_request(gw, ts, rid, client_rid, endpoint, body.model, prompt, max_tokens, live, c.text, status,
                         latency, shadow_entry, c, None)
        payload = {
            "id": f"cmpl-{rid}",
            "object": "text_completion",
            "created": int(ts.timestamp()),
            "model": state.served_model,
            "system_fingerprint": f"{live.colour}-{live.version}" if live.version else live.colour,
            "choices": [{
                "text": c.text,
                "index": 0,
                "logprobs": None,
                "finish_reason": "length" if c.completion_tokens >= max_tokens else "stop",
            }],
            "usage": {
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens,
            },
        }
        return JSONResponse(payload, headers={"x-request-id": rid, "x-tuneship-colour": live.colour})
    except OpenAIError as exc:
        status = exc.status
        exc.headers = {**(exc.headers or {}), "x-request-id": rid}
        raise
    finally:
        elapsed = time.perf_counter() - t0
        gw.metrics.requests.labels(endpoint, colour, tmodel, str(status)).inc()
        gw.metrics.latency.labels(colour, tmodel, str(status)).observe(elapsed)


def _one_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_request("Exactly one prompt per request is supported (a string or a list of one).",
                              param="prompt")
        return prompt[0]
    return prompt


def _log_request(
    gw: Gateway, ts: datetime, rid: str, client_rid: str | None, endpoint: str, model: str, prompt: str, max_tokens: int,
    live: routing.Route, completion: str | None, status: int, latency_s: float,
    shadow: dict[str, Any] | None, c: Any, error: str | None,
) -> None:
    assert gw.writer is not None
    live_entry: dict[str, Any] = {
        "colour": live.colour, "version": live.version, "model": live.model,
        "completion": completion, "latency_ms": round(latency_s * 1000, 3), "status": status,
    }
    if error:
        live_entry["error"] = error
    gw.writer.submit(ts, {
        "kind": "request",
        "ts": format_ts(ts),
        "request_id": rid,
        "client_request_id": client_rid,
        "replica": gw.settings.replica_id,
        "endpoint": endpoint,
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "live": live_entry,
        "shadow": shadow,
        "prompt_tokens": c.prompt_tokens if c else None,
        "completion_tokens": c.completion_tokens if c else None,
    })

