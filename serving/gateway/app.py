"""The inference gateway application: OpenAI API in front, Triton behind.

    POST /v1/completions        OpenAI completions (stream: true as server-sent events)
    POST /v1/chat/completions   OpenAI chat; messages -> prompt as training rendered chat rows
                                (serving.gateway.chat); stream: true as server-sent events
    GET  /v1/models[/{id}]      every served model that has a live colour
    POST /v1/feedback           {"request_id", "rating"?, "task_success"?, "comment"?}: a client's
                                verdict on one answer, as a `feedback` line in the inference log (202)
    GET  /version               registry facts of each served model's live route (?model=: one)
    GET  /health/live           process is up
    GET  /health/ready          per served model; 503 until some model has a live colour and every
                                live colour is ready on Triton (?model=: that model alone)
    GET  /metrics               Prometheus
    GET  /admin/routes          a served model's routing state      (admin bearer token; ?model=)
    PUT  /admin/routes          replace it; creates the model's routes (admin; ?model=, If-Match, ?force)
    POST /admin/switch          shadow -> live, live -> previous   (admin; ?model=, ?colour=, ?force)
    POST /admin/rollback        previous -> live, live -> previous (admin; ?model=, ?force)
    POST /admin/canary          {"weight": 0-100}: share of traffic the candidate answers (admin; ?model=)
    GET  /admin/keys            client keys: ids, names, limits, state (admin; never digests)
    POST /admin/keys            {"name", "rpm", "burst"}: create one; the key is in this answer only (admin)
    DELETE /admin/keys/{id}     revoke (disable) a key; 404 if there is no such id (admin)

Several served models (one per task) sit side by side, each with its own routes file
(`serving.gateway.routing.RouteRegistry`), blue/green colours, metrics label and
inference-log partition. The request's `model` (required, as in OpenAI's API: 400 when
missing) picks the served model; an unknown one is a 404 `model_not_found` naming the
served models. The admin endpoints take `?model=`: required once two or more served models
have routes; with exactly one it defaults to it, with none to `default_served_model`.

An inference request goes: body size limit (413, `bodylimit`) -> client key (401) -> the
key's rate limit (429 + Retry-After) -> JSON body (400) -> model (404), prompt and
max_tokens limits (400) -> routing (live, or the candidate for the canary share; mirrored
to the shadow) -> Triton -> inference log (optionally PII-redacted) -> JSON or SSE.

Streaming is real: the compiled model is decoupled, so Triton's generate_stream endpoint
sends each decoded piece as it is generated and the gateway relays it as an OpenAI chunk
at once (time to first token is one decoding step, not the whole answer). Upstream
failures before the first piece still get a status code; a failure mid-stream ends the
stream with an OpenAI error event. A model that is not decoupled answers whole, then in
word-sized chunks. The inference log gets the whole answer when the stream ends.

Every non-2xx body is OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`.
The application log never carries prompts, completions or credentials.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.gateway import chat, routing
from serving.gateway.auth import AdminAuth, ClientAuth, load_or_create_token
from serving.gateway.bodylimit import BodySizeLimit, BodyTooLarge
from serving.gateway.errors import (
    OpenAIError,
    bad_request,
    conflict,
    model_not_found,
    no_live_route,
    rate_limited,
    too_large,
)
from serving.gateway.inference_log import InferenceLogWriter
from serving.gateway.keys import DEFAULT_RPM, ClientKey, KeyStore
from serving.gateway.metrics import GatewayMetrics, Prices, route_events
from serving.gateway.mirror import Mirror, ShadowJob
from serving.gateway.ratelimit import TokenBuckets
from serving.gateway.routing import RouteRegistry, RoutesUpdate, RoutingState, check_served_model
from serving.gateway.settings import GatewaySettings
from serving.gateway.triton import Completion, TritonClient, UpstreamError
from tuneship.inference_log import format_ts, parse_ts, utcnow

log = logging.getLogger("tuneship.gateway")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_INFERENCE = ("/v1/completions", "/v1/chat/completions")


# -- request / response models ---------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = None


class _GenerationRequest(BaseModel):
    """The fields both OpenAI endpoints share. Unknown fields are ignored; sampling knobs are
    accepted and ignored (the served models decode greedily)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None


class CompletionRequest(_GenerationRequest):
    """OpenAI's /v1/completions body."""

    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        if isinstance(self.content, list):
            if any(p.type != "text" or p.text is None for p in self.content):
                raise bad_request("Only text content parts are supported.", param="messages")
            text = "".join(p.text or "" for p in self.content)
        else:
            text = self.content or ""
        return {"role": self.role, "content": text}


FEEDBACK_COMMENT_MAX = 2000
# The gateway's request ids (uuid4 hex), bare as in `x-request-id` or as the completion's `id`.
_FEEDBACK_RID = re.compile(r"^(?:chatcmpl-|cmpl-)?([0-9a-f]{32})$")


class FeedbackRequest(BaseModel):
    """POST /v1/feedback. `request_id` takes what a client has: the completion's `id`
    (`chatcmpl-<id>` / `cmpl-<id>`, what the `openai` SDK returns) or the bare id of the
    `x-request-id` response header; both are logged as the bare id. `model` picks the served
    model's log partition: needed only when several served models have routes (the
    completion's `model`). Strict types: "5" is not a rating, 1 is not `true`."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    rating: int | None = Field(default=None, ge=1, le=5, strict=True)
    task_success: bool | None = Field(default=None, strict=True)
    comment: str | None = Field(default=None, max_length=FEEDBACK_COMMENT_MAX)
    model: str | None = None

    @field_validator("request_id")
    @classmethod
    def _gateway_request_id(cls, value: str) -> str:
        m = _FEEDBACK_RID.match(value.strip())
        if m is None:
            raise ValueError("not a request id this gateway issued: send the completion's `id` "
                             "(chatcmpl-<32 hex>) or the `x-request-id` response header (32 hex)")
        return m.group(1)

    @field_validator("comment")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return value.strip() or None


class ChatCompletionRequest(_GenerationRequest):
    """OpenAI's /v1/chat/completions body (text only; tools and n > 1 are refused)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


