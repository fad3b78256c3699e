"""Routing state: which Triton model is live, which one shadows it, and where to roll back.

Each served model (the OpenAI `model` id clients send; one per task) has its own state, in
its own JSON file `home/gateway/routes/<served_model>.json` shared by every replica on the
host (or a shared volume). A release or rollback of one served model writes only its file,
so it never touches another model's traffic. `RouteRegistry` finds the files (a model
another replica created is seen on its first request) and creates one on the first PUT.
Served-model names match `SERVED_MODEL` (`^[a-z][a-z0-9_.-]{0,63}$`: a file name, a
Prometheus label and a log partition, safely). A legacy single `home/gateway/routes.json`
is migrated once, at start-up, into `routes/<its served_model>.json` and renamed
`routes.json.migrated` (logged).

One file:

    {
      "schema_version": 1,
      "generation": 7,                      # +1 on every write; optimistic concurrency
      "updated_at": "2025-01-01T12:00:00+00:00",
      "updated_by": "gw-host-1234",         # replica that wrote it
      "served_model": "tuneship",           # the `model` id clients send / /v1/models lists
      "live":     {"colour": "blue", "model": "llm_blue", "version": "3",
                   "adapter": null,             # or a LoRA adapter on a shared-base model
                   "registered_model": "triage-llm", "adapter_sha256": "...",
                   "deployed_at": "...", "metadata": {...}} | null,
      "shadow":   {... same shape ...} | null,   # receives a mirrored copy of traffic
      "previous": {... same shape ...} | null,   # what /admin/rollback returns to
      "mirror_sample": 1.0,                 # share of requests copied to the shadow
      "canary_weight": 0                    # 0-100: % of live traffic answered by the shadow
    }                                       #   (the candidate) instead of live

Writes: under an exclusive flock on `<served_model>.json.lock` (read-modify-write is atomic across
replicas), to a temp file in the same directory, fsync, then os.replace -- readers see the
old or the new file, never a torn one. Reads: every request stats the file (one syscall)
and re-parses only when (inode, mtime_ns, size) changed, so a replica picks up a switch made
through another replica on its next request. A file that fails to parse is logged and the
last good state kept: a bad write must not take serving down.

A route's `adapter` names a LoRA adapter of a shared-base Triton model (`tuneship.lora_delta`'s
package): each request to it carries ADAPTER=<adapter>, so several served models (or a task's
two colours) can be one Triton model with different adapters. Live and shadow must differ in
model or adapter. No adapter: a merged model, sent no ADAPTER (as before).

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
SERVED_MODEL = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


def check_served_model(name: str, where: str = "served model") -> str:
    """The name, or ValueError saying what a served-model name may be."""
    if not isinstance(name, str) or not SERVED_MODEL.match(name):
        raise ValueError(f"{where} {name!r} is not a valid served-model name: use 1-64 characters "
                         "a-z 0-9 _ . -, starting with a letter (e.g. 'triage' or 'faq-v2')")
    return name


class Route(BaseModel):
    """One colour: a Triton model plus the registry facts /version reports."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    colour: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    model: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", description="Triton model name")
    adapter: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,128}$",
                                description="LoRA adapter of a shared-base Triton model (its ADAPTER input)")
    version: Annotated[str | None, BeforeValidator(_to_str)] = None  # registry version
    registered_model: str | None = None
    adapter_sha256: str | None = None
    deployed_at: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def target(self) -> tuple[str, str | None]:
        """What answers: the Triton model and, on a shared base, the adapter."""
        return self.model, self.adapter


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
        if self.live and self.shadow and self.live.target == self.shadow.target:
            raise ValueError("shadow must route to a different Triton model (or adapter) than live")
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
    shadow = state.shadow if state.shadow and state.shadow.target != state.previous.target else None
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
        # The file's name is the served model (a hand-copied file cannot serve under another id).
        data["served_model"] = self._default.served_model
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


