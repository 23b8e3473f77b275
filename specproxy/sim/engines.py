"""Engine dialects: the ``/v1/messages`` of vLLM, SGLang and llama.cpp, as their servers answer it.

``specproxy sim --dialect vllm|sglang|llamacpp`` (``run_sim(dialect=...)``) swaps the Anthropic API
for an inference engine's Anthropic-compatible endpoint. What changes, each from the engine's source
(links in ``docs/simulator.md``):

- validation: no credential or version header needed, unknown fields and ``cache_control`` ignored,
  no conversation rules; ``max_tokens`` must be positive for vLLM and SGLang (each refuses 0 with its
  own error shape), llama.cpp takes 0 as "evaluate the prompt into the cache, generate nothing";
- caching: automatic and engine-wide (``specproxy.sim.engine_cache``), no minimum, no TTL;
- usage: cache reads only, and for vLLM and SGLang only when the engine was started with its
  reporting flag (``--enable-prompt-tokens-details``, ``--enable-cache-report``; the simulator's
  ``--cache-report``). vLLM: ``input_tokens`` is what was not read, ``cache_creation_input_tokens``
  always 0. SGLang: ``input_tokens`` includes the cached tokens. llama.cpp: reads always reported;
- streaming: the HTTP response (status and headers) begins at once; ``message_start`` follows the
  prefill, after the first token (llama.cpp: no ``message_start`` at all when nothing is generated);
  the cache is written when prefill ends, whether or not anything was sent; no ``ping``;
- discovery: vLLM ``GET /v1/models`` (``owned_by: "vllm"``), ``GET /version``; SGLang
  ``GET /get_model_info``, ``GET /get_server_info``; llama.cpp ``GET /props``, ``GET /slots``; the
  ``server`` header of each (uvicorn for vLLM and SGLang, ``llama.cpp``).
"""

from __future__ import annotations

import secrets
import uuid
from http import HTTPStatus
from typing import Any, Final

import orjson
from aiohttp import web

from specproxy.errors import SpecproxyError
from specproxy.sim import messages as v1
from specproxy.sim import response as out
from specproxy.sim.engine_cache import Lookup, SlotCache, render_tokens
from specproxy.sim.messages import BODY, LOG_ENTRY, SIM_STATE
from specproxy.sim.state import SimState, tenant_digest
from specproxy.sim.validate import loads_object, parse_body

SERVER_HEADER: Final = {"vllm": "uvicorn", "sglang": "uvicorn", "llamacpp": "llama.cpp"}
ENGINE_VERSION: Final = {"vllm": "0.11.0", "sglang": "0.5.4", "llamacpp": "b6800"}
_FAULT_STATUS: Final = {529: 503}  # engines have no 529: an overloaded engine answers 503


def error_payload(dialect: str, status: int, message: str, *, param: str | None = None) -> dict[str, Any]:
    """An error body in the engine's own shape."""
    phrase = HTTPStatus(status).phrase
    if dialect == "vllm":  # vllm/entrypoints/serve/utils/server_utils.py: ErrorResponse(ErrorInfo)
        return {"error": {"message": message, "type": phrase, "param": param, "code": status}}
    if dialect == "sglang":  # sglang/srt/entrypoints/http_server.py: ErrorResponse, flat
        return {"object": "error", "message": message, "type": phrase, "param": None, "code": status}
    kinds = {400: "invalid_request_error", 404: "not_found_error", 501: "not_supported_error",
             503: "unavailable_error"}  # llama.cpp format_error_response
    return {"error": {"code": status, "message": message, "type": kinds.get(status, "server_error")}}


def error_response(dialect: str, status: int, message: str, *, param: str | None = None) -> web.Response:
    status = _FAULT_STATUS.get(status, status)
    return web.Response(status=status, body=orjson.dumps(error_payload(dialect, status, message, param=param)),
                        content_type=v1.JSON)


