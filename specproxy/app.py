"""The aiohttp application: routes, the error middleware, and the resources opened at start-up.

Built by one factory, :func:`create_app`; state lives under typed ``AppKey``s, resources open and
close in ``cleanup_ctx``. No globals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from specproxy import logs
from specproxy.admin import healthz, json_response, metrics_endpoint, openapi, status_json, status_page
from specproxy.bodies import cut, with_implicit_breakpoint
from specproxy.config import Settings
from specproxy.credentials import Credentials
from specproxy.errors import (
    AuthenticationFailed,
    InvalidRequest,
    NotFound,
    SpecproxyError,
)
from specproxy.forward import Forwarder, Relayed, upstream_request_headers
from specproxy.guard import error_middleware, own_paths_middleware, unanswered_status
from specproxy.hold import HELD, HIT, Holder, HoldLimits, Verdict
from specproxy.keys import (
    CREDENTIALS,
    FORWARDER,
    HOLDER,
    LOG,
    METRICS,
    REGISTRY,
    SETTINGS,
    SPECULATOR,
    STARTED,
    TIMERS,
    WARMER,
    Handler,
)
from specproxy.metrics import DEFAULT_PRICING, Metrics
from specproxy.prefix import PrefixError, compute
from specproxy.registry import Kind, MemoryRegistry, Registry, State, Warm
from specproxy.serving import SERVER_OPTIONS, SERVER_STATS, ServerOptions, ServerStats, descriptor_budget, serve_forever
from specproxy.speculate import Speculator
from specproxy.usage import Usage
from specproxy.warmer import TenantWarmLimits, Warmer, WarmResult

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
async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``: route (maybe hold), then forward the original bytes."""
    app = request.app
    app[CREDENTIALS].check(request.headers)
    raw = await request.read()
    fields = request[LOG]
    try:
        verdict = await app[HOLDER].route(request.headers, raw)
    except asyncio.CancelledError:
        fields["outcome"] = "abandoned"  # the client left while held: nothing went upstream
        raise
    fields.update(outcome=verdict.outcome, wait_ms=verdict.wait_ms, prefix=verdict.prefix, tenant=verdict.tenant)
    metrics = app[METRICS]
    if verdict.held_s is not None:
        metrics.hold_seconds.observe(verdict.held_s)
    if verdict.coalesced and verdict.outcome == HELD:
        metrics.coalesced.inc()
    speculator = app[SPECULATOR]
    next_turn = speculator.wants_next_turn(request.headers)
    leader = verdict.leader
    registry = app[REGISTRY]

    async def leader_started(usage: Usage | None) -> None:
        # This request led its prefix: its response has begun, so the cache entry exists now.
        assert leader is not None
        state = State.WARM if usage and (usage.cache_read or usage.cache_written) else State.UNCACHEABLE
        await registry.settle(leader, state)
        parsed = verdict.parsed
        if state is State.WARM and speculator.keeps_bodies and verdict.body and parsed and not parsed.images:
            last = parsed.breakpoints[-1].position
            made = cut(verdict.body, parsed, last)
            if made is not None:
                speculator.keep_body(leader, made[0], made[1], request.headers, len(raw))
            speculator.used(leader, leader.ttl)

    try:
        relayed = await app[FORWARDER].forward(
            request,
            verdict.raw or raw,
            extra_headers=verdict.headers(),
            tap_usage=True,
            collect_content=next_turn,
            on_started=leader_started if leader is not None else None,
        )
    except SpecproxyError as exc:
        response = exc.to_response()
        response.headers.update(verdict.headers())
        return response
    finally:
        if leader is not None and not leader.settled:
            await registry.settle(leader, State.FAILED, error="leader request failed")
    _account(app, verdict, relayed, fields)
    if next_turn:
        await speculator.next_turn(verdict, relayed, request.headers)
    assert relayed.response is not None
    return relayed.response


