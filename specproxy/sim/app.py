"""The simulator's aiohttp application: routes, the error middleware, the response-start hook,
the ``/_sim/*`` control endpoints, and ``run_sim_server`` for ``specproxy sim``.

Every response, errors included, carries a ``request-id``; every ``/v1`` response carries
``anthropic-ratelimit-*`` headers. Handlers raise ``specproxy.errors`` exceptions and the
middleware renders them in Anthropic's error shape with the request's own id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from specproxy.errors import STATUS_ERROR_TYPES, SpecproxyError, error_response, new_request_id
from specproxy.serving import serve_forever
from specproxy.sim import engines
from specproxy.sim import messages as v1
from specproxy.sim.cache import Clock
from specproxy.sim.gates import SimClosing
from specproxy.sim.messages import ABORTED, BODY, LOG_ENTRY, PLAN, REQUEST_ID, SIM_STATE
from specproxy.sim.profile import SimProfile
from specproxy.sim.response import ratelimit_headers
from specproxy.sim.state import SimState

log = logging.getLogger("specproxy.sim")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CONTROL_PREFIX = "/_sim/"
_TOO_LARGE = "Request exceeds the maximum allowed number of bytes."


def _observed(request: web.Request) -> bool:
    """Whether the request goes into the request log (control and health requests do not)."""
    return not request.path.startswith(CONTROL_PREFIX) and request.path != "/healthz"


@web.middleware
async def sim_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give the request an id and a log record, read its body once, render errors (in the
    engine's shape under an engine dialect)."""
    state = request.app[SIM_STATE]
    dialect = state.profile.dialect
    rid = new_request_id()
    request[REQUEST_ID] = rid
    if _observed(request):
        entry = state.new_log_entry(request.method, request.path, request.query_string)
        request[LOG_ENTRY] = entry
    try:
        if request.can_read_body:
            body = await request.read()  # cached by aiohttp: handlers read the same bytes
            request[BODY] = body
            if LOG_ENTRY in request:
                request[LOG_ENTRY]["size"] = len(body)
                request[LOG_ENTRY]["sha256"] = v1.body_digest(body)
        return await handler(request)
    except (SpecproxyError, engines.EngineError) as exc:
        request.pop(PLAN, None)
        if dialect != "anthropic" or isinstance(exc, engines.EngineError):
            return engines.render(dialect, exc)
        return error_response(exc.status, exc.error_type, exc.message, request_id=rid, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        request.pop(PLAN, None)
        message = _TOO_LARGE if exc.status == 413 else (exc.reason or "Error")
        if dialect != "anthropic":
            return engines.error_response(dialect, exc.status, message)
        return error_response(exc.status, STATUS_ERROR_TYPES.get(exc.status, "api_error"), message,
                              request_id=rid)
    except SimClosing:
        return v1.abort(request)


async def _on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """The response begins: stamp headers, make the request's cache writes readable, log it."""
    if request.get(ABORTED):
        return
    state = request.app[SIM_STATE]
    if state.profile.dialect != "anthropic":
        response.headers["Server"] = engines.SERVER_HEADER[state.profile.dialect]
    else:
        rid = request.get(REQUEST_ID)
        if rid is not None:
            response.headers.setdefault("request-id", rid)
        if request.path.startswith("/v1/"):
            for name, value in ratelimit_headers().items():
                response.headers.setdefault(name, value)
    plan = request.get(PLAN)
    if plan is not None:
        state.commit(plan)
    entry = request.get(LOG_ENTRY)
    if entry is not None:
        entry["response_started_at"] = time.monotonic()
        entry["status"] = response.status
        entry["request_id"] = response.headers.get("request-id")


async def _on_shutdown(app: web.Application) -> None:
    # Held, stalled and sleeping requests give up now; otherwise the runner would wait for them
    # for its whole shutdown timeout.
    app[SIM_STATE].gates.close()


async def root(request: web.Request) -> web.StreamResponse:
    """``GET /`` and ``HEAD /`` (Claude Code probes the base URL first)."""
    return v1.json_response({"status": "ok", "service": "specproxy-sim"})


async def healthz(request: web.Request) -> web.StreamResponse:
    """``GET /healthz``."""
    return v1.json_response({"status": "ok"})


async def sim_stats(request: web.Request) -> web.StreamResponse:
    """``GET /_sim/stats``: cache counters in total, by tenant and by path."""
    return v1.json_response(request.app[SIM_STATE].stats())


async def sim_reset(request: web.Request) -> web.StreamResponse:
    """``POST /_sim/reset``: clear the cache, counters, request log and gates."""
    request.app[SIM_STATE].reset()
    return v1.json_response({"status": "reset"})


async def sim_requests(request: web.Request) -> web.StreamResponse:
    """``GET /_sim/requests``: the recent requests, oldest first (no credential, no prompt text)."""
    return v1.json_response(list(request.app[SIM_STATE].log))


async def sim_gates(request: web.Request) -> web.StreamResponse:
    """``GET /_sim/gates``: requests held, by gate name."""
    return v1.json_response(request.app[SIM_STATE].gates.waiting())


async def sim_open_gate(request: web.Request) -> web.StreamResponse:
    """``POST /_sim/gates/{name}/open``: release the gate's current and future waiters."""
    name = request.match_info["name"]
    released = request.app[SIM_STATE].gates.open(name)
    return v1.json_response({"gate": name, "released": released})


def create_sim_app(
    profile: SimProfile | None = None, *, clock: Clock | None = None, state: SimState | None = None
) -> web.Application:
    """Build the simulator app. ``clock`` (seconds, monotonic) drives TTLs; tests inject their own."""
    profile = profile or (state.profile if state is not None else SimProfile())
    if state is None:
        state = SimState(profile, clock=clock) if clock is not None else SimState(profile)
    # Above the API's 32 MB limit so the handler can answer 413 in Anthropic's shape itself.
    app = web.Application(middlewares=[sim_middleware], client_max_size=2 * profile.max_body_bytes)
    app[SIM_STATE] = state
    app.on_response_prepare.append(_on_response_prepare)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/", root)
    app.router.add_get("/healthz", healthz)
    if profile.dialect == "anthropic":
        app.router.add_post("/v1/messages", v1.messages)
        app.router.add_post("/v1/messages/count_tokens", v1.count_tokens)
        app.router.add_get("/v1/models", v1.list_models)
        app.router.add_get("/v1/models/{model_id}", v1.get_model)
    else:
        engines.add_routes(app, profile.dialect)
    app.router.add_get("/_sim/stats", sim_stats)
    app.router.add_post("/_sim/reset", sim_reset)
    app.router.add_get("/_sim/requests", sim_requests)
    app.router.add_get("/_sim/gates", sim_gates)
    app.router.add_post("/_sim/gates/{name}/open", sim_open_gate)
    return app


def run_sim_server(host: str, port: int, profile: SimProfile) -> None:
    """Run the simulator until SIGINT/SIGTERM (``specproxy sim``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.info("dialect %s; time scale %s; %d models", profile.dialect, profile.time_scale, len(profile.models))
    serve_forever(lambda: create_sim_app(profile), host, port, banner="specproxy sim")
