"""Running an aiohttp application: on a port for the CLI, or on port 0 in-process for tests.

Shared by the proxy and the simulator so both start, stop and handle signals the same way.

An application that carries :data:`SERVER_OPTIONS` (the proxy does) is served by a guarded
connection handler instead of aiohttp's plain one:

- **header timeout**: a request whose headers are not complete ``header_timeout`` seconds after its
  first byte is answered ``408`` and its connection closed (slowloris);
- **body timeout**: a request body that goes ``body_timeout`` seconds without a byte (while the proxy
  is reading it) fails with :class:`BodyTimeout` (``408``);
- **idle timeout**: a keep-alive connection with no request for ``idle_timeout`` seconds is closed;
- **connection cap**: past ``max_connections`` open client connections, the oldest connection that is
  still sending its headers (then the oldest idle keep-alive one) is closed for each new one, so a
  flood of slow sockets cannot use up the descriptors that ``/healthz`` and real requests need;
- **parser errors** (a control character in a header, a header over 8,190 bytes, a line without a
  colon, …) are answered in Anthropic's error shape with a fixed message, and logged by kind only:
  aiohttp's own message quotes the offending header line, which may hold a credential;
- request bodies are not decompressed (``auto_decompress`` off): the proxy relays the client's bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import http_exceptions, web, web_protocol
from aiohttp.web_request import BaseRequest

from specproxy.errors import BodyTimeout, error_body, new_request_id

log = logging.getLogger("specproxy.serving")

FD_RESERVE: Final = 32  # listening sockets, log files, pipes, a Redis connection, stdio


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """How a guarded server treats its client connections (see the module docstring)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 75.0
    max_connections: int = 0  # 0: derived from the open-files limit
    auto_decompress: bool = False
    # Added to every answer the server itself gives (parser errors, timeouts): the proxy's contract.
    error_headers: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class ServerStats:
    """What the guard did, for tests and ``/healthz``: counts only."""

    header_timeouts: int = 0
    body_timeouts: int = 0
    evicted: int = 0
    parser_errors: int = 0
    max_connections: int = 0
    open_connections: Callable[[], int] = field(default=lambda: 0)

    def as_json(self) -> dict[str, int]:
        return {
            "open": self.open_connections(),
            "max": self.max_connections,
            "evicted": self.evicted,
            "header_timeouts": self.header_timeouts,
            "body_timeouts": self.body_timeouts,
            "parser_errors": self.parser_errors,
        }


SERVER_OPTIONS = web.AppKey("server_options", ServerOptions)
SERVER_STATS = web.AppKey("server_stats", ServerStats)


def client_left(request: BaseRequest) -> bool:
    """True when the client's connection is gone (or going): nobody is reading an answer."""
    transport = request.transport
    return transport is None or transport.is_closing()


def open_files_limit() -> int:
    """The soft open-files limit of this process (a large number when unlimited)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def descriptor_budget(upstream_max: int, client_max: int, nofile: int | None = None) -> tuple[int, int]:
    """``(upstream pool limit, client connection cap)`` that fit in the open-files limit together.

    Each proxied request holds two descriptors (client and upstream); a quarter of what is left after
    a reserve goes to the upstream pool at most, the rest to clients. A configured value is kept when
    it fits, lowered (and logged) when it does not; 0 means "as many as fit".
    """
    nofile = open_files_limit() if nofile is None else nofile
    usable = max(16, nofile - FD_RESERVE)
    up_room = max(4, usable // 4)
    upstream = min(upstream_max, up_room) if upstream_max > 0 else up_room
    room = max(8, usable - upstream)
    clients = min(client_max, room) if client_max > 0 else room
    return upstream, clients


# Messages of our own for aiohttp's parser errors: theirs quote the header line.
_PARSER_MESSAGES: Final[tuple[tuple[type[BaseException], str], ...]] = (
    (http_exceptions.LineTooLong, "A request line or header field is too long."),
    (http_exceptions.InvalidHeader, "A request header is malformed."),
    (http_exceptions.BadHttpMethod, "The request method is malformed."),
    (http_exceptions.BadStatusLine, "The request line is malformed."),
    (http_exceptions.InvalidURLError, "The request target is malformed."),
    (http_exceptions.ContentLengthError, "The request body does not match its Content-Length."),
    (http_exceptions.TransferEncodingError, "The request's transfer encoding is malformed."),
    (http_exceptions.ContentEncodingError, "The request's content encoding is malformed."),
    (http_exceptions.BadHttpMessage, "The request could not be parsed as HTTP."),
)


def parser_error_message(exc: BaseException | None) -> str:
    for kind, message in _PARSER_MESSAGES:
        if isinstance(exc, kind):
            return message
    return "The request could not be parsed as HTTP."


def frames_only(exc: BaseException) -> str:
    """Where an exception was raised, without its message (messages may quote client data)."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    return " <- ".join(f"{f.name} ({f.filename.rsplit('/', 1)[-1]}:{f.lineno})" for f in reversed(frames))


