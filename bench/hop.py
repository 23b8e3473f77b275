"""The minimal pass-through hop: the floor for a Python aiohttp reverse proxy on this machine.

It does only what any proxy must: read the request body, send it upstream over one pooled
``ClientSession`` with the hop-by-hop headers dropped, and stream the response back chunk by
chunk. No parsing, no hashing, no holding, no metrics, no logging. specproxy's overhead is
measured against it and against going straight to the upstream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from aiohttp import web

_DROP_REQUEST: Final = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host",
                                  "content-length", "proxy-connection", "trailer"})
_DROP_RESPONSE: Final = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "upgrade",
                                   "proxy-connection", "trailer"})
_SKIP_AUTO: Final = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
SESSION: Final = web.AppKey("hop_session", aiohttp.ClientSession)


def create_hop_app(upstream: str, *, max_connections: int = 0) -> web.Application:
    """An app that relays every request to ``upstream`` (``max_connections`` 0: unlimited pool)."""
    base = upstream.rstrip("/")
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                         cookie_jar=aiohttp.DummyCookieJar()) as session:
            app[SESSION] = session
            yield

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        async with app[SESSION].request(request.method, base + request.rel_url.raw_path_qs, data=body or None,
                                        headers=headers, skip_auto_headers=_SKIP_AUTO,
                                        allow_redirects=False) as resp:
            out = web.StreamResponse(status=resp.status, reason=resp.reason)
            for name, value in resp.headers.items():
                if name.lower() not in _DROP_RESPONSE:
                    out.headers.add(name, value)
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app
