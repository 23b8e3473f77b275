"""Test helpers shipped with the package: run the simulator in-process on a free port.

    async with run_sim() as sim:            # time_scale 0: no delays
        client = AsyncAnthropic(base_url=sim.url, api_key="k")
        ...
        assert (await sim.stats())["cache_writes"] == 1
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from specproxy.serving import running
from specproxy.sim import SimProfile, SimState, create_sim_app
from specproxy.sim.messages import SIM_STATE


class ManualClock:
    """A clock for TTL tests: starts at ``start`` seconds and moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(slots=True)
class SimHandle:
    """A running simulator: its base URL, its app, its state, and its control endpoints."""

    url: str
    app: web.Application
    state: SimState
    session: aiohttp.ClientSession

    async def _get(self, path: str) -> Any:
        async with self.session.get(self.url + path) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def _post(self, path: str) -> Any:
        async with self.session.post(self.url + path) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def stats(self) -> dict[str, Any]:
        """``GET /_sim/stats``."""
        result: dict[str, Any] = await self._get("/_sim/stats")
        return result

    async def reset(self) -> None:
        """``POST /_sim/reset``: clear cache, counters, request log and gates."""
        await self._post("/_sim/reset")

    async def requests(self) -> list[dict[str, Any]]:
        """``GET /_sim/requests``: the request log, oldest first."""
        result: list[dict[str, Any]] = await self._get("/_sim/requests")
        return result

    async def gates(self) -> dict[str, int]:
        """``GET /_sim/gates``: requests held, by gate name."""
        result: dict[str, int] = await self._get("/_sim/gates")
        return result

    async def open_gate(self, name: str) -> None:
        """``POST /_sim/gates/{name}/open``."""
        await self._post(f"/_sim/gates/{name}/open")


@contextlib.asynccontextmanager
async def run_sim(
    profile: SimProfile | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    dialect: str | None = None,
    **overrides: Any,
) -> AsyncIterator[SimHandle]:
    """Run the simulator on 127.0.0.1, port 0, for the duration of the block.

    Without a ``profile`` the default one runs at ``time_scale=0`` (no delays); ``overrides``
    replace profile fields (``reply_tokens=5``, ``time_scale=0.01``, ...). ``clock`` drives TTLs.
    ``dialect`` ("anthropic", "vllm", "sglang", "llamacpp") picks what the simulator answers as.
    """
    base = profile if profile is not None else SimProfile(time_scale=0.0)
    if dialect is not None:
        overrides["dialect"] = dialect
    app = create_sim_app(dataclasses.replace(base, **overrides), clock=clock)
    async with running(app) as r, aiohttp.ClientSession() as session:
        yield SimHandle(url=r.url, app=app, state=app[SIM_STATE], session=session)


@dataclass(slots=True)
class ProxyHandle:
    """A running proxy: its base URL and its app (for state such as ``held``)."""

    url: str
    app: web.Application

    @property
    def held(self) -> int:
        """Requests held right now."""
        from specproxy.keys import COALESCER

        return self.app[COALESCER].held

    async def until_held(self, n: int, timeout: float = 30.0) -> None:
        """Return once exactly ``n`` requests are held; TimeoutError after ``timeout`` seconds."""
        from specproxy.keys import COALESCER

        async with asyncio.timeout(timeout):
            await self.app[COALESCER].limits.until_held(n)

    async def settled(self, prefix: str | None = None) -> tuple[Any, Any]:
        """Wait for the next warm the proxy sends to settle (one whose id is ``prefix``, if given):
        its ``(warm, result)``. Start awaiting before the warm can settle (e.g. as a task)."""
        from specproxy.keys import WARMER

        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[Any, Any]] = loop.create_future()

        def seen(warm: Any, result: Any) -> None:
            if not done.done() and (prefix is None or warm.prefix == prefix):
                done.set_result((warm, result))

        warmer = self.app[WARMER]
        warmer.subscribe(seen)
        try:
            return await done
        finally:
            warmer.unsubscribe(seen)


@contextlib.asynccontextmanager
async def run_proxy(upstream: str, **overrides: Any) -> AsyncIterator[ProxyHandle]:
    """Run specproxy on 127.0.0.1, port 0, in front of ``upstream``; ``overrides`` are settings.

    The config file and ``SPECPROXY_*`` environment are ignored: a test states all it relies on.
    """
    from specproxy.app import create_app
    from specproxy.config import load_settings

    settings = load_settings(None, env={}, overrides={"upstream": upstream, **overrides}, read_default_file=False)
    app = create_app(settings)
    async with running(app) as r:
        yield ProxyHandle(url=r.url, app=app)