def _answer(status: int, error_type: str, message: str, extra: tuple[tuple[str, str], ...]) -> web.Response:
    rid = new_request_id()
    resp = web.Response(
        status=status, body=error_body(error_type, message, rid), content_type="application/json",
        headers={"request-id": rid, **dict(extra)},
    )
    resp.force_close()
    return resp


class GuardedHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler with header/body timeouts and errors that never quote the request."""

    __slots__ = ("_body_handle", "_guard", "_header_handle", "_last_data", "_partial", "_stats")

    def __init__(self, manager: web.Server, *, guard: ServerOptions, stats: ServerStats, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._stats = stats
        self._header_handle: asyncio.TimerHandle | None = None
        self._body_handle: asyncio.TimerHandle | None = None
        self._last_data = 0.0
        self._partial = False  # bytes of a request have come, its headers are not complete

    # -- header timeout ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_handle is None and self._guard.header_timeout > 0:
            self._header_handle = self._loop.call_later(self._guard.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_handle is not None:
            self._header_handle.cancel()
            self._header_handle = None

    @property
    def sending_headers(self) -> bool:
        """True while the connection has no complete request (it is sending headers, or is idle)."""
        return not self._messages and not self._request_in_progress

    @property
    def closing(self) -> bool:
        return self._force_close or self.transport is None

    def force_close(self) -> None:
        self._cancel_header_timer()
        super().force_close()

    @property
    def in_header_phase(self) -> bool:
        """A new connection, or one that has sent part of a request's headers: not a kept-alive idle one."""
        return self.sending_headers and self._header_handle is not None

    def data_received(self, data: bytes) -> None:
        self._last_data = self._loop.time()
        super().data_received(data)
        if self._messages or self._request_in_progress:
            self._cancel_header_timer()
            self._partial = False
        elif data and not self._force_close:
            self._partial = True
            self._arm_header_timer()  # the first bytes of a request on a kept-alive connection

    def _header_timed_out(self) -> None:
        self._header_handle = None
        if not self.sending_headers or self.transport is None or self._force_close:
            return
        self._stats.header_timeouts += 1
        log.debug("closed a connection whose request headers took over %ss", self._guard.header_timeout)
        if not self._partial:
            self.force_close()  # nothing was sent: no answer, which a client could take for its next request's
            return
        rid = new_request_id()
        body = error_body("timeout_error", "The request headers did not arrive in time.", rid)
        head = "".join(f"{k}: {v}\r\n" for k, v in self._guard.error_headers)
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            + f"request-id: {rid}\r\n{head}content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        self.force_close()

    # -- body timeout ------------------------------------------------------------------------------
    async def _handle_request(
        self, request: BaseRequest, start_time: float | None, request_handler: Any
    ) -> tuple[web.StreamResponse, bool]:
        self._cancel_header_timer()
        if self._guard.body_timeout > 0 and not request.content.is_eof():
            self._last_data = self._loop.time()
            self._body_handle = self._loop.call_later(self._guard.body_timeout, self._check_body, request)
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            if self._body_handle is not None:
                self._body_handle.cancel()
                self._body_handle = None

    def _check_body(self, request: BaseRequest) -> None:
        self._body_handle = None
        payload = request.content
        if payload.is_eof() or self.transport is None:
            return
        now = self._loop.time()
        if self._reading_paused or now - self._last_data < self._guard.body_timeout:
            # Reading is paused when the proxy is not taking the body (back-pressure): not the
            # client's silence. Otherwise a byte came in the window: look again later.
            limit = self._guard.body_timeout
            wait = limit if self._reading_paused else self._last_data + limit - now
            self._body_handle = self._loop.call_later(max(0.05, wait), self._check_body, request)
            return
        self._stats.body_timeouts += 1
        log.debug("a request body went %ss without a byte", self._guard.body_timeout)
        payload.set_exception(BodyTimeout("The request body did not arrive in time."))

    # -- errors of the HTTP layer ------------------------------------------------------------------
    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        if isinstance(exc, http_exceptions.HttpProcessingError) or (status == 400 and exc is not None):
            self._stats.parser_errors += 1
            log.debug("rejected a malformed request: %s", type(exc).__name__)
            return _answer(400, "invalid_request_error", parser_error_message(exc), self._guard.error_headers)
        if status == 504:
            return _answer(504, "timeout_error", "The request timed out.", self._guard.error_headers)
        if exc is not None:
            log.error("unexpected %s: %s", type(exc).__name__, frames_only(exc))
        return _answer(500, "api_error", "Internal server error.", self._guard.error_headers)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """Log the event and the exception's kind and frames, never its message."""
        exc = kw.get("exc_info")
        msg = str(args[0]) if args else "error"
        if isinstance(exc, BaseException):
            log.error("%s: %s at %s", msg, type(exc).__name__, frames_only(exc))
        else:
            log.error("%s", msg)

    def log_debug(self, *args: Any, **kw: Any) -> None:
        if self.debug:
            kw.pop("exc_info", None)
            self.logger.debug(*args, **kw)


