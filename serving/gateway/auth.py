"""Credentials: the admin bearer token for /admin/*, client API keys for /v1/*.

Source, in order: env TUNESHIP_GATEWAY_ADMIN_TOKEN; else a random token created once (by
whichever replica gets there first: O_CREAT|O_EXCL, mode 0600) at home/gateway/admin_token
and read by every replica sharing that home. Compared with hmac.compare_digest.

Client keys (`ClientAuth`) live in serving.gateway.keys, hashed. The admin token is not a
client key: on /v1/* it is only accepted for an admin-pinned smoke request
(X-Tuneship-Target), which the app checks with `AdminAuth`.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from serving.gateway.errors import unauthorized
from serving.gateway.keys import ClientKey, KeyStore
from tuneship.gateway_admin import load_or_create_token

__all__ = ["AdminAuth", "ClientAuth", "load_or_create_token"]


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    presented = presented.strip()
    return presented if scheme.lower() == "bearer" and presented else None


class AdminAuth:
    def __init__(self, token: str) -> None:
        if len(token) < 16:
            raise ValueError("the admin token must be at least 16 characters")
        self._token = token.encode()

    def check(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise unauthorized()
        if not hmac.compare_digest(presented.strip().encode(), self._token):
            raise unauthorized()


class ClientAuth:
    """Client API keys. `check` returns the key record, None when keys are not enforced (auto
    mode before the first key is issued), or raises 401."""

    def __init__(self, store: KeyStore, mode: str = "auto") -> None:
        self.store = store
        self.mode = mode

    def enforced(self, keys: dict[str, ClientKey] | None = None) -> bool:
        """Keys required: always in `required` mode, in `auto` once any key was issued."""
        return self.mode == "required" or bool(self.store.keys() if keys is None else keys)

    def check(self, request: Request) -> ClientKey | None:
        keys = self.store.keys()  # one look at the keys file per request, not one per question
        if not self.enforced(keys):
            return None
        presented = bearer(request)
        if presented is None:
            raise unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
        key = self.store.verify(presented, keys)
        if key is None:
            raise unauthorized("Incorrect API key provided.")
        return key
