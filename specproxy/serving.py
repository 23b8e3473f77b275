"""Running an aiohttp application: on a port for the CLI, or on port 0 in-process for tests.

Shared by the proxy and the simulator so both start, stop and handle signals the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger("specproxy.serving")


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
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout)
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
