"""The gateway's admin credential and a client for its admin API.

The credential is shared by the gateway, the Airflow hook that drives it and the `tuneship` CLI.

Source, in order: env TUNESHIP_GATEWAY_ADMIN_TOKEN; else a random token created once (by
whichever process gets there first: O_CREAT|O_EXCL, mode 0600) at home/gateway/admin_token.
No web framework here, so the Airflow layer reads it without importing the gateway.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

from tuneship import config


def token_path() -> Path:
    return config.home() / "gateway" / "admin_token"


def load_or_create_token(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another replica is creating it: wait for it to be written.
        for _ in range(50):
            existing = path.read_text().strip()
            if existing:
                return existing
            time.sleep(0.02)
        raise RuntimeError(f"admin token file {path} exists but is empty") from None
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def admin_token() -> str:
    return os.environ.get("TUNESHIP_GATEWAY_ADMIN_TOKEN") or load_or_create_token(token_path())


def saved_token() -> str | None:
    """The admin token a client on this machine can use without creating one: env, else the
    embedded default's token file if the gateway already wrote it (a client must never mint
    a token the gateway does not know)."""
    env = os.environ.get("TUNESHIP_GATEWAY_ADMIN_TOKEN")
    if env:
        return env
    path = token_path()
    return (path.read_text().strip() or None) if path.exists() else None


class GatewayAdminError(Exception):
    """A refused or failed admin call, with the gateway's own message (OpenAI-shaped body)."""

    def __init__(self, method: str, path: str, status: int | None, message: str, code: str | None = None) -> None:
        where = f"{method} {path}: " + (f"HTTP {status}" if status else "no answer")
        super().__init__(f"{where}: {message}")
        self.status, self.message, self.code = status, message, code


class GatewayAdmin:
    """A client for the gateway's admin API (/admin/*, /version): routes, switch, rollback,
    canary for one served model, and client keys. The one client: the `tuneship` CLI and the
    Airflow `GatewayHook` both use it; it speaks plain HTTP so it runs anywhere a CI job does.

    `served_model`: the model whose routes the calls read and change (sent as `?model=`).
    None lets the gateway pick -- its only served model, or its default when it has none --
    and is refused (HTTP 400, code `model_required`) once several served models exist."""

    def __init__(self, base_url: str, token: str | None, timeout: float = 30.0,
                 served_model: str | None = None) -> None:
        import httpx  # here, not at module level: the gateway imports this module for its token only

        self._httpx = httpx
        from tuneship.audit import default_actor

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # who is acting (an Airflow task, or the person running the CLI): the gateway records a
        # switch or rollback a person makes in the audit trail under this name
        headers["X-Tuneship-Actor"] = default_actor()
        self.base_url = base_url.rstrip("/")
        self.served_model = served_model
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> GatewayAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self._client.request(method, path, **kwargs)
        except self._httpx.HTTPError as exc:
            raise GatewayAdminError(method, f"{self.base_url}{path}", None,
                                    f"{type(exc).__name__}: {exc}") from exc
        if r.status_code >= 400:
            message, code = r.text[:500], None
            try:
                err = r.json().get("error") or {}
                message, code = err.get("message") or message, err.get("code")
            except (ValueError, AttributeError):
                pass
            raise GatewayAdminError(method, path, r.status_code, message, code)
        return r.json() if r.content else None

    def _params(self, force: bool = False, **extra: Any) -> dict[str, str]:
        params = {k: str(v) for k, v in extra.items() if v is not None}
        if self.served_model is not None:
            params["model"] = self.served_model
        if force:
            params["force"] = "true"
        return params

    def version(self) -> dict[str, Any]:
        """/version: this served model's live facts at the top level (when one is chosen or
        the gateway has only one), and every model's under `served_models`."""
        return self._call("GET", "/version", params=self._params())

    def routes(self) -> dict[str, Any]:
        return self._call("GET", "/admin/routes", params=self._params())

    def put_routes(self, routes: dict[str, Any], force: bool = False) -> dict[str, Any]:
        """Replace the routing state (a GET body, edited, PUT back: its generation guards it)."""
        return self._call("PUT", "/admin/routes", json=routes, params=self._params(force))

    def switch(self, colour: str | None = None, force: bool = False) -> dict[str, Any]:
        """Candidate (shadow) -> live; `colour` guards which colour is expected to go live."""
        return self._call("POST", "/admin/switch", params=self._params(force, colour=colour))

    def rollback(self, force: bool = False) -> dict[str, Any]:
        return self._call("POST", "/admin/rollback", params=self._params(force))

    def canary(self, weight: int, force: bool = False) -> dict[str, Any]:
        """Share (0-100 %) of live traffic the candidate answers."""
        return self._call("POST", "/admin/canary", json={"weight": weight}, params=self._params(force))

    def keys(self) -> list[dict[str, Any]]:
        return self._call("GET", "/admin/keys")["keys"]

    def create_key(self, name: str, rpm: int | None = None, burst: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "burst": burst}
        if rpm is not None:
            body["rpm"] = rpm
        return self._call("POST", "/admin/keys", json=body)

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/admin/keys/{key_id}")
