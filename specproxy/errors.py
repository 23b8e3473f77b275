"""Errors a client can see, in Anthropic's error JSON shape, and their rendering.

Tree of the errors the proxy raises (each carries its HTTP status and Anthropic error type):

    SpecproxyError                      500 api_error
    ├── InvalidRequest                  400 invalid_request_error
    ├── AuthenticationFailed            401 authentication_error
    ├── PermissionDenied                403 permission_error
    ├── NotFound                        404 not_found_error
    ├── BodyTimeout                     408 timeout_error      (the client stopped sending its body)
    ├── RequestTooLarge                 413 request_too_large
    ├── RateLimited                     429 rate_limit_error   (sets retry-after)
    ├── UpstreamUnavailable             502 api_error
    ├── UpstreamTimeout                 504 timeout_error
    └── Overloaded                      529 overloaded_error

Handlers raise; one middleware (``specproxy.app``) renders. The simulator reuses the shape helpers
so both speak exactly the same error JSON.
"""

from __future__ import annotations

import secrets
from typing import ClassVar, Final

import orjson
from aiohttp import web

JSON_CONTENT_TYPE: Final = "application/json"
_ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def new_request_id(prefix: str = "req_") -> str:
    """A request id in Anthropic's style (``req_`` and 24 base62 characters)."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def error_body(error_type: str, message: str, request_id: str) -> bytes:
    """The JSON bytes of an Anthropic error response."""
    return orjson.dumps(
        {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}
    )


def error_response(
    status: int,
    error_type: str,
    message: str,
    *,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A complete aiohttp response carrying an Anthropic-shaped error and a ``request-id`` header."""
    rid = request_id or new_request_id()
    hdrs = {"request-id": rid}
    if headers:
        hdrs.update(headers)
    return web.Response(
        status=status,
        body=error_body(error_type, message, rid),
        content_type=JSON_CONTENT_TYPE,
        headers=hdrs,
    )


class SpecproxyError(Exception):
    """Base of every error the proxy answers with itself (not relayed from upstream)."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "api_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def to_response(self) -> web.Response:
        return error_response(self.status, self.error_type, self.message, headers=self.headers)


class InvalidRequest(SpecproxyError):
    status = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(SpecproxyError):
    status = 401
    error_type = "authentication_error"


class PermissionDenied(SpecproxyError):
    status = 403
    error_type = "permission_error"


class NotFound(SpecproxyError):
    status = 404
    error_type = "not_found_error"


class BodyTimeout(SpecproxyError):
    status = 408
    error_type = "timeout_error"


class RequestTooLarge(SpecproxyError):
    status = 413
    error_type = "request_too_large"


class RateLimited(SpecproxyError):
    status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, headers={"retry-after": str(max(1, round(retry_after)))})


class UpstreamUnavailable(SpecproxyError):
    status = 502
    error_type = "api_error"


class UpstreamTimeout(SpecproxyError):
    status = 504
    error_type = "timeout_error"


class Overloaded(SpecproxyError):
    status = 529
    error_type = "overloaded_error"


# aiohttp raises its own HTTPException subclasses for protocol-level problems (body too large,
# method not allowed); map their statuses to Anthropic error types at this one boundary.
STATUS_ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def from_http_exception(exc: web.HTTPException) -> web.Response:
    """Render an aiohttp ``HTTPException`` in Anthropic's error shape."""
    error_type = STATUS_ERROR_TYPES.get(exc.status, "api_error")
    message = exc.reason if exc.status != 413 else "Request body too large."
    return error_response(exc.status, error_type, message)
