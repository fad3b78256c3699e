"""Gateway settings, from the environment (prefix ``TUNESHIP_GATEWAY_``).

Paths and the Triton address default to `tuneship.config`, so the gateway, the DAGs and the
tests agree on them without passing them around.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tuneship import config
from tuneship.gateway_admin import token_path


def _default_replica_id() -> str:
    host = socket.gethostname().split(".")[0] or "gw"
    return f"{host}-{os.getpid()}"


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNESHIP_GATEWAY_", extra="ignore")

    # Upstream
    triton_url: str = Field(default_factory=config.triton_url)  # host:port, no scheme
    triton_timeout_s: float = 30.0  # one inference call, live path
    triton_connect_timeout_s: float = 2.0
    triton_max_connections: int = 64
    ready_timeout_s: float = 2.0  # Triton readiness probes

    # Mirroring to the shadow colour
    shadow_queue_size: int = 256
    shadow_workers: int = 2
    shadow_timeout_s: float = 30.0
    shadow_drain_s: float = 5.0  # on shutdown, wait this long for queued shadow calls
    mirror_sample: float = Field(default=1.0, ge=0.0, le=1.0)  # until a model's routes say otherwise

    # Inference log
    replica_id: str = Field(default_factory=_default_replica_id)
    log_root: Path = Field(default_factory=lambda: config.home() / "inference_log")
    log_queue_size: int = 10_000

    # The drift monitor's results (monitor/<task>/governor.jsonl, drift-*.json), exported on /metrics.
    monitor_root: Path = Field(default_factory=lambda: config.home() / "monitor")

    # Routing state: one file per served model (serving.gateway.routing.RouteRegistry)
    routes_dir: Path = Field(default_factory=lambda: config.home() / "gateway" / "routes")
    # A single-model routes file from before per-model routes: migrated into routes_dir at start-up.
    legacy_routes_path: Path = Field(default_factory=lambda: config.home() / "gateway" / "routes.json")
    # The admin API's `model` when none is given and no served model has routes yet (a fresh gateway).
    default_served_model: str = "tuneship"

    # Request limits
    max_body_bytes: int = Field(default=512 * 1024, ge=1024)  # 413 above this, before parsing
    max_prompt_chars: int = 32_768
    default_max_tokens: int = 16  # OpenAI's default for /v1/completions
    max_tokens_limit: int = 4096

    # Client API keys (serving.gateway.keys). "auto": required as soon as the keys file holds a
    # key, active or revoked (a fresh home is open, so is a gateway nobody has issued keys for; the
    # embedded `make up`/demo issue one); "required": always, a gateway without keys refuses
    # every /v1 request. Production manifests should say "required".
    client_auth: Literal["auto", "required"] = "auto"
    api_keys_path: Path = Field(default_factory=lambda: config.home() / "gateway" / "api_keys.json")

    # Chat: how messages become a prompt when the route's metadata does not say (serving.gateway.chat)
    chat_template_path: Path | None = None  # a Jinja chat template file; default: the base model's
    chat_bos_token: str = "<s>"
    chat_eos_token: str = "</s>"

    # Inference log: replace PII (tuneship.data.pii detectors) before anything is written.
    # None: every kind the detectors know / their default phone regions (one home for both).
    redact_pii: bool = False
    redact_pii_kinds: list[str] | None = None
    redact_pii_phone_regions: list[str] | None = None  # e.g. ["US", "GB"]: numbers without +cc

    # Admin credential; when unset a random token is kept 0600 at home/gateway/admin_token.
    admin_token: str | None = Field(default=None, repr=False)
    admin_token_path: Path = Field(default_factory=token_path)

    @field_validator("replica_id")
    @classmethod
    def _safe_replica(cls, v: str) -> str:
        # It becomes a file name in the inference log.
        v = re.sub(r"[^A-Za-z0-9_.-]", "_", v)[:64]
        if not v or v.startswith("."):
            raise ValueError("replica_id must contain [A-Za-z0-9_.-] and not start with '.'")
        return v

    @field_validator("default_served_model")
    @classmethod
    def _served_model_name(cls, v: str) -> str:
        from serving.gateway.routing import check_served_model

        return check_served_model(v, "default_served_model")

    @field_validator("triton_url")
    @classmethod
    def _strip_scheme(cls, v: str) -> str:
        return re.sub(r"^https?://", "", v).rstrip("/")
