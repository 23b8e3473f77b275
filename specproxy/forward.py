"""The pass-through: the client's request goes upstream byte for byte, the response comes back as it arrives.

Headers lose only what is hop-by-hop; the body is the client's original bytes; the response body is
relayed chunk by chunk (SSE events reach the client as the upstream writes them) and is never
decoded, so ``content-encoding`` and ``content-length`` stay consistent. Upstream failures are
translated to Anthropic-shaped errors at this one boundary.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from specproxy.credentials import Credentials
from specproxy.errors import UpstreamTimeout, UpstreamUnavailable
from specproxy.usage import Usage, UsageTap

log = logging.getLogger("specproxy.forward")

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the client library from the body we hand it, or rewritten for the upstream host.
_REQUEST_DROP: Final = HOP_BY_HOP | {"host", "content-length"}
# Never let the client library invent headers the client did not send.
SKIP_AUTO_HEADERS: Final = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})



@dataclass(slots=True)
class Relayed:
    """What one relay did: the response sent, upstream timings, and the usage read on the way."""

    status: int
    ttfb: float
    total: float = 0.0
    response: web.StreamResponse | None = None
    request_id: str | None = None
    usage: Usage | None = None
    model: str | None = None
    content: list[dict[str, Any]] | None = None
    broken: bool = False


def _connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    value = headers.get("connection")
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


def upstream_request_headers(headers: CIMultiDictProxy[str], drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones (and any named in ``Connection``) and ``drop``."""
    listed = _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low in _REQUEST_DROP or low in listed or low in drop:
            continue
        out.add(name, value)
    return out


def translate_client_error(exc: BaseException, upstream: str) -> UpstreamUnavailable | UpstreamTimeout:
    """Map an aiohttp/OS failure before any response byte to a client-visible error."""
    if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamTimeout(f"The upstream ({upstream}) did not answer in time.")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(f"The upstream ({upstream}) is unreachable: connection failed.")
    return UpstreamUnavailable(f"The upstream ({upstream}) failed: {type(exc).__name__}.")


class Forwarder:
    """Relays one request upstream over the process's pooled session and streams the answer back."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        upstream: str,
        *,
        read_timeout: float,
        connect_timeout: float,
        credentials: Credentials | None = None,
    ) -> None:
        self._credentials = credentials or Credentials()
        self._session = session
        self._base = upstream.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self.upstream_label = upstream

    async def forward(
        self,
        request: web.Request,
        body: bytes,
        *,
        extra_headers: Mapping[str, str] | None = None,
        tap_usage: bool = False,
        collect_content: bool = False,
        on_started: Callable[[Usage | None], Awaitable[None]] | None = None,
        upstream_headers: CIMultiDict[str] | None = None,
    ) -> Relayed:
        """Send ``request`` with ``body`` (the client's original bytes) upstream and relay the response.

        ``extra_headers`` are added to the response (the ``X-Cache-Warm*`` contract); with
        ``tap_usage`` the response's token usage is read as it passes, without buffering the stream
        (``collect_content`` also rebuilds the reply's content blocks). ``on_started`` is awaited
        once, as soon as the response has begun and its input usage is known: right after the chunk
        holding ``message_start`` was written to the client for a stream, when the body is complete
        otherwise. ``upstream_headers``, when given, are the headers to send (built once per request).
        """
        url = self._base + request.rel_url.raw_path_qs
        headers = upstream_headers
        if headers is None:
            headers = self._credentials.to_upstream(upstream_request_headers(request.headers))
        start = time.monotonic()
        try:
            resp = await self._session.request(
                request.method,
                url,
                data=body if body else None,
                headers=headers,
                skip_auto_headers=SKIP_AUTO_HEADERS,
                allow_redirects=False,
                timeout=self._timeout,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise translate_client_error(exc, self.upstream_label) from exc

        relayed = Relayed(status=resp.status, ttfb=time.monotonic() - start)
        relayed.request_id = resp.headers.get("request-id")
        tap = (
            UsageTap(
                resp.headers.get("content-type", ""),
                resp.headers.get("content-encoding", ""),
                collect_content=collect_content,
            )
            if tap_usage and resp.status == 200
            else None
        )
        try:
            out = web.StreamResponse(status=resp.status, reason=resp.reason)
            relayed.response = out
            listed = _connection_tokens(resp.headers)
            for name, value in resp.headers.items():
                low = name.lower()
                if low in HOP_BY_HOP or low in listed:
                    continue
                out.headers.add(name, value)
            if extra_headers:
                out.headers.update(extra_headers)
            await out.prepare(request)
            try:
                async for chunk in resp.content.iter_any():
                    if tap is not None:
                        tap.feed(chunk)
                    await out.write(chunk)
                    # After the write: the response has begun for the client, not only upstream.
                    if on_started is not None and tap is not None and tap.usage is not None:
                        callback, on_started = on_started, None
                        await callback(tap.usage)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                # The stream broke after the status went out: the client must see a broken
                # response, not a silently short one. Drop the connection as the upstream did.
                log.warning("stream broke mid-response: %s", type(exc).__name__)
                relayed.broken = True
                resp.close()
                if request.transport is not None:
                    request.transport.close()
                return relayed
            await out.write_eof()
            if tap is not None:
                relayed.usage = tap.finish()
                relayed.model = tap.model
                relayed.content = tap.content
                if on_started is not None and relayed.usage is not None:
                    await on_started(relayed.usage)
            return relayed
        except asyncio.CancelledError:
            # The client went away: close the upstream connection too, rather than pooling it.
            resp.close()
            raise
        finally:
            relayed.total = time.monotonic() - start
            resp.release()
