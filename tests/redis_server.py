"""Helpers for replica tests: a real ``redis-server`` on a free loopback port, and a proxy replica.

    server = RedisServer()
    await server.start()          # in a temp dir, no persistence: --save "" --appendonly no
    server.pause() / resume()     # SIGSTOP / SIGCONT: a Redis that accepts connections but never answers
    await server.kill()           # SIGKILL: clients see their connections drop
    await server.start()          # again, on the same port, empty
    await server.close()

Also used by ``bench/replicas.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator
from typing import Any

from specproxy.registry import Registry
from specproxy.serving import running
from specproxy.testing import ProxyHandle

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process without persistence, killable and restartable on the same port."""

    def __init__(self, port: int | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not on PATH")
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="specproxy-redis-")
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self, timeout: float = 10.0) -> None:
        """Start the server (empty) and return once it answers PING."""
        assert REDIS_SERVER is not None
        if self.running:
            return
        self._proc = await asyncio.create_subprocess_exec(
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self._dir.name, "--protected-mode", "no", "--loglevel", "warning",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(timeout):
            while not await self._pong():
                if self._proc.returncode is not None:
                    raise RuntimeError(f"redis-server exited with {self._proc.returncode}")
                await asyncio.sleep(0.01)  # start-up only: the server has no readiness signal to wait on

    async def _pong(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return (await reader.readline()).startswith(b"+PONG")
        except OSError:
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its port and connections but answers nothing (a stalled Redis)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    async def kill(self) -> None:
        """SIGKILL the server; its data is gone (nothing is persisted)."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()

    async def close(self) -> None:
        await self.kill()
        self._dir.cleanup()


@contextlib.asynccontextmanager
async def run_replica(upstream: str, registry: Registry, **overrides: Any) -> AsyncIterator[ProxyHandle]:
    """Run one proxy replica with ``registry`` on 127.0.0.1, port 0; ``overrides`` are settings.

    ``create_app(registry=...)`` does not start a registry it is given, so this starts it first
    (a Redis registry connects and subscribes there); the app's cleanup closes it.
    """
    from specproxy.app import create_app
    from specproxy.config import load_settings

    settings = load_settings(None, env={}, overrides={"upstream": upstream, **overrides}, read_default_file=False)
    start = getattr(registry, "start", None)
    if start is not None:
        await start()
    app = create_app(settings, registry=registry)
    async with running(app) as r:
        yield ProxyHandle(url=r.url, app=app)
