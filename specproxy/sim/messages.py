"""The ``/v1/*`` handlers: Messages (JSON and SSE), count_tokens, models, and injected faults,
with the typed app and request keys and the ``x-sim-*`` header names they use.

A Messages request goes: credential and version checks → body checks (shape, model, breakpoints,
conversation rules) → faults → cache lookup in its workspace (at arrival) → gate → prefill delay →
response. The cache writes it plans become readable when
its response begins (the app's ``on_response_prepare`` hook commits them), so a request whose
response never begins (stall, disconnect before any byte) writes nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from specproxy.errors import (
    AuthenticationFailed,
    InvalidRequest,
    NotFound,
    Overloaded,
    PermissionDenied,
    RateLimited,
    RequestTooLarge,
    SpecproxyError,
)
from specproxy.sim import response as out
from specproxy.sim.cache import CachePlan, Usage
from specproxy.sim.conversation import check_conversation
from specproxy.sim.profile import ModelSpec
from specproxy.sim.prompt import Prompt, build_prompt
from specproxy.sim.state import SimState, tenant_digest
from specproxy.sim.validate import MessagesRequest, parse_body

SIM_STATE: Final = web.AppKey("specproxy_sim_state", SimState)

REQUEST_ID: Final = web.RequestKey("specproxy_sim_request_id", str)
LOG_ENTRY: Final = web.RequestKey("specproxy_sim_log_entry", dict[str, Any])
BODY: Final = web.RequestKey("specproxy_sim_body", bytes)
PLAN: Final = web.RequestKey("specproxy_sim_plan", CachePlan)
ABORTED: Final = web.RequestKey("specproxy_sim_aborted", bool)

# Request headers that steer the simulator (never sent by real clients).
FAULT_HEADER: Final = "x-sim-fault"
GATE_HEADER: Final = "x-sim-gate"
DELAY_HEADER: Final = "x-sim-delay-ms"
REPLY_TOKENS_HEADER: Final = "x-sim-reply-tokens"
WORKSPACE_HEADER: Final = "anthropic-workspace-id"  # the SDKs' workspace_id parameter

FAULTS: Final = frozenset({"overloaded", "rate_limit", "api_error", "disconnect_mid_stream", "stall"})

JSON: Final = "application/json"
_DISCONNECT_AFTER_DELTAS: Final = 2


def json_response(data: Any, status: int = 200) -> web.Response:
    """A JSON response (orjson-encoded)."""
    return web.Response(status=status, body=orjson.dumps(data), content_type=JSON)


def abort(request: web.Request, resp: web.StreamResponse | None = None) -> web.StreamResponse:
    """Drop the connection without (the rest of) a response; nothing more is committed."""
    request[ABORTED] = True
    if request.transport is not None:
        request.transport.close()  # flushes what was written, then closes: no terminating chunk
    return resp if resp is not None else web.Response(status=204)


def authenticate(request: web.Request) -> str:
    """The tenant digest of the request's credential; 401 without one, 400 without a version."""
    credential = request.headers.get("x-api-key", "")
    if not credential:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            credential = token.strip()
    if not credential:
        raise AuthenticationFailed("x-api-key header is required")
    if not request.headers.get("anthropic-version"):
        raise InvalidRequest("anthropic-version: header is required")
    tenant = tenant_digest(credential)
    entry = request.get(LOG_ENTRY)
    if entry is not None:
        entry["tenant"] = tenant
    return tenant


def workspace(request: web.Request, state: SimState, tenant: str) -> str:
    """The workspace whose cache the request uses (the cache is isolated per workspace). A
    credential the profile assigns to a workspace may name only that one in the header."""
    requested = request.headers.get(WORKSPACE_HEADER) or None
    assigned = state.profile.workspace_of(tenant)
    if assigned is not None and requested is not None and requested != assigned:
        raise PermissionDenied(f"{WORKSPACE_HEADER}: this credential does not belong to workspace {requested}")
    ws = state.workspace_for(tenant, requested)
    entry = request.get(LOG_ENTRY)
    if entry is not None:
        entry["workspace"] = ws
    return ws


def _int_header(request: web.Request, name: str) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise InvalidRequest(f"{name}: header must be a non-negative integer")
    return number


async def _fault(request: web.Request, state: SimState) -> str | None:
    """Apply an ``x-sim-fault`` that answers at once (or never), after the request's gate if it
    names one, before any cache lookup (so it reads and writes nothing). Returns the fault name."""
    fault = request.headers.get(FAULT_HEADER)
    if fault is None:
        return None
    if fault not in FAULTS:
        raise InvalidRequest(f"{FAULT_HEADER}: unknown fault {fault!r} (one of {', '.join(sorted(FAULTS))})")
    if fault == "disconnect_mid_stream":
        return fault
    gate = request.headers.get(GATE_HEADER)
    if gate:  # a gated fault: the test decides when the failure happens
        await state.gates.wait(gate)
    if fault == "overloaded":
        raise Overloaded("Overloaded")
    if fault == "rate_limit":
        exc = RateLimited("Number of request tokens has exceeded your per-minute rate limit", retry_after=1)
        exc.headers.update(out.ratelimit_headers(exhausted=True))
        raise exc
    if fault == "api_error":
        raise SpecproxyError("Internal server error")
    if fault == "stall":
        await state.gates.stall()  # returns only by SimClosing (shutdown) or cancellation (client left)
    return fault


def _body(request: web.Request, state: SimState) -> bytes:
    body: bytes = request.get(BODY, b"")
    if len(body) > state.profile.max_body_bytes:
        raise RequestTooLarge("Request exceeds the maximum allowed number of bytes.")
    return body


def _model(state: SimState, req: MessagesRequest) -> ModelSpec:
    spec = state.models.get(req.model)
    if spec is None:
        raise NotFound(f"model: {req.model}")
    return spec