class RouteRegistry:
    """One `RouteStore` per served model, files `<root>/<served_model>.json`.

    The hot path (`get` of a known model) is a dict lookup plus the store's own stat; a name
    not seen yet costs one more stat, so a model another replica created is found on the
    next request that names it."""

    def __init__(self, root: Path, writer_id: str = "", default_mirror_sample: float = 1.0,
                 legacy_path: Path | None = None) -> None:
        self.root = Path(root)
        self.writer_id = writer_id
        self.default_mirror_sample = default_mirror_sample
        self._stores: dict[str, RouteStore] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        if legacy_path is not None:
            self.migrate_legacy(Path(legacy_path))
        self._scan()

    def _path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def _open(self, name: str) -> RouteStore:
        store = self._stores.get(name)
        if store is None:
            store = self._stores[name] = RouteStore(self._path(name), name, writer_id=self.writer_id,
                                                    default_mirror_sample=self.default_mirror_sample)
        return store

    def _scan(self) -> None:
        present = {p.stem for p in self.root.glob("*.json") if SERVED_MODEL.match(p.stem)}
        for name in present - self._stores.keys():
            self._open(name)
        for name in self._stores.keys() - present:
            del self._stores[name]  # file removed by hand: the model is gone

    def names(self) -> list[str]:
        """Served models that have a routes file, sorted (lists the directory: not for the hot path)."""
        self._scan()
        return sorted(self._stores)

    def get(self, name: str) -> RouteStore | None:
        """The store of a served model that has a routes file, else None. A name not seen
        before costs one stat (a file another replica just created is found at once)."""
        store = self._stores.get(name)
        if store is None and SERVED_MODEL.match(name) and self._path(name).exists():
            store = self._open(name)
        return store

    def current(self, name: str) -> RoutingState:
        """`name`'s state; the empty default state (generation 0) while it has no file."""
        store = self.get(name)
        if store is not None:
            return store.current()
        return RoutingState(served_model=check_served_model(name), mirror_sample=self.default_mirror_sample)

    def states(self) -> dict[str, RoutingState]:
        """Every served model's current state, by name."""
        return {name: self._stores[name].current() for name in self.names()}

    def update(self, name: str, change: Callable[[RoutingState], RoutingState],
               expected_generation: int | None = None) -> RoutingState:
        """`RouteStore.update` on `name`'s file (created by this write if new). Blocking."""
        store = self.get(name) or self._open(check_served_model(name))
        return store.update(change, expected_generation)

    def migrate_legacy(self, legacy: Path) -> str | None:
        """Move a single-model `routes.json` (before per-model routes) to
        `<root>/<its served_model>.json` once; the old file is renamed `*.migrated`.
        Refuses (ValueError naming the file and field) when its served model is not a valid
        name or that model already has a routes file -- never guesses which one is right."""
        if not legacy.exists():
            return None
        lock = legacy.with_name(legacy.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not legacy.exists():  # another replica migrated it while we waited
                return None
            try:
                data = json.loads(legacy.read_text())
                name = check_served_model(str(data.get("served_model") or "tuneship"),
                                          f"{legacy}: field 'served_model'")
                state = RoutingState.model_validate({**data, "served_model": name})
            except (ValueError, ValidationError) as exc:
                raise ValueError(f"cannot migrate the legacy routes file {legacy} to per-model routes: {exc}. "
                                 f"Fix the file, or move it to {self.root}/<served_model>.json by hand.") from None
            target = self._path(name)
            if target.exists():
                raise ValueError(f"cannot migrate the legacy routes file {legacy}: {target} already exists. "
                                 f"Keep one of them: delete {legacy} (or rename it) if {target} is current.")
            RouteStore(target, name, writer_id=self.writer_id)._write(state)
            os.replace(legacy, legacy.with_name(legacy.name + ".migrated"))
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        log.warning("migrated the legacy routes file %s to %s (served model %r, generation %s); "
                    "the old file is now %s.migrated", legacy, target, name, state.generation, legacy.name)
        return name
