"""Named gates that hold requests until a test opens them, and the closing signal that frees
every held or sleeping request when the simulator shuts down.

A request sent with ``x-sim-gate: NAME`` waits (after its cache lookup, before prefill) until
``POST /_sim/gates/NAME/open``. An open gate lets current and future requests through until
``/_sim/reset``. Tests that need two requests in flight at once use this instead of timing.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable


class SimClosing(Exception):
    """The simulator is shutting down: a held or sleeping request gives up its connection."""


class Gates:
    """Gates by name, their waiter counts, and the shutdown signal."""

    def __init__(self) -> None:
        self._open: dict[str, asyncio.Event] = {}
        self._waiting: Counter[str] = Counter()
        self._changed = asyncio.Event()  # set (and replaced) whenever a count changes
        self._closing = asyncio.Event()
        self.stalled = 0

    def _event(self, name: str) -> asyncio.Event:
        event = self._open.get(name)
        if event is None:
            event = self._open[name] = asyncio.Event()
        return event

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    async def _until(self, event: asyncio.Event) -> None:
        """Wait for ``event``; raise :class:`SimClosing` if the simulator closes first."""
        if self._closing.is_set():
            raise SimClosing
        waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._closing.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if not event.is_set():
            raise SimClosing

    async def wait(self, name: str) -> None:
        """Hold the caller until gate ``name`` is open."""
        event = self._event(name)
        if event.is_set():
            return
        self._waiting[name] += 1
        self._notify()
        try:
            await self._until(event)
        finally:
            self._waiting[name] -= 1
            if self._waiting[name] <= 0:
                del self._waiting[name]
            self._notify()

    async def stall(self) -> None:
        """Hold the caller until the simulator closes (``x-sim-fault: stall``)."""
        self.stalled += 1
        self._notify()
        try:
            await self._until(asyncio.Event())
        finally:
            self.stalled -= 1
            self._notify()

    def open(self, name: str) -> int:
        """Open gate ``name``; returns how many requests it released."""
        released = self._waiting.get(name, 0)
        self._event(name).set()
        return released

    def waiting(self) -> dict[str, int]:
        """Requests currently held, by gate name."""
        return {name: n for name, n in self._waiting.items() if n > 0}

    async def wait_for_waiters(self, name: str, count: int) -> None:
        """For tests: return once exactly ``count`` requests are held at gate ``name``."""
        await self._wait_until(lambda: self._waiting.get(name, 0) == count)

    async def wait_for_stalled(self, count: int) -> None:
        """For tests: return once exactly ``count`` requests are stalled."""
        await self._wait_until(lambda: self.stalled == count)

    def reset(self) -> None:
        """Forget every gate; requests held at one are released (they continue as if opened)."""
        for event in self._open.values():
            event.set()
        self._open = {}

    def close(self) -> None:
        """Shutdown: every held, stalled or sleeping request gives up (:class:`SimClosing`)."""
        self._closing.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` unless the simulator closes first (then raise :class:`SimClosing`)."""
        if seconds <= 0:
            return
        if self._closing.is_set():
            raise SimClosing
        try:
            async with asyncio.timeout(seconds):
                await self._closing.wait()
        except TimeoutError:
            return
        raise SimClosing
