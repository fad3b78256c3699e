"""The Tuneship inference gateway: OpenAI-compatible front door to Triton.

Modules:
    settings       environment-driven settings (pydantic-settings)
    routing        the routing state (live / shadow / previous colour), persisted atomically
    triton         pooled async client for Triton's KServe v2 HTTP API
    mirror         bounded, fire-and-forget copy of traffic to the shadow colour
    inference_log  background JSONL writer for the inference log
    auth           admin bearer token; client API keys (ClientAuth)
    keys           hashed client API keys + CLI (`python -m serving.gateway.keys create ...`)
    ratelimit      per-key token buckets (429 + Retry-After)
    bodylimit      request body size limit (413), plain ASGI middleware
    chat           chat messages -> the training prompt format; SSE chunking
    pii            PII redaction of the inference log (tuneship.data.pii detectors)
    errors         OpenAI-style error bodies
    metrics        Prometheus metrics (one registry per app)
    app            the FastAPI application (`create_app`)

Run it with `python -m serving.gateway`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # Lazy, so `serving.gateway.routing` (e.g. for a DAG building a PUT body) does not pull in FastAPI.
    if name == "create_app":
        from serving.gateway.app import create_app

        return create_app
    raise AttributeError(name)
