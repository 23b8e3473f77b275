"""The pass-through: the client's request goes upstream byte for byte, the response comes back as it arrives.

- The request target is the client's raw one (path and query as received: no percent-decoding, no
  dot-segment removal), appended to the upstream base URL.
- Headers lose only what is hop-by-hop (and what ``Connection`` names), ``Host``/``Content-Length``
  (rewritten for the upstream and the body), ``Expect`` (the proxy answered it), and the proxy's own
  control headers (``X-Cache-Warm-Next``). Repeats that differ only in case all go (one spelling),
  and header bytes that are not UTF-8 go as they came, in both directions.
- The body is the client's original bytes, compressed or not (the server does not inflate request
  bodies: ``Content-Encoding`` and the bytes always agree). Pass-through paths stream it upstream as
  it arrives, with no size limit of the proxy's own (Files API uploads).
- The response body is relayed chunk by chunk (SSE events reach the client as the upstream writes
  them) and never decoded, so ``content-encoding`` and ``content-length`` stay consistent. Its usage
  is read on the way (:mod:`specproxy.usage`); a response the tap cannot read is still relayed.

Upstream failures are translated to Anthropic-shaped errors at this one boundary.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import http_writer, payload, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from specproxy.credentials import Credentials
from specproxy.errors import BodyTimeout, Overloaded, UpstreamTimeout, UpstreamUnavailable
from specproxy.outcome import CONTROL_HEADERS
from specproxy.serving import client_left
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
# Set by the client library from the body we hand it, rewritten for the upstream host, or already
# answered by this server (``Expect: 100-continue``), or addressed to the proxy itself.
_REQUEST_DROP: Final = HOP_BY_HOP | {"host", "content-length", "expect"} | CONTROL_HEADERS
# Never let the client library invent headers the client did not send.
SKIP_AUTO_HEADERS: Final = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


# --- header bytes ---------------------------------------------------------------------------------
# aiohttp decodes header bytes as UTF-8 with surrogate escapes (a byte 0xE9 that is not UTF-8
# becomes U+DCE9), but its serializer drops those escapes: "caf\xe9" would leave as "caf". This
# serializer sends such headers back as the bytes they came as; any other header takes aiohttp's.
_SURROGATE: Final = re.compile("[\udc80-\udcff]")
_FORBIDDEN: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_aiohttp_serialize: Callable[[str, Any], bytes] = http_writer._serialize_headers


def serialize_headers(status_line: str, headers: Any) -> bytes:
    """aiohttp's header serializer, but exact for header bytes that are not UTF-8."""
    # One join and one C-level scan: nearly every header set is ASCII (this runs twice a request).
    flat = "".join(headers.keys()) + "".join(headers.values())
    if flat.isascii() or not _SURROGATE.search(flat):
        return _aiohttp_serialize(status_line, headers)
    parts = [status_line]
    for k, v in headers.items():
        if _FORBIDDEN.search(k) or _FORBIDDEN.search(v):
            raise ValueError("Forbidden control character detected in headers.")
        parts.append(f"{k}: {v}")
    return ("\r\n".join(parts) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def install_header_bytes() -> None:
    """Make aiohttp's writers keep non-UTF-8 header bytes (idempotent; see :func:`serialize_headers`)."""
    if getattr(http_writer, "_serialize_headers", None) is not serialize_headers:
        http_writer._serialize_headers = serialize_headers


class RequestBody(payload.BytesPayload):
    """The client's body as it goes upstream: aiohttp's bytes payload without its warning about
    bodies over 1 MB (a Messages request may be 32 MB; the transport buffers it, nothing blocks)."""

    def __init__(self, value: bytes) -> None:
        payload.Payload.__init__(self, value, content_type="application/octet-stream")
        self._size = len(value)


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
    usage_unreadable: bool = False  # a 200 whose usage could not be read (the relay went on)


def _connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    value = headers.get("connection")
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


def upstream_request_headers(
    headers: CIMultiDictProxy[str], drop: frozenset[str] = frozenset(), *, keep_length: bool = False
) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones (and any named in ``Connection``), the proxy's
    control headers and ``drop``; ``keep_length`` keeps ``Content-Length`` (a streamed body).

    Repeats of one name in different case keep every value, under the first spelling: aiohttp's
    client would otherwise keep only the last one of them.
    """
    listed = _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    spelling: dict[str, str] = {}
    for name, value in headers.items():
        low = name.lower()
        if (low in _REQUEST_DROP and not (keep_length and low == "content-length")) or low in listed or low in drop:
            continue
        out.add(spelling.setdefault(low, name), value)
    return out


def target(base: str, request: web.BaseRequest) -> URL:
    """The upstream URL: ``base`` plus the client's raw request target, not re-encoded."""
    raw = request.raw_path
    if not raw.startswith("/"):
        raw = request.rel_url.raw_path_qs  # absolute-form or asterisk-form: use its origin form
    return URL(base + raw, encoded=True)


def translate_client_error(
    exc: BaseException, upstream: str, *, pool_full: bool = False
) -> UpstreamUnavailable | UpstreamTimeout | Overloaded:
    """Map an aiohttp/OS failure before any response byte to a client-visible error."""
    if pool_full and isinstance(exc, aiohttp.ConnectionTimeoutError):
        return Overloaded("Every upstream connection of the proxy is busy (upstream_max_connections); retry.")
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
        pool_timeout: float | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        install_header_bytes()
        self._credentials = credentials or Credentials()
        self._session = session
        self._base = upstream.rstrip("/")
        # ``connect`` bounds the wait for a free pooled connection plus the connect itself.
        connect = None if pool_timeout is None else pool_timeout + connect_timeout
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self.upstream_label = upstream

    @property
    def credentials(self) -> Credentials:
        return self._credentials

    def headers_for(self, request: web.BaseRequest, *, streamed: bool = False) -> CIMultiDict[str]:
        """The headers to send upstream for ``request`` (credential policy applied). Build once, share."""
        return self._credentials.to_upstream(upstream_request_headers(request.headers, keep_length=streamed))

    def _pool_full(self) -> bool:
        connector = self._session.connector
        limit = getattr(connector, "limit", 0)
        return bool(limit) and len(getattr(connector, "_acquired", ())) >= limit

    async def forward(
        self,
        request: web.Request,
        body: bytes | None,
        *,
        extra_headers: Mapping[str, str] | None = None,
        upstream_headers: CIMultiDict[str] | None = None,
        tap_usage: bool = False,
        collect_content: bool = False,
        on_started: Callable[[Usage | None], Awaitable[None]] | None = None,
    ) -> Relayed:
        """Send ``request`` upstream and relay the response.

        ``body`` is the client's original bytes, or None to stream the request's body upstream as
        it arrives (pass-through paths: no size limit, nothing buffered). ``upstream_headers`` are
        the headers to send, when the caller has built them already (:meth:`headers_for`).
        ``extra_headers`` are added to the response (the ``X-Cache-Warm*`` contract); with
        ``tap_usage`` the response's token usage is read as it passes, without buffering the stream
        (``collect_content`` also rebuilds the reply's content blocks). ``on_started`` is awaited
        once, after the response's first bytes were written to the client and its input usage is
        known: at ``message_start`` for a stream, when the body is complete otherwise; with None
        when the response has begun but its usage cannot be read.
        """
        streamed = body is None
        headers = upstream_headers if upstream_headers is not None else self.headers_for(request, streamed=streamed)
        data: Any = RequestBody(body) if body else None
        if streamed and request.body_exists:
            data = request.content
        start = time.monotonic()
        try:
            resp = await self._session.request(
                request.method,
                target(self._base, request),
                data=data,
                headers=headers,
                skip_auto_headers=SKIP_AUTO_HEADERS,
                allow_redirects=False,
                timeout=self._timeout,
            )
        except BodyTimeout:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, BodyTimeout):
                raise cause from None
            raise translate_client_error(exc, self.upstream_label, pool_full=self._pool_full()) from exc

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
                    if on_started is not None and tap is not None and (tap.usage is not None or tap.failed):
                        # The response has begun (its first bytes are with the client): the cache
                        # entry it writes is readable from now on.
                        callback, on_started = on_started, None
                        await callback(tap.usage)
            except (aiohttp.ClientError, TimeoutError) as exc:
                if client_left(request):
                    raise ConnectionResetError("the client went away mid-response") from exc
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
                relayed.usage_unreadable = relayed.usage is None
                relayed.model = tap.model
                relayed.content = tap.content
                if on_started is not None:
                    await on_started(relayed.usage)
            return relayed
        except (asyncio.CancelledError, ConnectionError):
            # The client went away: close the upstream connection too, rather than pooling it.
            resp.close()
            raise
        finally:
            relayed.total = time.monotonic() - start
            resp.release()