class GuardedServer(web.Server):
    """aiohttp's low-level server, making :class:`GuardedHandler` connections under a connection cap."""

    def __init__(self, *args: Any, guard: ServerOptions, stats: ServerStats, cap: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard
        self._stats = stats
        self._cap = cap
        stats.max_connections = cap
        stats.open_connections = lambda: len(self._connections)

    def __call__(self) -> GuardedHandler:
        return GuardedHandler(self, loop=self._loop, guard=self._guard, stats=self._stats, **self._kwargs)

    def connection_made(self, handler: web_protocol.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) > self._cap:
            self._evict(handler)

    def _evict(self, newcomer: web_protocol.RequestHandler) -> None:
        """Close the oldest connection still sending headers, else the oldest idle one."""
        idle: GuardedHandler | None = None
        for conn in self._connections:
            if (conn is newcomer or not isinstance(conn, GuardedHandler) or conn.closing
                    or not conn.sending_headers):
                continue
            if conn.in_header_phase:
                conn.force_close()
                self._stats.evicted += 1
                return
            if idle is None:
                idle = conn
        if idle is not None:
            idle.force_close()
            self._stats.evicted += 1


class GuardedRunner(web.AppRunner):
    """An ``AppRunner`` whose server is a :class:`GuardedServer`."""

    def __init__(self, app: web.Application, guard: ServerOptions, stats: ServerStats, cap: int,
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard_opts = (guard, stats, cap)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        guard, stats, cap = self._guard_opts
        # Rebuild as a GuardedServer with the very arguments aiohttp chose for its own.
        return GuardedServer(
            server.request_handler, request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation, loop=server._loop,
            guard=guard, stats=stats, cap=cap, **server._kwargs,
        )


_REDACT_LOGGERS: Final = ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal")


class _NoExceptionText(logging.Filter):
    """On aiohttp's loggers: keep an exception's kind, drop its text (it may quote a header line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__} at {frames_only(exc)}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def install_log_redaction() -> None:
    """Strip exception text from aiohttp's own log records (idempotent)."""
    for name in _REDACT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoExceptionText) for f in logger.filters):
            logger.addFilter(_NoExceptionText())


@dataclass(slots=True)
class Running:
    """A started application: its base URL and its runner."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


async def start(
    app: web.Application, host: str = "127.0.0.1", port: int = 0, *, shutdown_timeout: float = 60.0
) -> Running:
    """Start ``app`` on ``host:port`` (0 picks a free port) and return where it listens.

    ``handler_cancellation`` is on: a client that disconnects cancels its handler, which is how a
    held request learns that nobody is waiting for it any more (nothing is then sent upstream).
    """
    opts = app.get(SERVER_OPTIONS)
    runner: web.AppRunner
    if opts is None:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout)
    else:
        install_log_redaction()
        stats = app.get(SERVER_STATS) or ServerStats()
        _, cap = descriptor_budget(0, opts.max_connections)
        runner = GuardedRunner(
            app, opts, stats, cap, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout,
            keepalive_timeout=opts.idle_timeout, auto_decompress=opts.auto_decompress,
        )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=2048)
    await site.start()
    server = site._server
    sockets = [s for s in getattr(server, "sockets", ()) if s.family in (socket.AF_INET, socket.AF_INET6)]
    bound_port = int(sockets[0].getsockname()[1]) if sockets else port
    return Running(runner=runner, host=host, port=bound_port)


@contextlib.asynccontextmanager
async def running(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[Running]:
    """``start`` as an async context manager that cleans the app up on exit."""
    r = await start(app, host, port)
    try:
        yield r
    finally:
        await r.runner.cleanup()


def install_uvloop() -> None:
    """Use uvloop where the platform has it; plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platform without uvloop
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve_forever(
    make_app: Callable[[], web.Application],
    host: str,
    port: int,
    *,
    banner: str,
    shutdown_timeout: float = 60.0,
) -> None:
    """Run an app until SIGINT/SIGTERM, then shut down gracefully.

    Shutdown, in aiohttp's runner order: 1. stop accepting (the listener closes); 2. the app's
    ``on_shutdown`` hooks run (the proxy releases held requests upstream); 3. in-flight handlers,
    open streams included, get up to ``shutdown_timeout`` seconds; 4. ``cleanup_ctx`` closes the
    rest (background warms, the registry, pooled upstream connections).
    """
    install_uvloop()

    async def main() -> None:
        app = make_app()
        r = await start(app, host, port, shutdown_timeout=shutdown_timeout)
        print(f"{banner} listening on {r.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down: no new connections; releasing held requests; draining streams")
        await r.runner.cleanup()

    asyncio.run(main())