def _account(app: web.Application, verdict: Verdict, relayed: Relayed, fields: dict[str, Any]) -> None:
    """Metrics and log fields of one relayed Messages call; flags a hit that read nothing."""
    metrics = app[METRICS]
    metrics.upstream_ttfb.labels("/v1/messages").observe(relayed.ttfb)
    metrics.upstream_total.labels("/v1/messages").observe(relayed.total)
    fields.update(upstream_request_id=relayed.request_id, upstream_ttfb_ms=round(relayed.ttfb * 1000, 2),
                  upstream_ms=round(relayed.total * 1000, 2))
    if relayed.broken:
        fields["broken"] = True
    usage = relayed.usage
    if usage is None:
        return
    fields.update(model=relayed.model, usage=usage.as_dict())
    metrics.usage(usage, relayed.model, verdict.tenant)
    if verdict.outcome in (HIT, HELD) and usage.cache_read == 0:
        metrics.warm_mismatch()
        fields["mismatch"] = True
        log.warning(
            "prefix %s was %s but the response read no cache: the prompt may be under the model's minimum, "
            "or differ from the warm before its breakpoint",
            verdict.prefix, verdict.outcome,
        )


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

    request[LOG]["tenant"] = tenant
    warm, started = await app[WARMER].warm(
        tenant, parsed, body, app[CREDENTIALS].to_upstream(upstream_request_headers(request.headers))
    )
    if started:
        app[SPECULATOR].keep_body(warm, body, parsed, request.headers, len(raw))
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
def create_app(settings: Settings, *, registry: Registry | None = None) -> web.Application:
    """Build the proxy application for ``settings`` (the registry may be supplied, e.g. a shared one)."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[access_middleware, error_middleware, own_paths_middleware],
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
    metrics = Metrics(
        tenant_label=settings.metrics_tenant_label,
        pricing={**DEFAULT_PRICING, **{name: (p_in, p_out) for name, p_in, p_out in settings.pricing}},
    )
    app[METRICS] = metrics
    credentials = Credentials(settings.upstream_api_key, settings.client_tokens)
    app[CREDENTIALS] = credentials
    timers: set[asyncio.TimerHandle] = set()
    app[TIMERS] = timers
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
        )
    app[REGISTRY] = reg
    holder = Holder(
        reg,
        max_hold=settings.max_hold,
        limits=HoldLimits(settings.max_held_total, settings.max_held_per_tenant),
        volatile_prefixes=settings.volatile_system_prefixes,
        coalesce=settings.coalesce,
        inject=settings.inject_breakpoints,
        tenant_of=credentials.tenant,
    )
    app[HOLDER] = holder
    metrics.held.set_function(lambda: holder.held)

    def on_settled(warm: Warm, result: WarmResult) -> None:
        metrics.warm_settled(str(result.state), result.mode, warm.tenant)
        if result.usage:
            metrics.usage(Usage.from_api(result.usage), warm.model, warm.tenant)
        if result.state is State.WARM:
            app[SPECULATOR].used(warm, warm.ttl)  # a fresh warm is in use: keep-warm may keep it
            # A warm nobody used before its TTL ran out was money spent for nothing: count it.
            def check() -> None:
                timers.discard(handle)
                if warm.uses == 0:
                    metrics.warm_wasted()
                    if warm.kind is Kind.NEXT_TURN:
                        metrics.next_turn.labels("unused").inc()

            delay = max(0.0, warm.started_at + warm.ttl - time.monotonic())
            handle = asyncio.get_running_loop().call_later(delay, check)
            timers.add(handle)

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        start = getattr(reg, "start", None)
        if start is not None:
            await start()  # a shared registry connects here; it never raises (starts degraded)
        pool, _ = descriptor_budget(settings.upstream_max_connections, settings.client_max_connections)
        if settings.upstream_max_connections and pool < settings.upstream_max_connections:
            log.warning("upstream_max_connections lowered to %d to fit the open-files limit", pool)
        connector = aiohttp.TCPConnector(
            limit=pool, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True,
            keepalive_timeout=settings.upstream_idle_timeout,
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
            pool_timeout=settings.upstream_pool_timeout,
            credentials=credentials,
        )
        app[WARMER] = Warmer(
            session,
            settings.upstream,
            reg,
            warm_timeout=settings.warm_timeout,
            limits=TenantWarmLimits(settings.max_warms_in_flight_per_tenant, settings.warms_per_minute_per_tenant,
                                    settings.credential_state_max),
        )
        app[WARMER].subscribe(on_settled)
        speculator = Speculator(settings, reg, app[WARMER], metrics, credentials)
        app[SPECULATOR] = speculator
        holder.speculation = speculator
        yield
        await speculator.close()
        for handle in timers:
            handle.cancel()
        # Shutdown, in order: stop background warms (they settle as failed, releasing holders),
        # close the registry, then the pooled upstream connections.
        await app[WARMER].close()
        await reg.close()
        await session.close()

    async def release_held(app: web.Application) -> None:
        # Shutdown step 2 (after the listener closed): held requests go upstream now, not dropped;
        # the runner then lets open streams finish for up to `drain_timeout`.
        holder.drain()

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