@dataclass
class Gateway:
    """Per-process state hung off app.state.gw."""

    settings: GatewaySettings
    routes: RouteRegistry
    admin: AdminAuth
    clients: ClientAuth
    metrics: GatewayMetrics
    buckets: TokenBuckets = field(default_factory=TokenBuckets)
    triton: TritonClient | None = None
    writer: InferenceLogWriter | None = None
    mirror: Mirror | None = None
    redactor: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # PII redaction, when on
    prices: Prices = field(default_factory=Prices)  # declared USD per instance-hour (cost metrics)
    default_chat_template: str | None = None
    _templates: dict[tuple[str, str], chat.ChatTemplate] = field(default_factory=dict)

    def chat_template(self, route: routing.Route) -> chat.ChatTemplate:
        text = route.metadata.get("chat_template") or self.default_chat_template or chat.default_template()
        bos = str(route.metadata.get("bos_token", self.settings.chat_bos_token))
        tpl = self._templates.get((text, bos))
        if tpl is None:
            tpl = self._templates[(text, bos)] = chat.ChatTemplate(text, bos, self.settings.chat_eos_token)
        return tpl


class FastJSONResponse(JSONResponse):
    """JSONResponse encoded by msgspec: the same compact UTF-8 JSON as Starlette's
    `json.dumps`, for a fraction of the CPU (inference answers only; they hold no NaN)."""

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


def _gw(request: Request) -> Gateway:
    return request.app.state.gw


def authenticate_client(request: Request) -> ClientKey | None:
    """The client key for /v1/* (None while keys are not enforced); 401 otherwise. Also
    applies the key's rate limit (429 with Retry-After)."""
    gw = _gw(request)
    key = gw.clients.check(request)
    if key is not None:
        wait = gw.buckets.acquire(key.id, key.rpm, key.burst)
        if wait is not None:
            gw.metrics.child(gw.metrics.rate_limited, key.id).inc()
            raise rate_limited(key.id, key.rpm, wait)
    return key


def require_admin(request: Request) -> None:
    _gw(request).admin.check(request)


def require_client(request: Request) -> None:
    """Key check without rate limiting (model listing)."""
    _gw(request).clients.check(request)


# -- app factory -----------------------------------------------------------------------------
def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    token = settings.admin_token or load_or_create_token(settings.admin_token_path)
    gw = Gateway(
        settings=settings,
        routes=RouteRegistry(settings.routes_dir, writer_id=settings.replica_id,
                             default_mirror_sample=settings.mirror_sample, legacy_path=settings.legacy_routes_path),
        admin=AdminAuth(token),
        clients=ClientAuth(KeyStore(settings.api_keys_path), settings.client_auth),
        metrics=GatewayMetrics(settings.monitor_root),
        prices=Prices.from_task_files(),
        default_chat_template=settings.chat_template_path.read_text() if settings.chat_template_path else None,
    )
    redactor = None
    if settings.redact_pii:
        from serving.gateway.pii import RecordRedactor

        redactor = RecordRedactor(settings.redact_pii_kinds, settings.redact_pii_phone_regions)
    gw.redactor = redactor

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw.triton = TritonClient(
            settings.triton_url, settings.triton_timeout_s, settings.triton_connect_timeout_s,
            settings.triton_max_connections,
        )
        gw.writer = InferenceLogWriter(settings.log_root, settings.replica_id, settings.log_queue_size, gw.metrics,
                                       transform=redactor)
        gw.writer.start()
        gw.mirror = Mirror(gw.triton, gw.writer, gw.metrics, settings.replica_id,
                           lambda name: gw.routes.current(name).shadow,
                           settings.shadow_queue_size, settings.shadow_workers, settings.shadow_timeout_s)
        gw.mirror.start()
        served = {name: f"{st.live.colour if st.live else None}@{st.generation}"
                  for name, st in gw.routes.states().items()}
        log.info("gateway %s up: triton=%s routes=%s served models (live@generation)=%s client_keys=%s "
                 "pii_redaction=%s", settings.replica_id, settings.triton_url, settings.routes_dir, served or "none yet",
                 "enforced" if gw.clients.enforced() else "not enforced (no keys issued yet)", settings.redact_pii)
        if not gw.clients.enforced():
            log.warning("no client API keys exist in %s: /v1 is open until the first key is created "
                        "(tuneship keys create, or python -m serving.gateway.keys create) or client_auth=required", settings.api_keys_path)
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

    def count_rejected(path: str) -> None:
        if path in _INFERENCE:
            gw.metrics.requests.labels("none", path, "none", "none", "413", "none").inc()

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, on_reject=count_rejected)
    _install_error_handlers(app)
    _install_routes(app)
    return app


