"""Request body size limit as plain ASGI middleware (no per-request task, unlike BaseHTTPMiddleware).

A declared Content-Length over the limit is answered 413 at once, without reading the body.
A chunked body is counted as it is received; past the limit, reading it raises `BodyTooLarge`
(an HTTPException, so FastAPI's own body parsing re-raises it and the app answers 413).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException

from serving.gateway.errors import too_large


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than {limit} bytes.")
        self.limit = limit


class BodySizeLimit:
    def __init__(self, app: Any, max_bytes: int, on_reject: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0  # the server rejects a malformed length itself
                if declared > limit:
                    if self.on_reject is not None:
                        self.on_reject(scope["path"])
                    await too_large(limit).response()(scope, receive, send)
                    return
                break

        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)