@dataclass(frozen=True, slots=True)
class _Call:
    """A request past every check: who sends it, what it asks, and the fault it carries."""

    state: SimState
    tenant: str
    workspace: str
    req: MessagesRequest
    spec: ModelSpec
    prompt: Prompt
    fault: str | None


async def _accept(request: web.Request, *, count_only: bool) -> _Call:
    """Credential, version, body, model and breakpoint checks, then any immediate fault."""
    state = request.app[SIM_STATE]
    tenant = authenticate(request)
    ws = workspace(request, state, tenant)
    if not count_only:
        state.count_request(tenant, ws)
    entry = request[LOG_ENTRY]
    entry["fault"] = request.headers.get(FAULT_HEADER)
    entry["gate"] = request.headers.get(GATE_HEADER)
    req = parse_body(_body(request, state), count_only=count_only)
    entry["model"] = req.model
    entry["max_tokens"] = req.max_tokens
    entry["stream"] = req.stream
    spec = _model(state, req)
    profile = state.profile
    prompt = build_prompt(req, spec.id, profile.volatile_system_prefixes, profile.max_breakpoints)
    if not count_only:
        check_conversation(req, spec)
    fault = await _fault(request, state)
    return _Call(state, tenant, ws, req, spec, prompt, fault)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages/count_tokens``: the prompt's total input tokens."""
    call = await _accept(request, count_only=True)
    return json_response({"input_tokens": call.prompt.total_tokens})


async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``: a simulated reply, with faithful prompt-cache usage."""
    call = await _accept(request, count_only=False)
    state, profile, req = call.state, call.state.profile, call.req
    wanted = _int_header(request, REPLY_TOKENS_HEADER)
    delay_ms = _int_header(request, DELAY_HEADER)
    plan = state.cache.plan(call.tenant, call.prompt, min_tokens=call.spec.min_cache_tokens,
                            workspace=call.workspace)
    request[PLAN] = plan
    usage = plan.usage
    log_usage = request[LOG_ENTRY]["usage"] = usage.as_dict(0)
    gate = request.headers.get(GATE_HEADER)
    if gate:
        await state.gates.wait(gate)
    await state.gates.sleep(profile.delay(profile.ttft_seconds(usage.uncached_tokens, usage.cache_read_input_tokens)))
    if delay_ms:
        await state.gates.sleep(delay_ms / 1000)
    reply = out.Reply.build(profile.reply_tokens if wanted is None else wanted, req.max_tokens or 0)
    log_usage["output_tokens"] = reply.output_tokens
    msg_id = out.new_message_id()
    if req.stream:
        return await _stream(request, state, msg_id, req.model, usage, reply, call.fault)
    if call.fault == "disconnect_mid_stream":
        return abort(request)
    await state.gates.sleep(profile.delay(reply.output_tokens / profile.output_tokens_per_s))
    return json_response(out.message(msg_id, req.model, usage, reply))


async def _stream(request: web.Request, state: SimState, msg_id: str, model: str, usage: Usage,
                  reply: out.Reply, fault: str | None) -> web.StreamResponse:
    profile = state.profile
    resp = web.StreamResponse(headers={"Content-Type": out.SSE_CONTENT_TYPE, "Cache-Control": "no-cache"})
    await resp.prepare(request)  # the on_response_prepare hook commits the cache writes here
    await resp.write(out.message_start(msg_id, model, usage, min(1, reply.output_tokens)))
    await resp.write(out.block_start() + out.ping())
    chunk_delay = profile.delay(profile.stream_chunk_tokens / profile.output_tokens_per_s)
    for i, chunk in enumerate(reply.chunks(profile.stream_chunk_tokens)):
        if fault == "disconnect_mid_stream" and i == _DISCONNECT_AFTER_DELTAS:
            return abort(request, resp)
        if i:
            await state.gates.sleep(chunk_delay)
        await resp.write(out.text_delta(chunk))
    if fault == "disconnect_mid_stream":
        return abort(request, resp)
    await resp.write(out.block_stop() + out.message_delta(usage, reply) + out.message_stop())
    return resp


def _model_info(spec: ModelSpec) -> dict[str, Any]:
    return {
        "type": "model",
        "id": spec.id,
        "display_name": spec.display_name,
        "created_at": spec.created_at,
        "lifecycle": "active",
        "max_input_tokens": spec.max_input_tokens,
        "max_tokens": spec.max_output_tokens,
    }


async def list_models(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models``: the profile's models, paginated (``limit``, ``after_id``, ``before_id``)."""
    state = request.app[SIM_STATE]
    authenticate(request)
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise InvalidRequest("limit: Input should be an integer between 1 and 1000")
    ids = [spec.id for spec in state.profile.models]
    start, stop = 0, len(ids)
    after, before = request.query.get("after_id"), request.query.get("before_id")
    if after is not None:
        start = ids.index(after) + 1 if after in ids else len(ids)
    if before is not None:
        stop = ids.index(before) if before in ids else 0
        start = max(start, stop - limit)
    page = list(state.profile.models[start:stop][:limit])
    return json_response({
        "data": [_model_info(spec) for spec in page],
        "has_more": (start + len(page) < stop) if before is None else start > 0,
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
    })


async def get_model(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models/{id}``: one model (aliases resolve); 404 if unknown."""
    state = request.app[SIM_STATE]
    authenticate(request)
    name = request.match_info["model_id"]
    spec = state.models.get(name)
    if spec is None:
        raise NotFound(f"model: {name}")
    return json_response(_model_info(spec))


def body_digest(body: bytes) -> str:
    """Hex SHA-256 of the exact body bytes (for the request log)."""
    return hashlib.sha256(body).hexdigest()
