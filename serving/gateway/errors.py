"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}``.

Everything the gateway answers with a non-2xx status goes through `OpenAIError` (or the
exception handlers in `app` that convert FastAPI/Starlette errors into it), so the official
`openai` client raises its usual typed exceptions (BadRequestError, NotFoundError, ...).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", code=code, param=param)


def model_not_found(model: str, known: list[str] | None = None, what: str = "") -> OpenAIError:
    """OpenAI's 404 for an unknown `model`, naming the served models (`known`) so a client
    with a typo sees the right id at once. `what="routes"`: the admin API's wording."""
    served = f"Served models: {', '.join(known)}." if known else "No model is served yet."
    if what == "routes":
        message = f"The served model `{model}` has no routes. {served}"
    else:
        message = f"The model `{model}` does not exist or you do not have access to it. {served}"
    return OpenAIError(404, message, "invalid_request_error", code="model_not_found", param="model")


def no_live_route() -> OpenAIError:
    return OpenAIError(503, "No live model is routed yet; try again later.", "server_error", code="no_live_route")


def unauthorized(message: str = "Missing or invalid bearer token.") -> OpenAIError:
    return OpenAIError(401, message, "authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def conflict(message: str, code: str = "conflict") -> OpenAIError:
    return OpenAIError(409, message, "invalid_request_error", code=code)


def rate_limited(key_id: str, rpm: int, retry_after_s: float) -> OpenAIError:
    import math

    wait = max(1, math.ceil(retry_after_s))
    return OpenAIError(
        429, f"Rate limit reached for key {key_id}: {rpm} requests per minute. Retry in {wait} s.",
        "requests", code="rate_limit_exceeded", headers={"Retry-After": str(wait)},
    )


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"The request body is larger than {limit} bytes.", "invalid_request_error",
                       code="request_too_large")
