"""The admin credential: one bearer token guarding /admin/*.

Source, in order: env TUNESHIP_GATEWAY_ADMIN_TOKEN; else a random token created once (by
whichever replica gets there first: O_CREAT|O_EXCL, mode 0600) at home/gateway/admin_token
and read by every replica sharing that home. Compared with hmac.compare_digest.

Client API keys (a later issue) get their own dependency beside `require_admin`.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from serving.gateway.errors import unauthorized
from tuneship.gateway_admin import load_or_create_token

__all__ = ["AdminAuth", "load_or_create_token"]


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
