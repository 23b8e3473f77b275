"""The aiohttp application: routes, the error middleware, and the resources opened at start-up.

Built by one factory, :func:`create_app`; state lives under typed ``AppKey``s, resources open and
close in ``cleanup_ctx``. No globals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from specproxy import logs, tracing
from specproxy.accounting import Accounting
from specproxy.admin import healthz, json_response, metrics_endpoint, openapi, status_json, status_page
from specproxy.bodies import with_implicit_breakpoint
from specproxy.coalesce import Coalescer, HoldLimits
from specproxy.config import Settings
from specproxy.credentials import Credentials
from specproxy.errors import (
    AuthenticationFailed,
    InvalidRequest,
    NotFound,
)
from specproxy.forward import Forwarder
from specproxy.guard import error_middleware, unanswered_status
from specproxy.keys import (
    COALESCER,
    CREDENTIALS,
    FORWARDER,
    LOG,
    METRICS,
    REGISTRY,
    SETTINGS,
    SPECULATOR,
    STARTED,
    WARMER,
    Handler,
)
from specproxy.metrics import DEFAULT_PRICING, Metrics
from specproxy.pipeline import Pipeline, upstream_headers_of
from specproxy.prefix import PrefixError, compute
from specproxy.registry import MemoryRegistry, Registry
from specproxy.serving import SERVER_OPTIONS, SERVER_STATS, ServerOptions, ServerStats, descriptor_budget, serve_forever
from specproxy.speculate import Speculator
from specproxy.upstream_profile import UPSTREAM, match_positions, resolve
from specproxy.warmer import TenantWarmLimits, Warmer

log = logging.getLogger("specproxy.app")


def _route_label(request: web.Request) -> str:
    """A bounded label for metrics: the route's canonical path, or ``passthrough``."""
    info = request.match_info.route.resource
    canonical = info.canonical if info is not None else ""
    return "passthrough" if canonical in ("", "/{tail}") else canonical


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One log line and one request count per request, whatever happened to it."""
    start = time.monotonic()
    fields: dict[str, Any] = {}
    request[LOG] = fields
    status = 0
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        if not status:
            status = unanswered_status(request)  # 499 (nginx's convention) only if the client left
        outcome = fields.get("outcome", "none")
        path = _route_label(request)
        request.app[METRICS].request(path, status, outcome, fields.get("tenant"))
        fields.pop("tenant", None)
        logs.access(
            {
                "method": logs.method_label(request.method),
                "path": request.path,
                "status": status,
                **fields,
                "ms": round((time.monotonic() - start) * 1000, 2),
            }
        )


def _parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object (a Messages request).")
    return body


def _require_credential(request: web.Request) -> str:
    request.app[CREDENTIALS].check(request.headers)
    tenant = request.app[CREDENTIALS].tenant(request.headers)
    if tenant is None:
        raise AuthenticationFailed("x-api-key header is required")
    return tenant


# --- handlers -------------------------------------------------------------------------------------
PIPELINE = web.AppKey("pipeline", Pipeline)


async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``: the request path (specproxy.pipeline)."""
    return await request.app[PIPELINE](request)


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Every path that is not the proxy's own goes upstream untouched, its body streamed (no size cap)."""
    request.app[CREDENTIALS].check(request.headers)
    relayed = await request.app[FORWARDER].forward(request, None)
    assert relayed.response is not None
    return relayed.response


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
    except PrefixError as exc:
        raise InvalidRequest(str(exc)) from None
    if not parsed.breakpoints:
        # The implicit breakpoint: automatic caching, which lands on the last cacheable block.
        if not parsed.cacheable:
            raise InvalidRequest("cache_control: no block in the request can carry a cache breakpoint")
        body = with_implicit_breakpoint(body)
        parsed = parsed.with_breakpoint(max(parsed.cacheable))
    if app[WARMER].profile.engine:
        parsed = match_positions(parsed)  # automatic prefix caching: registered at block positions

    request[LOG]["tenant"] = tenant
    headers = upstream_headers_of(app[CREDENTIALS], request)
    warm, started = await app[WARMER].warm(tenant, parsed, body, headers)
    if started:
        app[SPECULATOR].keep(warm, body, parsed, headers, len(raw))
    request[LOG].update(prefix=warm.prefix, outcome="prewarm-sent" if started else "prewarm-deduplicated")
    status = 202
    if request.query.get("wait") in ("1", "true", "yes"):
        await warm.wait(settings.warm_timeout)
        status = 200
    return json_response(
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
    return json_response(warm.as_json(time.monotonic(), expires_at))


# --- the factory ----------------------------------------------------------------------------------
def create_app(
    settings: Settings, *, registry: Registry | None = None, tracer: tracing.OtelTracing | None = None
) -> web.Application:
    """Build the proxy application for ``settings`` (the registry may be supplied, e.g. a shared one;
    ``tracer`` replaces the tracing ``otel_*`` settings would set up)."""
    tracer = tracer or tracing.setup(settings)
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[*((tracer.middleware,) if tracer else ()), access_middleware, error_middleware],
    )
    app[SETTINGS] = settings
    app[SERVER_OPTIONS] = ServerOptions(
        header_timeout=settings.client_header_timeout,
        body_timeout=settings.client_body_timeout,
        idle_timeout=settings.client_idle_timeout,
        max_connections=settings.client_max_connections,
        auto_decompress=False,  # relay request bodies as sent: never inflated, never mislabelled
        error_headers=(("X-Cache-Warm", "bypass"), ("X-Cache-Warm-Wait-Ms", "0")),
    )
    app[SERVER_STATS] = ServerStats()
    app[STARTED] = time.monotonic()
    app[tracing.ENABLED] = tracer is not None
    metrics = Metrics(
        tenant_label=settings.metrics_tenant_label,
        pricing={**DEFAULT_PRICING, **{name: (p_in, p_out) for name, p_in, p_out in settings.pricing}},
    )
    app[METRICS] = metrics
    credentials = Credentials(settings.upstream_api_key, settings.client_tokens)
    app[CREDENTIALS] = credentials
    reg: Registry
    if registry is not None:
        reg = registry
    elif settings.registry == "redis":
        from specproxy.registry_redis import RedisRegistry

        reg = RedisRegistry.from_settings(settings)
    else:
        reg = MemoryRegistry(
            max_entries=settings.registry_max_entries,
            warm_timeout=settings.warm_timeout,
            failed_ttl=settings.failed_ttl,
            rewarm_margin=settings.rewarm_margin,
            ttl_scale=settings.cache_ttl_scale,
            max_entries_per_tenant=settings.max_entries_per_tenant,
        )
    app[REGISTRY] = reg
    limits = HoldLimits(settings.max_held_total, settings.max_held_per_tenant, settings.max_held_bytes)
    metrics.held.set_function(lambda: limits.total)
    accounting = Accounting(metrics)

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        start = getattr(reg, "start", None)
        if start is not None:
            await start()  # a shared registry connects here; it never raises (starts degraded)
        pool, _ = descriptor_budget(settings.upstream_max_connections, settings.client_max_connections)
        if settings.upstream_max_connections and pool < settings.upstream_max_connections:
            log.warning("upstream_max_connections lowered to %d to fit the open-files limit", pool)
        # What serves the upstream (upstream_profile; "auto" asks it): how warms go, usage reads,
        # prefixes match, and whether its connections can be pooled at all.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as probe:
            app[UPSTREAM] = await resolve(settings.upstream_profile, probe, settings.upstream)
        profile = app[UPSTREAM].profile
        # An upstream that drops a kept-alive connection after a stream (llama-server) gets a fresh
        # connection per request: a pooled one could be dead when the next request is written into
        # it, and that request lost.
        reuse: dict[str, Any] = (
            {"force_close": True} if profile.closes_after_stream
            else {"keepalive_timeout": settings.upstream_idle_timeout}
        )
        connector = aiohttp.TCPConnector(limit=pool, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True,
                                         **reuse)
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
            pool_timeout=settings.upstream_pool_timeout,
            credentials=credentials,
        )
        warmer = Warmer(
            session,
            settings.upstream,
            reg,
            warm_timeout=settings.warm_timeout,
            limits=TenantWarmLimits(settings.max_warms_in_flight_per_tenant, settings.warms_per_minute_per_tenant,
                                    settings.credential_state_max),
        )
        app[WARMER] = warmer
        warmer.subscribe(accounting.warm_settled)
        if tracer is not None:
            warmer.subscribe(tracer.warm_settled)
        speculator = Speculator(settings, reg, warmer, metrics)  # subscribes itself
        app[SPECULATOR] = speculator
        coalescer = Coalescer(reg, warmer, max_hold=settings.max_hold, limits=limits, coalesce=settings.coalesce)
        coalescer.on_use(speculator.used)
        app[COALESCER] = coalescer
        app[PIPELINE] = Pipeline(settings, credentials, reg, coalescer, app[FORWARDER], speculator, accounting)
        warmer.profile = app[PIPELINE].profile = profile
        yield
        await speculator.close()
        accounting.close()
        # Shutdown, in order: stop background warms (they settle as failed, releasing holders),
        # close the registry, then the pooled upstream connections.
        await warmer.close()
        await reg.close()
        await session.close()
        if tracer is not None:
            await tracer.close()

    async def release_held(app: web.Application) -> None:
        # Shutdown step 2 (after the listener closed): held requests go upstream now, not dropped;
        # the runner then lets open streams finish for up to `drain_timeout`.
        if COALESCER in app:
            app[COALESCER].drain()

    app.cleanup_ctx.append(upstream_ctx)
    app.on_shutdown.append(release_held)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/prewarm", prewarm)
    app.router.add_get("/prewarm/{prefix}", prewarm_state)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/status", status_page)
    app.router.add_get("/status.json", status_json)
    app.router.add_route("*", "/{tail:.*}", passthrough)
    return app


def serve(settings: Settings) -> None:
    """Run the proxy until SIGINT/SIGTERM."""
    logs.configure(settings.log_level, settings.log_format)
    serve_forever(
        lambda: create_app(settings), settings.host, settings.port, banner="specproxy",
        shutdown_timeout=settings.drain_timeout,
    )
