"""The aiohttp application: routes, the error middleware, and the resources opened at start-up.

Built by one factory, :func:`create_app`; state lives under typed ``AppKey``s, resources open and
close in ``cleanup_ctx``. No globals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from specproxy import __version__
from specproxy.config import Settings
from specproxy.errors import (
    AuthenticationFailed,
    InvalidRequest,
    NotFound,
    SpecproxyError,
    from_http_exception,
)
from specproxy.forward import Forwarder, upstream_request_headers
from specproxy.hold import Holder, HoldLimits, credential
from specproxy.prefix import PrefixError, compute, tenant_digest, with_implicit_breakpoint
from specproxy.registry import MemoryRegistry, Registry
from specproxy.serving import serve_forever
from specproxy.warmer import TenantWarmLimits, Warmer

log = logging.getLogger("specproxy.app")
OPENAPI_PATH = Path(__file__).with_name("openapi.json")

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", Registry)  # type: ignore[type-abstract]
HOLDER = web.AppKey("holder", Holder)
FORWARDER = web.AppKey("forwarder", Forwarder)
WARMER = web.AppKey("warmer", Warmer)
STARTED = web.AppKey("started", float)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error the proxy raises itself in Anthropic's shape."""
    try:
        return await handler(request)
    except SpecproxyError as exc:
        return exc.to_response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return from_http_exception(exc)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object (a Messages request).")
    return body


def _require_credential(request: web.Request) -> str:
    cred = credential(request.headers)
    if cred is None:
        raise AuthenticationFailed("x-api-key header is required")
    return tenant_digest(cred)


# --- handlers -------------------------------------------------------------------------------------
async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``: route (maybe hold), then forward the original bytes."""
    raw = await request.read()
    verdict = await request.app[HOLDER].route(request.headers, raw)
    return await request.app[FORWARDER].forward(request, raw, extra_headers=verdict.headers())


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Every path that is not the proxy's own goes upstream untouched."""
    raw = await request.read()
    return await request.app[FORWARDER].forward(request, raw)


async def prewarm(request: web.Request) -> web.Response:
    """``POST /prewarm``: register the body's cacheable prefix and warm it upstream in the background."""
    app = request.app
    raw = await request.read()
    tenant = _require_credential(request)
    body = _parse_object(raw)
    if not isinstance(body.get("model"), str):
        raise InvalidRequest("model: Field required (a string)")
    messages_ = body.get("messages")
    if not isinstance(messages_, list) or not messages_:
        raise InvalidRequest("messages: Input should be a non-empty list")
    settings = app[SETTINGS]
    try:
        parsed = compute(body, tenant, settings.volatile_system_prefixes)
        if not parsed.breakpoints:
            body = with_implicit_breakpoint(body)
            parsed = compute(body, tenant, settings.volatile_system_prefixes)
    except PrefixError as exc:
        raise InvalidRequest(str(exc)) from None

    warmer = app[WARMER]
    warmer.limits.acquire(tenant)
    warm, started = await app[REGISTRY].begin(tenant, parsed)
    if started:
        warmer.start(warm, body, upstream_request_headers(request.headers))
    else:
        warmer.limits.release(tenant, started=False)

    status = 202
    if request.query.get("wait") in ("1", "true", "yes"):
        await warm.wait(settings.warm_timeout)
        status = 200
    return _json(
        {"prefix": warm.prefix, "state": str(warm.state), "breakpoints": warm.breakpoints, "sent": started},
        status=status,
    )


async def prewarm_state(request: web.Request) -> web.Response:
    """``GET /prewarm/{prefix}``: a warm's state, to its own tenant only (404 to anyone else)."""
    tenant = _require_credential(request)
    found = await request.app[REGISTRY].get(tenant, request.match_info["prefix"])
    if found is None:
        raise NotFound("No warm with that prefix id for this credential.")
    warm, expires_at = found
    return _json(warm.as_json(time.monotonic(), expires_at))


async def openapi(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the OpenAPI document of the proxy's own endpoints."""
    return web.Response(body=OPENAPI_PATH.read_bytes(), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: liveness and a little state, never secrets."""
    app = request.app
    return _json(
        {
            "status": "ok",
            "version": __version__,
            "registry": app[SETTINGS].registry,
            "held": app[HOLDER].held,
            "warms_in_flight": app[WARMER].in_flight,
            "uptime_s": round(time.monotonic() - app[STARTED], 3),
        }
    )


# --- the factory ----------------------------------------------------------------------------------
def create_app(settings: Settings, *, registry: Registry | None = None) -> web.Application:
    """Build the proxy application for ``settings`` (the registry may be supplied, e.g. a shared one)."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[error_middleware])
    app[SETTINGS] = settings
    app[STARTED] = time.monotonic()
    reg: Registry = registry or MemoryRegistry(
        max_entries=settings.registry_max_entries,
        warm_timeout=settings.warm_timeout,
        failed_ttl=settings.failed_ttl,
        rewarm_margin=settings.rewarm_margin,
    )
    app[REGISTRY] = reg
    app[HOLDER] = Holder(
        reg,
        max_hold=settings.max_hold,
        limits=HoldLimits(settings.max_held_total, settings.max_held_per_tenant),
        volatile_prefixes=settings.volatile_system_prefixes,
    )

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(
            limit=settings.upstream_max_connections, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True
        )
        # auto_decompress off: compressed responses are relayed as the upstream sent them.
        # DummyCookieJar: a proxy must never carry one tenant's cookies to another.
        session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        app[FORWARDER] = Forwarder(
            session,
            settings.upstream,
            read_timeout=settings.upstream_read_timeout,
            connect_timeout=settings.upstream_connect_timeout,
        )
        app[WARMER] = Warmer(
            session,
            settings.upstream,
            reg,
            warm_timeout=settings.warm_timeout,
            limits=TenantWarmLimits(settings.max_warms_in_flight_per_tenant, settings.warms_per_minute_per_tenant),
        )
        yield
        # Shutdown, in order: stop background warms (they settle as failed, releasing holders),
        # close the registry, then the pooled upstream connections.
        await app[WARMER].close()
        await reg.close()
        await session.close()

    app.cleanup_ctx.append(upstream_ctx)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/prewarm", prewarm)
    app.router.add_get("/prewarm/{prefix}", prewarm_state)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_route("*", "/{tail:.*}", passthrough)
    return app


def serve(settings: Settings) -> None:
    """Run the proxy until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve_forever(lambda: create_app(settings), settings.host, settings.port, banner="specproxy")