def __getattr__(name: str) -> Any:
    # `uvicorn serving.gateway.app:app` (the container's CMD): build the app from the environment on first use.
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith("/v1/"):  # rejected before the handler: count it here
            m = _gw(request).metrics
            m.requests.labels("none", request.url.path, "none", "none", "400", "none").inc()
            m.latency.labels("none", "none", "none", "400").observe(0.0)
        return _validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return OpenAIError(exc.status_code, str(exc.detail), kind, code=code,
                           headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return OpenAIError(500, "The gateway had an internal error.", "server_error", code="internal_error").response()


def _validation_error(errors: Any) -> OpenAIError:
    if any(e.get("type") == "json_invalid" for e in errors):
        return bad_request(
            "We could not parse the JSON body of your request. Make sure the body is valid "
            "JSON and the Content-Type is application/json.", code="invalid_json",
        )
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # Union types add the member name to loc ("prompt", "str"); keep the field name.
    param = loc[0] if loc else None
    msg = first.get("msg", "Invalid request.")
    if first.get("type") == "missing":
        msg = f"Missing required parameter: '{param}'."
    elif param:
        msg = f"Invalid value for '{param}': {msg}"
    return bad_request(msg, param=param, code="invalid_value" if first.get("type") != "missing" else "missing_required_parameter")


def _install_routes(app: FastAPI) -> None:
    # -- OpenAI ---------------------------------------------------------------------------
    # The two inference endpoints are plain Starlette routes (same middleware and exception
    # handlers): they parse their own body, so FastAPI's per-request dependency solving and
    # response handling would be pure overhead on the hot path.
    async def completions(request: Request) -> Response:
        return await _inference(_gw(request), request, "/v1/completions")

    async def chat_completions(request: Request) -> Response:
        return await _inference(_gw(request), request, "/v1/chat/completions")

    app.add_route("/v1/completions", completions, methods=["POST"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])

    @app.post("/v1/feedback", status_code=202)
    async def feedback(request: Request, key: Annotated[ClientKey | None, Depends(authenticate_client)]) -> JSONResponse:
        """A client's verdict on one answer: client key (401) -> rate limit (429) -> body
        (400, naming the field) -> served model (404) -> a `kind: feedback` line through the
        inference-log writer (503 if its buffer is full) -> 202 with what was recorded."""
        return await _feedback(_gw(request), request, key)

    @app.get("/v1/models", dependencies=[Depends(require_client)])
    async def list_models(request: Request) -> dict[str, Any]:
        states = _gw(request).routes.states()
        return {"object": "list", "data": [_model_card(st) for st in states.values() if st.live]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(require_client)])
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        gw = _gw(request)
        store = gw.routes.get(model_id)
        state = store.current() if store is not None else None
        if state is None or state.live is None:
            raise model_not_found(model_id, _served_names(gw))
        return _model_card(state)

    # -- operations -----------------------------------------------------------------------
    @app.get("/version")
    async def version(request: Request, model: str | None = None) -> dict[str, Any]:
        """Every served model's live facts under `served_models`; the selected model's (the
        one named by ?model=, or the only one) also at the top level, as before several
        models existed."""
        gw = _gw(request)
        states = gw.routes.states()
        out: dict[str, Any] = {"replica": gw.settings.replica_id,
                               "served_models": {name: _version(st) for name, st in states.items()}}
        if model is not None:
            if model not in states:
                raise model_not_found(model, list(states))
            out.update(_version(states[model]))
        elif len(states) <= 1:
            out.update(_version(next(iter(states.values()), None)
                                or gw.routes.current(gw.settings.default_served_model)))
        return out

    @app.get("/health/live")
    async def health_live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready")
    async def health_ready(request: Request, model: str | None = None) -> JSONResponse:
        """Ready (200) when at least one served model has a live colour and every live colour
        is ready on Triton. A model with routes but no live colour yet (its first release in
        progress) is reported, not counted: it must not take the other models' traffic out of
        the load balancer. `?model=`: that model alone (503 without a ready live colour)."""
        gw = _gw(request)
        states = gw.routes.states()
        if model is not None:
            if model not in states:
                raise model_not_found(model, list(states))
            states = {model: states[model]}
        assert gw.triton is not None
        live = {name: st for name, st in states.items() if st.live is not None}
        ready = await asyncio.gather(*(gw.triton.model_ready(st.live.model, gw.settings.ready_timeout_s)
                                       for st in live.values() if st.live is not None))
        per_model: dict[str, dict[str, Any]] = {}
        for name, st in states.items():
            if st.live is None:
                per_model[name] = {"status": "no_live_route", "generation": st.generation}
        for (name, st), ok in zip(live.items(), ready, strict=True):
            assert st.live is not None
            entry: dict[str, Any] = {"status": "ready" if ok else "not_ready", "colour": st.live.colour,
                                     "model": st.live.model, "generation": st.generation}
            if not ok:
                entry["reason"] = f"model {st.live.model} not ready on Triton"
            per_model[name] = entry
        body: dict[str, Any] = {"status": "ready", "models": dict(sorted(per_model.items()))}
        if not live:
            body.update(status="not_ready", reason="no live route")
        elif not all(ready):
            body.update(status="not_ready", reason="; ".join(
                f"{name}: {e['reason']}" for name, e in body["models"].items() if e["status"] == "not_ready"))
        if len(per_model) == 1:  # one served model: its facts at the top level too (as before)
            only = next(iter(per_model.values()))
            body.update({k: v for k, v in only.items() if k in ("colour", "model", "generation")})
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        gw = _gw(request)
        gw.metrics.observe_routes(gw.routes.states(), gw.prices)
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- admin ----------------------------------------------------------------------------
    admin = [Depends(require_admin)]
    model_query = Query(default=None, description="the served model; required when several have routes")

    @app.get("/admin/routes", dependencies=admin)
    async def get_routes(request: Request, model: str | None = model_query) -> dict[str, Any]:
        """A served model with no routes file yet reads as the empty state (generation 0),
        so GET, edit, PUT creates it."""
        gw = _gw(request)
        return gw.routes.current(_admin_model(gw, model)).model_dump(mode="json")

    @app.put("/admin/routes", dependencies=admin)
    async def put_routes(
        update: RoutesUpdate,
        request: Request,
        model: str | None = model_query,
        force: bool = False,
        if_match: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        gw = _gw(request)
        name = _admin_model(gw, model if model is not None else update.served_model)
        if update.served_model is not None and update.served_model != name:
            raise bad_request(f"The body's served_model {update.served_model!r} is not the model these routes "
                              f"belong to ({name!r}); a served model cannot be renamed.", param="served_model")
        expected = _expected_generation(if_match, update.generation)
        if update.live is not None and not force:
            await _require_ready(gw, update.live)
        if update.canary_weight and update.shadow is not None and not force:
            await _require_ready(gw, update.shadow)
        replaced: list[RoutingState] = []

        def change(current: RoutingState) -> RoutingState:
            replaced.append(current)
            return update.apply(current)

        new = await _update(gw, name, change, expected)
        _count_events(gw, name, route_events(replaced[-1], new))
        log.info("routes of %s replaced (generation %s): live=%s shadow=%s sample=%s", name, new.generation,
                 _label(new.live), _label(new.shadow), new.mirror_sample)
        return new.model_dump(mode="json")

    @app.post("/admin/switch", dependencies=admin)
    async def switch(
        request: Request,
        model: str | None = model_query,
        colour: str | None = Query(default=None, description="guard: the colour expected to go live"),
        force: bool = False,
        if_match: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        gw = _gw(request)
        name = _admin_model(gw, model, existing=True)
        snap = gw.routes.current(name)
        if snap.shadow is None:
            raise conflict("No shadow/candidate colour to switch to.", code="no_candidate")
        if colour is not None and colour != snap.shadow.colour:
            raise conflict(f"The candidate colour is {snap.shadow.colour}, not {colour}.", code="colour_mismatch")
        if not force:
            await _require_ready(gw, snap.shadow)
        expected = _expected_generation(if_match, None)
        new = await _update(gw, name, routing.switch, snap.generation if expected is None else expected)
        _count_events(gw, name, ["switch"])
        await _audit_by_hand(request, "switch", name, new)
        log.info("%s switched (generation %s): live %s -> %s", name, new.generation, _label(new.previous),
                 _label(new.live))
        return new.model_dump(mode="json")

    @app.post("/admin/rollback", dependencies=admin)
    async def rollback(
        request: Request,
        model: str | None = model_query,
        force: bool = False,
        if_match: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        gw = _gw(request)
        name = _admin_model(gw, model, existing=True)
        snap = gw.routes.current(name)
        if snap.previous is None:
            raise conflict("No previous colour to roll back to.", code="no_previous")
        if not force:
            await _require_ready(gw, snap.previous)
        expected = _expected_generation(if_match, None)
        new = await _update(gw, name, routing.rollback, snap.generation if expected is None else expected)
        _count_events(gw, name, ["rollback"])
        await _audit_by_hand(request, "rollback", name, new)
        log.warning("%s rolled back (generation %s): live %s -> %s", name, new.generation, _label(new.previous),
                    _label(new.live))
        return new.model_dump(mode="json")

    @app.post("/admin/canary", dependencies=admin)
    async def canary(
        update: CanaryUpdate,
        request: Request,
        model: str | None = model_query,
        force: bool = False,
        if_match: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        gw = _gw(request)
        name = _admin_model(gw, model, existing=True)
        snap = gw.routes.current(name)
        if update.weight > 0:
            if snap.shadow is None or snap.live is None:
                raise conflict("A canary needs a live colour and a candidate (shadow) colour.", code="no_candidate")
            if not force:
                await _require_ready(gw, snap.shadow)
        expected = _expected_generation(if_match, None)
        new = await _update(gw, name, lambda s: s.model_copy(update={"canary_weight": update.weight}),
                            snap.generation if expected is None else expected)
        _count_events(gw, name, route_events(snap, new))
        log.info("%s canary weight %s%% (generation %s) on %s", name, new.canary_weight, new.generation,
                 _label(new.shadow))
        return new.model_dump(mode="json")


    # Client keys over the network (the `tuneship keys` CLI, CI pipelines): the same KeyStore
    # the gateway checks keys with stays the only writer of the keys file.
    @app.get("/admin/keys", dependencies=admin)
    async def list_keys(request: Request) -> dict[str, Any]:
        keys = _gw(request).clients.store.keys()
        return {"keys": [rec.public() for rec in keys.values()]}

    @app.post("/admin/keys", dependencies=admin, status_code=201)
    async def create_key(body: KeyCreate, request: Request) -> dict[str, Any]:
        store = _gw(request).clients.store
        rec, key = await asyncio.to_thread(store.create, body.name, body.rpm, body.burst)
        log.info("client key %s (%s) created through the admin API", rec.id, rec.name)
        return {**rec.public(), "key": key}

    @app.delete("/admin/keys/{key_id}", dependencies=admin)
    async def revoke_key(key_id: str, request: Request) -> dict[str, Any]:
        store = _gw(request).clients.store
        if not await asyncio.to_thread(store.revoke, key_id):
            raise OpenAIError(404, f"No client key with id {key_id}.", "invalid_request_error",
                              code="key_not_found", param="key_id")
        log.warning("client key %s revoked through the admin API", key_id)
        return store.keys()[key_id].public()


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    rpm: int = Field(default=DEFAULT_RPM, ge=0, description="requests per minute; 0 = unlimited")
    burst: int | None = Field(default=None, ge=1, description="bucket size; default: rpm")


class CanaryUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: int = Field(ge=0, le=100)


# -- helpers ---------------------------------------------------------------------------------
def _count_events(gw: Gateway, served_model: str, events: list[str]) -> None:
    """Deployment events for dashboards' annotations (`tuneship_gateway_deployment_events_total`)."""
    for event in events:
        gw.metrics.child(gw.metrics.deployment_events, served_model, event).inc()


def _label(route: routing.Route | None) -> str | None:
    return f"{route.colour}({route.model} v{route.version})" if route else None


def _served_names(gw: Gateway) -> list[str]:
    """The served models a client can call (a live colour set): what /v1/models lists."""
    return [name for name, st in gw.routes.states().items() if st.live is not None]


async def _audit_by_hand(request: Request, action: str, served_model: str, new: RoutingState) -> None:
    """A switch or rollback made through the admin API by anyone but a release stage (which
    records its own decisions): the audit trail gets it with the caller's `X-Tuneship-Actor`
    (the CLI and `GatewayAdmin` send the login name), never blocking the answer for long."""
    actor = request.headers.get("x-tuneship-actor") or "admin-api (no X-Tuneship-Actor)"
    if actor.startswith("airflow:"):
        return
    from tuneship import audit

    live = new.live
    task = ((live.metadata or {}).get("task") if live else None) or served_model
    why = f"by hand through the gateway's admin API: {served_model} live is now {_label(new.live)}, " \
          f"previous {_label(new.previous)}"
    try:
        await asyncio.to_thread(audit.record, action, task=task, reason=why, actor=actor,
                                version=live.version if live else None,
                                figures={"served_model": served_model, "generation": new.generation})
    except Exception:  # noqa: BLE001 - the switch is done; the missing record is in the log
        log.exception("audit trail: could not record the %s of %s by %s", action, served_model, actor)


def _admin_model(gw: Gateway, model: str | None, existing: bool = False) -> str:
    """The served model an admin call acts on: `model` when given; else the only served
    model with routes; else (none yet) `default_served_model`. Several and none named: 400.
    `existing`: the model must have routes already (404 naming those that do)."""
    names = gw.routes.names()
    if model is None:
        if len(names) > 1:
            raise bad_request(f"Several served models have routes ({', '.join(names)}); name one with the "
                              "`model` query parameter.", param="model", code="model_required")
        model = names[0] if names else gw.settings.default_served_model
    try:
        check_served_model(model, "model")
    except ValueError as exc:
        raise bad_request(str(exc), param="model", code="invalid_value") from None
    if existing and model not in names:
        raise model_not_found(model, names, what="routes")
    return model


def _version(state: RoutingState) -> dict[str, Any]:
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
    }


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


async def _update(gw: Gateway, model: str, change: Any, expected: int | None) -> RoutingState:
    try:
        return await asyncio.to_thread(gw.routes.update, model, change, expected)
    except routing.ConcurrentUpdate as exc:
        raise conflict(f"{exc}; re-read the routes and retry.", code="generation_mismatch") from None
    except routing.InvalidTransition as exc:
        raise conflict(str(exc)) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        raise bad_request(f"Invalid routing state: {first.get('msg')}",
                          param=".".join(str(p) for p in first.get("loc", ())) or None) from None


async def _feedback(gw: Gateway, request: Request, key: ClientKey | None) -> JSONResponse:
    try:
        raw = await request.body()
    except BodyTooLarge as exc:
        raise too_large(exc.limit) from None
    try:
        body = FeedbackRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise _validation_error(exc.errors()) from None
    if body.rating is None and body.task_success is None:
        raise bad_request("Give at least one of 'rating' (1-5) and 'task_success' (true/false).", param="rating",
                          code="missing_required_parameter")
    served = _feedback_model(gw, body.model)
    ts = utcnow()
    record: dict[str, Any] = {
        "kind": "feedback",
        "ts": format_ts(ts),
        "feedback_id": uuid.uuid4().hex,
        "request_id": body.request_id,
        "replica": gw.settings.replica_id,
        "served_model": served,
        "key_id": key.id if key else None,
        "rating": body.rating,
        "task_success": body.task_success,
        "comment": body.comment,
    }
    if gw.redactor is not None:
        # Redacted here, not only in the writer thread, so the answer shows what is stored;
        # the writer's redactor leaves a record that already has `pii_redacted` alone.
        record = await asyncio.to_thread(gw.redactor, record) if body.comment else gw.redactor(record)
    assert gw.writer is not None
    if not gw.writer.submit(ts, record):
        raise OpenAIError(503, "The inference log is not keeping up; feedback was not recorded. Retry shortly.",
                          "server_error", code="log_unavailable", headers={"Retry-After": "1"})
    gw.metrics.child(gw.metrics.feedback, served).inc()
    out = {k: v for k, v in record.items() if k != "kind"}
    return JSONResponse({"object": "feedback", **out}, status_code=202)


def _feedback_model(gw: Gateway, model: str | None) -> str:
    """The served model whose log partition takes the feedback: `model` when given (it must
    have routes), else the only served model with routes."""
    if model is not None:
        if gw.routes.get(model) is None:
            raise model_not_found(model, _served_names(gw))
        return model
    names = gw.routes.names()
    if len(names) == 1:
        return names[0]
    if not names:
        raise OpenAIError(404, "No model is served yet, so there is no answer to give feedback on.",
                          "invalid_request_error", code="model_not_found", param="model")
    raise bad_request(f"Several served models have routes ({', '.join(names)}); name the answer's model "
                      "in `model` (the completion's `model`).", param="model", code="model_required")


def _client_request_id(request: Request) -> str | None:
    """A caller's X-Request-ID is logged for tracing but never used as the join key: the
    gateway's own id must be unique for the live/shadow join in the inference log."""
    rid = request.headers.get("x-request-id", "")
    return rid if _REQUEST_ID.match(rid) else None


@dataclass
class Answer:
    """One answered inference request, before it is shaped into JSON or SSE."""

    rid: str
    ts: datetime
    served_model: str
    route: routing.Route
    role: str
    completion: Completion
    max_tokens: int

    @property
    def finish_reason(self) -> str:
        return "length" if self.completion.completion_tokens >= self.max_tokens else "stop"

    @property
    def fingerprint(self) -> str:
        return f"{self.route.colour}-{self.route.version}" if self.route.version else self.route.colour

    def usage(self) -> dict[str, int]:
        c = self.completion
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens}

    def headers(self) -> dict[str, str]:
        return {"x-request-id": self.rid, "x-tuneship-colour": self.route.colour, "x-tuneship-route": self.role}


async def _inference(gw: Gateway, request: Request, endpoint: str) -> Response:
    """Both OpenAI inference endpoints: auth, limits, parsing, then `_answer`, then shaping."""
    t0 = time.perf_counter()
    rid = uuid.uuid4().hex
    labels = {"served_model": "none", "colour": "none", "model": "none", "status": "500", "role": "none"}
    try:
        pinned = request.headers.get("x-tuneship-target")
        if pinned:
            # An admin pinning one loaded colour (release smoke tests before traffic moves):
            # the admin token, not a client key; no rate limit; never mirrored nor logged.
            gw.admin.check(request)
            key = None
        else:
            key = authenticate_client(request)
        try:
            raw = await request.body()
        except BodyTooLarge as exc:
            raise too_large(exc.limit) from None
        try:
            body: CompletionRequest | ChatCompletionRequest = (
                CompletionRequest if endpoint == "/v1/completions" else ChatCompletionRequest
            ).model_validate_json(raw)
        except ValidationError as exc:
            raise _validation_error(exc.errors()) from None
        call = _prepare(gw, request, endpoint, body, rid, key, pinned, labels)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            response = await _stream_answer(gw, call, isinstance(body, ChatCompletionRequest), include_usage)
            labels["status"] = "200"
            return response
        ans = await _answer(gw, call)
        labels["status"] = "200"
        if isinstance(body, ChatCompletionRequest):
            return FastJSONResponse(_chat_payload(ans), headers=ans.headers())
        return FastJSONResponse(_completion_payload(ans), headers=ans.headers())
    except OpenAIError as exc:
        labels["status"] = str(exc.status)
        exc.headers = {**(exc.headers or {}), "x-request-id": rid}
        raise
    finally:
        elapsed = time.perf_counter() - t0  # for a stream: until the first event can go out
        m = gw.metrics
        served = labels["served_model"]
        m.child(m.requests, served, endpoint, labels["colour"], labels["model"], labels["status"], labels["role"]).inc()
        m.child(m.latency, served, labels["colour"], labels["model"], labels["status"]).observe(elapsed)


@dataclass
class _Call:
    """A validated, routed inference request, ready for Triton."""

    gw: Gateway
    t0: float
    ts: datetime
    rid: str
    client_rid: str | None
    endpoint: str
    served_model: str
    live: routing.Route
    role: str
    key_id: str | None
    prompt: str
    max_tokens: int
    mirror: Callable[[str | None], dict[str, Any] | None]  # (live answer) -> the log's shadow entry

    @property
    def logged(self) -> bool:
        return self.role != "pinned"

    def log(self, completion: str | None, status: int, c: Completion | None, error: str | None,
            shadow: dict[str, Any] | None) -> None:
        if self.logged:
            _log_request(self.gw, self.ts, self.rid, self.client_rid, self.endpoint, self.served_model,
                         self.prompt, self.max_tokens, self.live, self.role, self.key_id, completion, status,
                         time.perf_counter() - self.t0, shadow, c, error)

    def upstream_failed(self, exc: UpstreamError) -> OpenAIError:
        self.log(None, exc.status, None, exc.code, self.mirror(None))
        return OpenAIError(exc.status, f"The {self.live.colour} model failed to answer: {exc.message}",
                           "server_error", code=exc.code)

    def answered(self, c: Completion, upstream_s: float) -> None:
        """`upstream_s`: the seconds Triton spent on it (tokens/s and cost, `serving.gateway.metrics`)."""
        m = self.gw.metrics
        served, colour, model = self.served_model, self.live.colour, self.live.model
        m.child(m.prompt_tokens, served, colour, model).inc(c.prompt_tokens)
        m.child(m.completion_tokens, served, colour, model).inc(c.completion_tokens)
        m.child(m.generation_seconds, served, colour, model).inc(upstream_s)
        price = self.gw.prices.of(served, self.live)
        if price is not None:
            m.child(m.request_cost, served, colour, model).observe(price / 3600 * upstream_s)
        self.log(c.text, 200, c, None, self.mirror(c.text))


def _prepare(
    gw: Gateway, request: Request, endpoint: str, body: CompletionRequest | ChatCompletionRequest,
    rid: str, key: ClientKey | None, pinned: str | None, labels: dict[str, str],
) -> _Call:
    t0 = time.perf_counter()
    ts = utcnow()
    s = gw.settings
    # -- validation that needs no upstream ----------------------------------------------------
    store = gw.routes.get(body.model)
    if store is not None:
        state = store.current()
    elif pinned and routing.SERVED_MODEL.match(body.model):
        state = gw.routes.current(body.model)  # an admin smoke-testing a new model's first candidate
    else:
        raise model_not_found(body.model, _served_names(gw))
    labels["served_model"] = state.served_model
    if isinstance(body, ChatCompletionRequest):
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if body.tools:
            raise bad_request("Tools are not supported by this model.", param="tools")
        messages = [m.as_dict() for m in body.messages]
    else:
        requested, param = body.max_tokens, "max_tokens"
        messages = None
        text = _one_prompt(body.prompt)
    max_tokens = s.default_max_tokens if requested is None else requested
    if not 1 <= max_tokens <= s.max_tokens_limit:
        raise bad_request(f"{param} must be between 1 and {s.max_tokens_limit}.", param=param)
    if body.n not in (None, 1):
        raise bad_request("Only n=1 is supported.", param="n")

    # -- routing --------------------------------------------------------------------------------
    if pinned:
        if not routing.COLOUR.match(pinned):
            raise bad_request("X-Tuneship-Target must be a colour name.", param="X-Tuneship-Target")
        live, shadow, role = _pinned_route(state, pinned, request.headers.get("x-tuneship-target-model")), None, "pinned"
    else:
        live, shadow, role = routing.route_request(state, rid)
    if live is None:
        raise no_live_route()

    def prompt_for(route: routing.Route) -> str:
        if messages is None:
            return text
        try:
            if route.metadata.get("prompt_format") == "plain":
                return chat.plain_prompt(messages)
            return chat.chat_prompt(messages, gw.chat_template(route))
        except chat.ChatFormatError as exc:
            raise bad_request(str(exc), param="messages") from None

    prompt = prompt_for(live)
    if len(prompt) > s.max_prompt_chars:
        raise bad_request(f"The prompt is longer than {s.max_prompt_chars} characters.",
                          param="prompt" if messages is None else "messages", code="context_length_exceeded")
    labels.update(colour=live.colour, model=live.model, role=role)

    def mirror(live_text: str | None) -> dict[str, Any] | None:
        # Offered once the live answer is in, so the copy never competes with the live call
        # of the same request (the gateway and Triton share CPUs); never awaited. The live
        # answer goes with it: the shadow answer is compared with it (agreement metrics).
        if shadow is None or gw.mirror is None:
            return None
        try:
            shadow_prompt = prompt_for(shadow)
        except OpenAIError:
            shadow_prompt = None  # the candidate's format cannot take these messages: not mirrored
        sent = shadow_prompt is not None and gw.mirror.offer(
            ShadowJob(rid, state.served_model, ts, shadow, shadow_prompt, max_tokens, live.version, live_text))
        return {"colour": shadow.colour, "version": shadow.version, "model": shadow.model,
                "status": "pending" if sent else "dropped"}

    return _Call(gw, t0, ts, rid, _client_request_id(request), endpoint, state.served_model, live,
                 role, key.id if key else None, prompt, max_tokens, mirror)


def _pinned_route(state: RoutingState, colour: str, triton_model: str | None) -> routing.Route:
    """The route an admin's X-Tuneship-Target pins: that colour in the served model's routes
    (live, shadow or previous), else a colour not routed yet -- a candidate just loaded for
    its smoke test -- on the Triton model X-Tuneship-Target-Model names (`<task>_<colour>`),
    or `llm_<colour>` when that header is absent (single-model deployments)."""
    if triton_model is not None:
        try:
            return routing.Route(colour=colour, model=triton_model)
        except ValidationError:
            raise bad_request("X-Tuneship-Target-Model must be a Triton model name.",
                              param="X-Tuneship-Target-Model") from None
    known = [r for r in (state.shadow, state.live, state.previous) if r is not None and r.colour == colour]
    return known[0] if known else routing.Route(colour=colour, model=f"llm_{colour}")


async def _answer(gw: Gateway, call: _Call) -> Answer:
    assert gw.triton is not None
    m = gw.metrics
    u0 = time.perf_counter()
    try:
        c = await gw.triton.complete(call.live.model, call.prompt, call.max_tokens, adapter=call.live.adapter)
    except UpstreamError as exc:
        m.child(m.upstream_latency, call.role, call.live.model).observe(time.perf_counter() - u0)
        raise call.upstream_failed(exc) from None
    upstream_s = time.perf_counter() - u0
    m.child(m.upstream_latency, call.role, call.live.model).observe(upstream_s)
    call.answered(c, upstream_s)
    return Answer(call.rid, call.ts, call.served_model, call.live, call.role, c, call.max_tokens)


class _Strip:
    """`str.strip()` of a text that arrives in pieces: leading whitespace is dropped, trailing
    whitespace is held until more text follows it (and dropped if none does)."""

    def __init__(self) -> None:
        self.started, self.held = False, ""

    def feed(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        text = self.held + piece
        out = text.rstrip()
        self.held = text[len(out):]
        return out


async def _stream_answer(gw: Gateway, call: _Call, is_chat: bool, include_usage: bool) -> StreamingResponse:
    """Relay Triton's pieces as OpenAI chunks while they are generated."""
    assert gw.triton is not None
    m = gw.metrics
    u0 = time.perf_counter()
    try:
        pieces = await gw.triton.stream(call.live.model, call.prompt, call.max_tokens, adapter=call.live.adapter)
    except UpstreamError as exc:
        m.child(m.upstream_latency, call.role, call.live.model).observe(time.perf_counter() - u0)
        raise call.upstream_failed(exc) from None
    ans = Answer(call.rid, call.ts, call.served_model, call.live, call.role, Completion("", 0, 0), call.max_tokens)
    kind = "chat.completion.chunk" if is_chat else "text_completion"
    base: dict[str, Any] = {"id": f"{'chatcmpl' if is_chat else 'cmpl'}-{call.rid}", "object": kind,
                            "created": int(call.ts.timestamp()), "model": call.served_model,
                            "system_fingerprint": ans.fingerprint}
    if include_usage:
        base["usage"] = None

    def chunk(text: str | None, finish: str | None, role: bool = False) -> bytes:
        if is_chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {} if text is None else {"content": text})
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
        return chat.sse({**base, "choices": [choice]})

    async def events() -> AsyncIterator[bytes]:
        texts: list[str] = []
        last: Completion | None = None
        outcome: tuple[int, str | None] = (499, "client_closed")  # unless the loop below finishes
        strip = _Strip() if is_chat else None
        try:
            if is_chat:
                yield chunk(None, None, role=True)
            async for piece in pieces:
                texts.append(piece.text)
                last = piece
                for word in chat.word_chunks(strip.feed(piece.text) if strip else piece.text):
                    yield chunk(word, None)
            ans.completion = Completion("".join(texts), last.prompt_tokens if last else 0,
                                        last.completion_tokens if last else 0, last.confidence if last else None)
            outcome = (200, None)
        except UpstreamError as exc:
            outcome = (exc.status, exc.code)
            yield chat.sse({"error": {"message": f"The {call.live.colour} model failed mid-stream: {exc.message}",
                                      "type": "server_error", "param": None, "code": exc.code}})
            return
        finally:
            await pieces.aclose()  # a client that went away also closes the call to Triton
            upstream_s = time.perf_counter() - u0
            m.child(m.upstream_latency, call.role, call.live.model).observe(upstream_s)
            if outcome[0] == 200:
                call.answered(ans.completion, upstream_s)
            else:
                call.log("".join(texts) or None, outcome[0], None, outcome[1],
                         call.mirror(None) if outcome[0] != 499 else None)
        yield chunk(None if is_chat else "", ans.finish_reason)
        if include_usage:
            yield chat.sse({**base, "choices": [], "usage": ans.usage()})
        yield chat.sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**ans.headers(), "cache-control": "no-cache", "x-accel-buffering": "no"})


