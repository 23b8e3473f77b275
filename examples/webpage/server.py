"""A minimal web page in front of specproxy: prewarm when the question box gets focus, then ask.

    SPECPROXY_URL=http://127.0.0.1:8787 ANTHROPIC_API_KEY=sk-ant-... python examples/webpage/server.py
    # then open http://127.0.0.1:8000

The browser talks only to this small aiohttp backend, which holds the API key and calls the proxy:
``POST /api/prewarm`` when the input field gets focus (the proxy warms the document's prefix while
the user types) and ``POST /api/ask`` with the question (it reads the warm cache). Each answer
shows, and this server prints, the ``X-Cache-Warm`` header. Against the simulator any key works:

    specproxy sim --port 8790 --time-scale 0.1 &
    specproxy serve --upstream http://127.0.0.1:8790 &
    python examples/webpage/server.py
"""

from __future__ import annotations

import asyncio.locks
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

HERE = Path(__file__).resolve().parent
MODEL = "claude-sonnet-4-6"
SYSTEM = "You are an expert Python programmer. Answer questions about the document you are given, briefly."
# The document the page is about: CPython's asyncio/locks.py (~5k tokens), the cached prefix.
DOCUMENT_TITLE = "CPython Lib/asyncio/locks.py"
DOCUMENT = Path(asyncio.locks.__file__).read_text(encoding="utf-8")

SESSION = web.AppKey("session", aiohttp.ClientSession)
PROXY = web.AppKey("proxy", str)
API_KEY = web.AppKey("api_key", str)


def _context_block() -> dict[str, Any]:
    return {"type": "text", "text": DOCUMENT, "cache_control": {"type": "ephemeral"}}


def _headers(app: web.Application) -> dict[str, str]:
    return {"x-api-key": app[API_KEY], "anthropic-version": "2023-06-01"}


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(HERE / "index.html")


async def document(request: web.Request) -> web.Response:
    return web.json_response({"title": DOCUMENT_TITLE, "text": DOCUMENT})


async def prewarm(request: web.Request) -> web.Response:
    """The input field got focus: warm the prefix every question will share."""
    app = request.app
    body = {"model": MODEL, "system": SYSTEM, "messages": [{"role": "user", "content": [_context_block()]}]}
    async with app[SESSION].post(f"{app[PROXY]}/prewarm", json=body, headers=_headers(app)) as resp:
        data = await resp.json()
    print(f"POST /prewarm -> {resp.status} {data}", flush=True)
    return web.json_response(data, status=resp.status)


async def ask(request: web.Request) -> web.Response:
    """The question: the same prefix, then the question after the breakpoint."""
    app = request.app
    question = str((await request.json()).get("question", "")).strip()
    if not question:
        return web.json_response({"error": "empty question"}, status=400)
    body = {
        "model": MODEL,
        "max_tokens": 400,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": [_context_block(), {"type": "text", "text": question}]}],
    }
    async with app[SESSION].post(f"{app[PROXY]}/v1/messages", json=body, headers=_headers(app)) as resp:
        data = await resp.json()
        warm = resp.headers.get("X-Cache-Warm", "")
        wait_ms = resp.headers.get("X-Cache-Warm-Wait-Ms", "")
    print(f"question {question!r} -> {resp.status}; X-Cache-Warm: {warm} (held {wait_ms} ms)", flush=True)
    if resp.status != 200:
        return web.json_response({"error": data.get("error", data), "x_cache_warm": warm}, status=resp.status)
    answer = "".join(b.get("text", "") for b in data.get("content", []) if b.get("type") == "text")
    return web.json_response({"answer": answer, "x_cache_warm": warm, "wait_ms": wait_ms, "usage": data.get("usage")})


def make_app(proxy_url: str, api_key: str) -> web.Application:
    """The page's backend, calling the proxy at ``proxy_url`` with ``api_key``."""
    app = web.Application()
    app[PROXY] = proxy_url.rstrip("/")
    app[API_KEY] = api_key

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession()
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/", index)
    app.router.add_get("/api/document", document)
    app.router.add_post("/api/prewarm", prewarm)
    app.router.add_post("/api/ask", ask)
    return app


if __name__ == "__main__":
    web.run_app(
        make_app(
            os.environ.get("SPECPROXY_URL", "http://127.0.0.1:8787"),
            os.environ.get("ANTHROPIC_API_KEY", "any-key-works-with-the-simulator"),
        ),
        host="127.0.0.1",
        port=int(os.environ.get("PORT", "8000")),
    )
