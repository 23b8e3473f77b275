"""What the registry holds and promises: states, kinds, warms, entries, matches, the protocol.

Keys are chain values from :mod:`specproxy.prefix`, which already include the tenant digest; every
entry expires.

States:

    warming ──► warm          the warm's response began and its usage shows a cache write or read
        │──────► uncacheable   it succeeded but wrote nothing (prefix under the model's minimum)
        └──────► failed        it got an error; kept ``failed_ttl`` so a storm does not re-send it
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from specproxy.prefix import Prefix


class Kind(enum.StrEnum):
    """Who started a warm: an app's /prewarm, a request the proxy let through first, or the proxy."""

    PREWARM = "prewarm"  # POST /prewarm
    LEADER = "leader"  # a cold streaming request: settles at its message_start
    LEADER_JSON = "leader-json"  # a cold non-streaming request: settles when its response arrives
    COALESCE = "coalesce"  # the proxy's own max_tokens 0 warm for followers of a non-streaming leader
    NEXT_TURN = "next-turn"  # the conversation extended with the reply


class State(enum.StrEnum):
    WARMING = "warming"
    WARM = "warm"
    UNCACHEABLE = "uncacheable"
    FAILED = "failed"


@dataclass(eq=False, slots=True)
class Warm:
    """One warm: in flight or settled, shared by every breakpoint key it registered."""

    tenant: str
    prefix: str  # 16-hex id of its longest breakpoint
    breakpoints: int
    started_at: float
    ttl: float
    state: State = State.WARMING
    settled_at: float | None = None
    error: str | None = None
    mode: str | None = None  # "0" or "1": the max_tokens the warm was sent with
    uses: int = 0
    last_used: float | None = None
    usage: dict[str, Any] | None = None
    model: str | None = None
    kind: Kind = Kind.PREWARM
    keys: list[bytes] = field(default_factory=list)  # the chain values it registered
    next_turn_of: str | None = None  # for a next-turn warm: the prefix id of the turn it extends
    expires_at: float = 0.0  # when its longest-lived entry expires (this replica's clock)
    _settled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def settled(self) -> bool:
        return self.state is not State.WARMING

    async def wait(self, timeout: float) -> bool:
        """Wait until settled, at most ``timeout`` seconds. True when settled. Never polls."""
        if self.settled:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._settled.wait()
        except TimeoutError:
            return False
        return True

    def release_waiters(self) -> None:
        """Wake everyone waiting without settling (shutdown): they see the state still ``warming``."""
        self._settled.set()

    def as_json(self, now: float, expires_at: float | None = None) -> dict[str, Any]:
        """Public view: ids, state and times only; never content or credentials."""
        out: dict[str, Any] = {
            "prefix": self.prefix,
            "state": str(self.state),
            "breakpoints": self.breakpoints,
            "age_s": round(now - self.started_at, 3),
            "uses": self.uses,
        }
        if expires_at is not None:
            out["expires_in_s"] = round(max(0.0, expires_at - now), 3)
        if self.mode is not None:
            out["mode"] = f"max_tokens {self.mode}"
        if self.error:
            out["error"] = self.error
        return out


@dataclass(eq=False, slots=True)
class Entry:
    """One registered chain value (one breakpoint of a warm) and when it expires."""

    warm: Warm
    position: int
    ttl: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class Match:
    """The longest registered prefix of a request: the entry and the item position it covers."""

    entry: Entry
    position: int
    key: bytes

    @property
    def warm(self) -> Warm:
        return self.entry.warm


class Registry(Protocol):
    """What the proxy needs of warm state, whatever holds it."""

    async def match(self, prefix: Prefix) -> Match | None:
        """The longest live entry among the prefix's lookback candidates, or None."""

    async def begin(
        self, tenant: str, prefix: Prefix, *, kind: Kind = Kind.PREWARM, replace: bool = False
    ) -> tuple[Warm, bool]:
        """Single flight: the warm for this prefix, and True when the caller must send it.

        Decided by :func:`specproxy.registry.rules.decide` at the prefix's longest breakpoint key.
        ``replace`` takes over a prefix whose current warm is a non-streaming leader still in flight.
        """

    async def peek(self, prefix: Prefix, *, replace: bool = False) -> Warm | None:
        """The warm :meth:`begin` would answer with (sending nothing), or None when it would begin one."""

    async def settle(self, warm: Warm, state: State, *, error: str | None = None) -> None:
        """Record a warm's outcome and release everyone waiting on it."""

    async def touch(self, match: Match) -> None:
        """A request read this entry: count the use and refresh its TTL (reads refresh upstream)."""

    async def refreshed(self, warm: Warm) -> None:
        """A keep-warm re-send read the cache: every entry of ``warm`` lives a TTL from now."""

    async def get(self, tenant: str, prefix: str) -> tuple[Warm, float | None] | None:
        """A warm by its 16-hex id, for its own tenant only; with its expiry."""

    async def sync(self) -> None:
        """Return once this backend's changes are shared and what others shared before is applied here
        (a no-op in memory: a seam for tests and hand-overs, never needed on the request path)."""

    def snapshot(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Public view of live warms (optionally one tenant's), newest first."""

    def __len__(self) -> int:
        """Live entries (this replica's view)."""

    async def close(self) -> None:
        """Release resources."""