# -- response shapes -------------------------------------------------------------------------
def _completion_payload(a: Answer) -> dict[str, Any]:
    return {
        "id": f"cmpl-{a.rid}",
        "object": "text_completion",
        "created": int(a.ts.timestamp()),
        "model": a.served_model,
        "system_fingerprint": a.fingerprint,
        "choices": [{"text": a.completion.text, "index": 0, "logprobs": None, "finish_reason": a.finish_reason}],
        "usage": a.usage(),
    }


def _chat_content(a: Answer) -> str:
    # Chat turns carry the answer without the separator the completion starts with
    # (tuneship.datagen.to_chat strips it the same way).
    return a.completion.text.strip()


def _chat_payload(a: Answer) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{a.rid}",
        "object": "chat.completion",
        "created": int(a.ts.timestamp()),
        "model": a.served_model,
        "system_fingerprint": a.fingerprint,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": _chat_content(a)},
                     "logprobs": None, "finish_reason": a.finish_reason}],
        "usage": a.usage(),
    }


def _one_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_request("Exactly one prompt per request is supported (a string or a list of one).",
                              param="prompt")
        return prompt[0]
    return prompt


def _log_request(
    gw: Gateway, ts: datetime, rid: str, client_rid: str | None, endpoint: str, served_model: str, prompt: str,
    max_tokens: int,
    live: routing.Route, role: str, key_id: str | None, completion: str | None, status: int, latency_s: float,
    shadow: dict[str, Any] | None, c: Any, error: str | None,
) -> None:
    """`live` is the colour that answered: the live colour, or the candidate for a canary
    request (`role: "canary"`), so the shadow verdict counts canary answers as the candidate's."""
    assert gw.writer is not None
    live_entry: dict[str, Any] = {
        "colour": live.colour, "version": live.version, "model": live.model,
        "completion": completion, "latency_ms": round(latency_s * 1000, 3), "status": status,
    }
    if error:
        live_entry["error"] = error
    if c is not None and c.confidence is not None:
        live_entry["confidence"] = c.confidence  # the model's own, for the drift monitor's calibration test
    gw.writer.submit(ts, {
        "kind": "request",
        "ts": format_ts(ts),
        "request_id": rid,
        "client_request_id": client_rid,
        "replica": gw.settings.replica_id,
        "endpoint": endpoint,
        "served_model": served_model,
        "model": served_model,  # the id the client sent (== served_model; kept for older readers)
        "role": role,
        "key_id": key_id,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "live": live_entry,
        "shadow": shadow,
        "prompt_tokens": c.prompt_tokens if c else None,
        "completion_tokens": c.completion_tokens if c else None,
    })
