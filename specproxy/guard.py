"""The proxy's outer edge: errors in Anthropic's shape, its own paths kept its own, and who left.

- :func:`error_middleware` renders every failure as ``{"type": "error", "error": {...}}``: the
  proxy's own errors with their status, aiohttp's HTTP exceptions (413, 405) with theirs, and any
  unexpected exception as ``500 api_error`` with a fixed message (logged by kind and place only,
  never its text, which may quote client data). Errors on the Messages API surface (``/v1/…``)
  carry the ``X-Cache-Warm: bypass`` contract like every other answer there. It also keeps the
  proxy's own paths its own: a request whose raw path begins with one of the proxy's names
  (``/prewarm/../../v1/models``) and matches none of its routes is a 404, never sent upstream.
- :func:`client_left`: whether the client has gone (so the access log says 499 only then).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final
from urllib.parse import unquote

from aiohttp import web

from specproxy.errors import NotFound, SpecproxyError, error_response, from_http_exception
from specproxy.keys import Handler
from specproxy.outcome import HEADER, HEADER_WAIT
from specproxy.serving import client_left, frames_only

log = logging.getLogger("specproxy.guard")

# The first path segments the proxy owns: never forwarded, whatever follows them.
PROXY_OWNED: Final = frozenset({"prewarm", "healthz", "metrics", "status", "status.json", "openapi.json"})
BYPASS_HEADERS: Final = ((HEADER, "bypass"), (HEADER_WAIT, "0"))


def unanswered_status(request: web.BaseRequest) -> int:
    """The status to log for a request that ended without a response: 499 only if the client left."""
    return 499 if client_left(request) else 500


def _first_segment(raw_path: str) -> str:
    path = raw_path.split("?", 1)[0]
    return unquote(path[1:].split("/", 1)[0]).lower() if path.startswith("/") else ""


def proxy_owned(raw_path: str) -> bool:
    """Whether a raw request target is in the proxy's own namespace (``/prewarm…``, ``/status…``)."""
    return _first_segment(raw_path) in PROXY_OWNED


def _is_catch_all(request: web.Request) -> bool:
    resource = request.match_info.route.resource
    return resource is None or resource.canonical in ("", "/{tail}")




def _with_contract(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    if request.raw_path.startswith("/v1/"):
        for name, value in BYPASS_HEADERS:
            if name not in response.headers:
                response.headers[name] = value
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error in Anthropic's shape; an unexpected one is a 500 with a fixed message.

    A path in the proxy's namespace that no route of the proxy's matches is answered 404 here,
    never forwarded."""
    try:
        if _is_catch_all(request) and proxy_owned(request.raw_path):
            raise NotFound("This path belongs to the proxy and matches none of its endpoints; it is never forwarded.")
        return await handler(request)
    except SpecproxyError as exc:
        return _with_contract(request, exc.to_response())
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _with_contract(request, from_http_exception(exc))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if client_left(request) or request.writer.output_size > 0:
            raise  # nobody to answer, or an answer already begun: the connection is closed
        log.error("unexpected %s answering %s %s: %s", type(exc).__name__, request.method,
                  _route(request), frames_only(exc))
        return _with_contract(request, error_response(500, "api_error", "Internal error in the proxy."))


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else ""
    return "passthrough" if canonical in ("", "/{tail}") else canonical
