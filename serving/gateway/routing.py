"""Routing state: which Triton model is live, which one shadows it, and where to roll back.

The state lives in one JSON file (default home/gateway/routes.json) shared by every replica
on the host (or a shared volume):

    {
      "schema_version": 1,
      "generation": 7,                      # +1 on every write; optimistic concurrency
      "updated_at": "2025-01-01T12:00:00+00:00",
      "updated_by": "gw-host-1234",         # replica that wrote it
      "served_model": "tuneship",           # the `model` id clients send / /v1/models lists
      "live":     {"colour": "blue", "model": "llm_blue", "version": "3",
                   "registered_model": "triage-llm", "adapter_sha256": "...",
                   "deployed_at": "...", "metadata": {...}} | null,
      "shadow":   {... same shape ...} | null,   # receives a mirrored copy of traffic
      "previous": {... same shape ...} | null,   # what /admin/rollback returns to
      "mirror_sample": 1.0,                 # share of requests copied to the shadow
      "canary_weight": 0                    # 0-100: % of live traffic answered by the shadow
    }                                       #   (the candidate) instead of live

Writes: under an exclusive flock on `routes.json.lock` (read-modify-write is atomic across
replicas), to a temp file in the same directory, fsync, then os.replace -- readers see the
old or the new file, never a torn one. Reads: every request stats the file (one syscall)
and re-parses only when (inode, mtime_ns, size) changed, so a replica picks up a switch made
through another replica on its next request. A file that fails to parse is logged and the
last good state kept: a bad write must not take serving down.

Canary: with `canary_weight` > 0 that share of requests (deterministic per request id, on a
hash independent of the mirror sample) is answered by the shadow/candidate colour instead of
live; those requests are not mirrored. `switch` and `rollback` reset the weight to 0, and a
PUT that changes the shadow route resets it unless the PUT sets it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from serving.gateway.watched import WatchedFile

log = logging.getLogger("tuneship.gateway.routing")

SCHEMA_VERSION = 1


def _to_str(v: Any) -> Any:
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


COLOUR = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class Route(BaseModel):
    """One colour: a Triton model plus the registry facts /version reports."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    colour: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    model: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", description="Triton model name")
    version: Annotated[str | None, BeforeValidator(_to_str)] = None  # registry version
    registered_model: str | None = None
    adapter_sha256: str | None = None
    deployed_at: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class RoutingState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    generation: int = 0
    updated_at: str | None = None
    updated_by: str | None = None
    served_model: str = Field(default="tuneship", min_length=1, max_length=128)
    live: Route | None = None
    shadow: Route | None = None
    previous: Route | None = None
    mirror_sample: float = Field(default=1.0, ge=0.0, le=1.0)
    canary_weight: int = Field(default=0, ge=0, le=100)

    @model_validator(mode="after")
    def _distinct(self) -> RoutingState:
        if self.live and self.shadow and self.live.model == self.shadow.model:
            raise ValueError("shadow must route to a different Triton model than live")
        return self


class RoutesUpdate(BaseModel):
    """Body of PUT /admin/routes: the new state.

    `generation`, when given, must equal the current one (GET, edit, PUT back; 409 if someone
    else wrote in between). `previous` omitted: if live changes, the old live becomes previous.
    `mirror_sample` / `served_model` omitted: kept as they are. `canary_weight` omitted: kept
    while the shadow route stays the same, else 0 (a new candidate never inherits traffic).
    """

    model_config = ConfigDict(extra="forbid")

    served_model: str | None = Field(default=None, min_length=1, max_length=128)
    live: Route | None = None
    shadow: Route | None = None
    previous: Route | None = None
    mirror_sample: float | None = Field(default=None, ge=0.0, le=1.0)
    canary_weight: int | None = Field(default=None, ge=0, le=100)
    generation: int | None = None
    # Echoed back by GET; accepted and ignored so a GET body can be PUT back.
    schema_version: int | None = None
    updated_at: str | None = None
    updated_by: str | None = None

    def apply(self, current: RoutingState) -> RoutingState:
        previous = self.previous
        if "previous" not in self.model_fields_set:
            previous = current.previous
            if current.live is not None and current.live != self.live:
                previous = current.live
        return RoutingState(
            served_model=self.served_model or current.served_model,
            live=self.live,
            shadow=self.shadow,
            previous=previous,
            mirror_sample=current.mirror_sample if self.mirror_sample is None else self.mirror_sample,
            canary_weight=self.canary_weight if self.canary_weight is not None
            else (current.canary_weight if self.shadow == current.shadow else 0),
        )