class EngineError(Exception):
    """A refusal in the engine's shape (raised by handlers, rendered by the app's middleware)."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def _pydantic_max_tokens(value: Any) -> str:
    """The pydantic error vLLM and SGLang print for ``max_tokens`` (their validator:
    ``if v <= 0: raise ValueError("max_tokens must be positive")``)."""
    error = {"type": "value_error", "loc": ("body", "max_tokens"), "msg": "Value error, max_tokens must be positive",
             "input": value, "ctx": {"error": "ValueError('max_tokens must be positive')"}}
    return f"1 validation error:\n  {error}"


def check_max_tokens(dialect: str, raw: dict[str, Any]) -> int:
    """``max_tokens`` as the engine takes it; vLLM and SGLang refuse it when not positive."""
    value = raw.get("max_tokens")
    if value is None or isinstance(value, bool) or not isinstance(value, int):
        if dialect == "llamacpp" and value is None:
            return -1  # n_predict's default: until the end of the turn
        raise EngineError(400, "1 validation error:\n  max_tokens: Input should be a valid integer",
                          param="body.max_tokens")
    if dialect in ("vllm", "sglang") and value <= 0:
        message = _pydantic_max_tokens(value)
        if dialect == "sglang":
            message = f"{message} [{{'type': 'value_error', 'loc': ('body', 'max_tokens'), " \
                      f"'msg': 'Value error, max_tokens must be positive', 'input': {value}}}]"
        raise EngineError(400, message, param="body.max_tokens")
    return value


def _message_id(dialect: str) -> str:
    if dialect == "sglang":
        return f"msg_{uuid.uuid4().hex}"
    if dialect == "vllm":
        return f"chatcmpl-{uuid.uuid4().hex}"
    return "chatcmpl-" + secrets.token_urlsafe(24).replace("-", "a").replace("_", "b")[:32]


def usage_forms(dialect: str, report: bool, total: int, cached: int, output: int) -> tuple[dict[str, int], ...]:
    """The engine's ``usage`` in (the JSON reply, ``message_start``, ``message_delta``)."""
    if dialect == "vllm":  # vllm PR #40912: omitted without --enable-prompt-tokens-details
        base = ({"input_tokens": total - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}
                if report else {"input_tokens": total})
        return {**base, "output_tokens": output}, {**base, "output_tokens": 0}, {**base, "output_tokens": output}
    if dialect == "sglang":  # serving.py: input_tokens = prompt_tokens, cached from prompt_tokens_details
        read = cached if report else 0
        return ({"input_tokens": total, "output_tokens": output, "cache_read_input_tokens": read},
                {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0},
                {"input_tokens": total, "output_tokens": output, "cache_read_input_tokens": read})
    base = {"cache_read_input_tokens": cached, "input_tokens": total - cached}  # server-task.cpp to_json_anthropic
    return {**base, "output_tokens": output}, {**base, "output_tokens": 0}, {"output_tokens": output}


def _message(dialect: str, msg_id: str, model: str, reply: out.Reply, usage: dict[str, int]) -> dict[str, Any]:
    body: dict[str, Any] = {"id": msg_id, "type": "message", "role": "assistant",
                            "content": [{"type": "text", "text": reply.text}] if reply.text else [],
                            "model": model, "stop_reason": reply.stop_reason}
    if dialect == "llamacpp":
        body["stop_sequence"] = None
    body["usage"] = usage
    return body


def _served(state: SimState, dialect: str, model: str) -> None:
    if dialect == "vllm" and model not in state.models:
        raise EngineError(404, f"The model `{model}` does not exist.", param="model")


def _tenant(request: web.Request) -> str:
    credential = request.headers.get("x-api-key", "")
    if not credential:
        _, _, credential = request.headers.get("authorization", "").partition(" ")
    return tenant_digest(credential.strip()) if credential.strip() else "anonymous"


