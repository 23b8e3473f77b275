"""A recording, strict hop between the proxy and the simulator, for tests that assert wire bytes.

It keeps every ``/v1/messages`` body it is sent and refuses, as the API does, the two shapes today's
models refuse, whichever simulator stands behind it:

- a conversation that ends on an assistant turn, for models without assistant prefill (Claude
  Opus/Sonnet 4.6 and later): 400 ``This model does not support assistant message prefill. The
  conversation must end with a user message.``;
- a final assistant text that ends in whitespace: 400 ``final assistant content cannot end with
  trailing whitespace``.

Everything else is relayed to the simulator unchanged (status, headers that matter, body).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from specproxy.serving import running

NO_PREFILL = ("claude-opus-4-6", "claude-sonnet-4-6", "claude-opus-4-7", "claude-sonnet-4-7")
PREFILL_REFUSED = ("This model does not support assistant message prefill. "
                   "The conversation must end with a user message.")
TRAILING_WHITESPACE = "final assistant content cannot end with trailing whitespace"


def refusal(body: Any) -> str | None:
    """The API's error message for ``body``, or None when it would accept it (for these two rules)."""
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None
    last = messages[-1]
    if last.get("role") != "assistant":
        return None
    model = body.get("model")
    if isinstance(model, str) and model.startswith(NO_PREFILL):
        return PREFILL_REFUSED
    content = last.get("content")
    texts = [content] if isinstance(content, str) else [
        b.get("text") for b in content if isinstance(b, dict) and b.get("type") == "text"
    ] if isinstance(content, list) else []
    if texts and isinstance(texts[-1], str) and texts[-1] != texts[-1].rstrip():
        return TRAILING_WHITESPACE
    return None


@dataclass(slots=True)
class StrictUpstream:
    url: str
    bodies: list[dict[str, Any]] = field(default_factory=list)  # every /v1/messages body, in order
    raw: list[bytes] = field(default_factory=list)  # the same, as the bytes that arrived
    refused: list[str] = field(default_factory=list)

    def warms(self) -> list[dict[str, Any]]:
        """The bodies sent with ``max_tokens`` 0 or 1: the proxy's own warms."""
        return [b for b in self.bodies if b.get("max_tokens") in (0, 1)]


@contextlib.asynccontextmanager
async def strict_upstream(sim_url: str) -> AsyncIterator[StrictUpstream]:
    state = StrictUpstream(url="")
    session = aiohttp.ClientSession(auto_decompress=False)

    async def relay(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if request.path == "/v1/messages":
            state.raw.append(raw)
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = None
            if isinstance(body, dict):
                state.bodies.append(body)
            message = refusal(body)
            if message is not None:
                state.refused.append(message)
                return web.json_response(
                    {"type": "error", "error": {"type": "invalid_request_error", "message": message}}, status=400
                )
        drop = {"host", "content-length", "transfer-encoding", "connection"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in drop}
        async with session.request(request.method, sim_url + request.rel_url.raw_path_qs, data=raw,
                                   headers=headers) as resp:
            out = web.StreamResponse(status=resp.status)
            for k, v in resp.headers.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                    out.headers[k] = v
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", relay)
    try:
        async with running(app) as r:
            state.url = r.url
            yield state
    finally:
        await session.close()