class ConcurrentUpdate(Exception):
    """The state changed since the caller read it (generation mismatch)."""


class InvalidTransition(Exception):
    """The requested switch/rollback has nothing to act on."""


def switch(state: RoutingState) -> RoutingState:
    """Shadow (the candidate) becomes live; the old live becomes previous; mirroring stops."""
    if state.shadow is None:
        raise InvalidTransition("no shadow/candidate colour to switch to")
    return state.model_copy(update={"live": state.shadow, "shadow": None, "previous": state.live, "canary_weight": 0})


def rollback(state: RoutingState) -> RoutingState:
    """Previous becomes live again; the rolled-back live becomes previous (so rollback twice = undo)."""
    if state.previous is None:
        raise InvalidTransition("no previous colour to roll back to")
    shadow = state.shadow if state.shadow and state.shadow.model != state.previous.model else None
    return state.model_copy(update={"live": state.previous, "previous": state.live, "shadow": shadow,
                                    "canary_weight": 0})


def sampled(request_id: str, share: float) -> bool:
    """Deterministic per request id, so every replica (and a replay) makes the same choice."""
    if share >= 1.0:
        return True
    if share <= 0.0:
        return False
    return zlib.crc32(request_id.encode()) / 0xFFFFFFFF < share


def select(state: RoutingState, request_id: str) -> tuple[Route | None, Route | None]:
    """(route that answers, route that gets a mirrored copy or None) for one request."""
    answer, mirror, _role = route_request(state, request_id)
    return answer, mirror


def route_request(state: RoutingState, request_id: str) -> tuple[Route | None, Route | None, str]:
    """(route that answers, route that gets a mirrored copy or None, "live" | "canary")."""
    if state.live is not None and state.shadow is not None and state.canary_weight > 0 and \
            sampled("canary:" + request_id, state.canary_weight / 100.0):
        return state.shadow, None, "canary"
    shadow = state.shadow if state.shadow and sampled(request_id, state.mirror_sample) else None
    return state.live, shadow, "live"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class RouteStore:
    def __init__(self, path: Path, default_served_model: str = "tuneship", writer_id: str = "",
                 default_mirror_sample: float = 1.0) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.writer_id = writer_id
        self._default = RoutingState(served_model=default_served_model, mirror_sample=default_mirror_sample)
        self._file: WatchedFile[RoutingState] = WatchedFile(
            self.path, self._parse, self._default, "routes file", errors=(OSError, ValueError, ValidationError)
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.current()

    # -- reading -------------------------------------------------------------------------
    def _parse(self, text: str) -> RoutingState:
        data = json.loads(text)
        data.setdefault("served_model", self._default.served_model)
        return RoutingState.model_validate(data)

    def current(self) -> RoutingState:
        """The state on disk, re-read only when the file changed (cheap: one stat)."""
        return self._file.get()

    # -- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _write(self, state: RoutingState) -> None:
        text = json.dumps(state.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".routes.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def update(
        self, change: Callable[[RoutingState], RoutingState], expected_generation: int | None = None
    ) -> RoutingState:
        """Read-modify-write under the cross-replica lock. Blocking: call via a thread."""
        with self._locked():
            self._file.invalidate()  # force a fresh read of what is on disk now
            current = self.current()
            if expected_generation is not None and expected_generation != current.generation:
                raise ConcurrentUpdate(
                    f"routes are at generation {current.generation}, not {expected_generation}"
                )
            new = change(current)
            new = RoutingState.model_validate({
                **new.model_dump(),
                "schema_version": SCHEMA_VERSION,
                "generation": current.generation + 1,
                "updated_at": _now(),
                "updated_by": self.writer_id or None,
            })
            self._write(new)
            self._file.invalidate()
            return self.current()