async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages`` as the engine answers it."""
    state = request.app[SIM_STATE]
    profile = state.profile
    dialect = profile.dialect
    entry = request[LOG_ENTRY]
    tenant = entry["tenant"] = _tenant(request)
    entry["workspace"] = "engine"
    state.count_request(tenant, "engine")
    entry["fault"] = request.headers.get(v1.FAULT_HEADER)
    entry["gate"] = request.headers.get(v1.GATE_HEADER)
    body: bytes = request.get(BODY, b"")
    raw = loads_object(body)
    max_tokens = check_max_tokens(dialect, raw)
    req = parse_body(orjson.dumps({**raw, "max_tokens": max(max_tokens, 0)}), strict=False)
    entry["model"], entry["max_tokens"], entry["stream"] = req.model, max_tokens, req.stream
    _served(state, dialect, req.model)
    wanted = v1._int_header(request, v1.REPLY_TOKENS_HEADER)
    delay_ms = v1._int_header(request, v1.DELAY_HEADER)
    fault = await v1._fault(request, state)
    tokens = render_tokens(req.tools, req.system, req.messages, drop_billing_header=dialect == "vllm")
    reply_tokens = profile.reply_tokens if wanted is None else wanted
    reply = out.Reply.build(reply_tokens, reply_tokens if max_tokens < 0 else max_tokens)
    msg_id = _message_id(dialect)
    resp: web.StreamResponse | None = None
    if req.stream:  # the engines' StreamingResponse: status and headers go out before prefill
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        if dialect == "llamacpp":  # what llama-server advertises, though it closes after a stream
            resp.headers["Keep-Alive"] = "timeout=5, max=100"
        await resp.prepare(request)
    engine = state.engine
    assert engine is not None
    lookup = await engine.acquire(tokens)
    try:
        gate = request.headers.get(v1.GATE_HEADER)
        if gate:
            await state.gates.wait(gate)
        total, cached = len(tokens), lookup.cached
        await state.gates.sleep(profile.delay(profile.ttft_seconds(total - cached, cached)))
        if delay_ms:
            await state.gates.sleep(delay_ms / 1000)
        _commit(state, tenant, engine.commit(lookup), cached)
        forms = usage_forms(dialect, profile.cache_report, total, cached, reply.output_tokens)
        entry["usage"] = forms[0]
        if resp is None:
            if fault == "disconnect_mid_stream":
                return v1.abort(request)
            await state.gates.sleep(profile.delay(reply.output_tokens / profile.output_tokens_per_s))
            return v1.json_response(_message(dialect, msg_id, req.model, reply, forms[0]))
        return await _stream(request, resp, state, msg_id, req.model, reply, forms, fault)
    finally:
        engine.release(lookup)


def _commit(state: SimState, tenant: str, written: int, cached: int) -> None:
    state.count_cache(tenant, "engine", 1 if written else 0, written, cached)


async def _stream(request: web.Request, resp: web.StreamResponse, state: SimState, msg_id: str, model: str,
                  reply: out.Reply, forms: tuple[dict[str, int], ...], fault: str | None) -> web.StreamResponse:
    profile = state.profile
    dialect = profile.dialect
    if reply.output_tokens or dialect != "llamacpp":  # llama.cpp: message_start rides the first token
        start = {"id": msg_id, "type": "message", "role": "assistant", "content": [], "model": model,
                 "stop_reason": None, "stop_sequence": None, "usage": forms[1]}
        await resp.write(out.sse("message_start", {"type": "message_start", "message": start}))
    chunk_delay = profile.delay(profile.stream_chunk_tokens / profile.output_tokens_per_s)
    for i, chunk in enumerate(reply.chunks(profile.stream_chunk_tokens)):
        if fault == "disconnect_mid_stream" and i == v1._DISCONNECT_AFTER_DELTAS:
            return v1.abort(request, resp)
        if i:
            await state.gates.sleep(chunk_delay)
        else:
            await resp.write(out.block_start())
        await resp.write(out.text_delta(chunk))
    if fault == "disconnect_mid_stream":
        return v1.abort(request, resp)
    if reply.text:
        await resp.write(out.block_stop())
    delta: dict[str, Any] = {"stop_reason": reply.stop_reason}
    if dialect == "llamacpp":
        delta["stop_sequence"] = None
    await resp.write(out.sse("message_delta", {"type": "message_delta", "delta": delta, "usage": forms[2]})
                     + out.message_stop())
    if dialect == "llamacpp" and request.transport is not None:
        # llama-server closes its connection once a streamed response has ended, with no
        # ``Connection: close`` (and ``Keep-Alive: timeout=5`` advertised): a client that pools it
        # finds it dead on the next request.
        await resp.write_eof()
        request.transport.close()
    return resp


async def count_tokens(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages/count_tokens``: the length of the engine's token stream."""
    dialect = request.app[SIM_STATE].profile.dialect
    req = parse_body(request.get(BODY, b""), count_only=True, strict=False)
    tokens = render_tokens(req.tools, req.system, req.messages, drop_billing_header=dialect == "vllm")
    return v1.json_response({"input_tokens": len(tokens)})


def _model_cards(state: SimState, owner: str) -> dict[str, Any]:
    cards = []
    for spec in state.profile.models:
        card: dict[str, Any] = {"id": spec.id, "object": "model", "created": 1_700_000_000, "owned_by": owner}
        if owner == "vllm":
            card.update({"root": spec.id, "parent": None, "max_model_len": spec.max_input_tokens, "permission": []})
        cards.append(card)
    return {"object": "list", "data": cards}


async def list_models(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models``: the OpenAI-style list, ``owned_by`` naming the engine."""
    state = request.app[SIM_STATE]
    return v1.json_response(_model_cards(state, state.profile.dialect))


async def version(request: web.Request) -> web.StreamResponse:
    """vLLM ``GET /version``."""
    return v1.json_response({"version": ENGINE_VERSION["vllm"]})


async def health(request: web.Request) -> web.StreamResponse:
    """``GET /health``: vLLM and SGLang answer 200 with no body, llama.cpp ``{"status": "ok"}``."""
    if request.app[SIM_STATE].profile.dialect == "llamacpp":
        return v1.json_response({"status": "ok"})
    return web.Response(status=200)


async def get_model_info(request: web.Request) -> web.StreamResponse:
    """SGLang ``GET /get_model_info``."""
    model = request.app[SIM_STATE].profile.models[0].id
    return v1.json_response({"model_path": model, "tokenizer_path": model, "is_generation": True,
                             "preferred_sampling_params": None, "weight_version": "default",
                             "has_image_understanding": False, "has_audio_understanding": False})


async def get_server_info(request: web.Request) -> web.StreamResponse:
    """SGLang ``GET /get_server_info``: server arguments, among them the cache settings."""
    profile = request.app[SIM_STATE].profile
    return v1.json_response({"model_path": profile.models[0].id, "page_size": profile.block_tokens,
                             "enable_cache_report": profile.cache_report, "disable_radix_cache": False,
                             "version": ENGINE_VERSION["sglang"]})


async def props(request: web.Request) -> web.StreamResponse:
    """llama.cpp ``GET /props``."""
    profile = request.app[SIM_STATE].profile
    model = profile.models[0]
    return v1.json_response({
        "default_generation_settings": {"n_ctx": model.max_input_tokens, "params": {"n_predict": -1,
                                                                                   "cache_prompt": True}},
        "total_slots": profile.engine_slots,
        "model_path": model.id,
        "chat_template": "",
        "modalities": {"vision": False, "audio": False},
        "build_info": f"{ENGINE_VERSION['llamacpp']}-specproxy-sim",
    })


async def slots(request: web.Request) -> web.StreamResponse:
    """llama.cpp ``GET /slots``: each slot's cached tokens and whether it is busy."""
    engine = request.app[SIM_STATE].engine
    return v1.json_response(engine.slots() if isinstance(engine, SlotCache) else [])


def add_routes(app: web.Application, dialect: str) -> None:
    """The engine's endpoints."""
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    if dialect == "vllm":
        app.router.add_get("/version", version)
    elif dialect == "sglang":
        app.router.add_get("/get_model_info", get_model_info)
        app.router.add_get("/get_server_info", get_server_info)
    else:
        app.router.add_get("/props", props)
        app.router.add_get("/slots", slots)


def render(dialect: str, exc: Exception) -> web.Response:
    """An error raised while handling an engine request, in the engine's shape."""
    if isinstance(exc, EngineError):
        return error_response(dialect, exc.status, exc.message, param=exc.param)
    assert isinstance(exc, SpecproxyError)
    return error_response(dialect, exc.status, exc.message)


__all__ = ["SERVER_HEADER", "EngineError", "Lookup", "add_routes", "error_payload", "render", "usage_forms"]
