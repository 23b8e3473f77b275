"""The warm registry: which prefixes are warming or warm, per tenant, and waiting for them to settle.

One small async :class:`Registry` protocol with two backends: :class:`MemoryRegistry` here (the
default, ``cachetools.TLRUCache``) and a Redis one for replicas. Keys are chain values from
:mod:`specproxy.prefix`, which already include the tenant digest; every entry expires.

States:

    warming ──► warm          the warm's response began and its usage shows a cache write or read
        │──────► uncacheable   it succeeded but wrote nothing (prefix under the model's minimum)
        └──────► failed        it got an error; kept ``failed_ttl`` so a storm does not re-send it
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cachetools import TLRUCache

from specproxy.prefix import TTL_SECONDS, Prefix, prefix_id


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
    body: dict[str, Any] | None = None  # kept only for keep-warm re-sends, within a byte budget
    headers: Any = None  # the upstream headers a re-send needs (credential included); never shown
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

    def snapshot(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Public view of live warms (optionally one tenant's), newest first."""

    def __len__(self) -> int:
        """Live entries (this replica's view)."""

    async def close(self) -> None:
        """Release resources."""


class MemoryRegistry:
    """The in-process registry: a bounded TLRU cache of entries plus an id index."""

    def __init__(
        self,
        *,
        max_entries: int,
        warm_timeout: float,
        failed_ttl: float,
        rewarm_margin: float,
        clock: Callable[[], float] = time.monotonic,
        ttl_scale: float = 1.0,
    ) -> None:
        self._clock = clock
        self._ttl_scale = ttl_scale
        self._warm_timeout = warm_timeout
        self._failed_ttl = failed_ttl
        self._rewarm_margin = rewarm_margin
        self._entries: TLRUCache[bytes, Entry] = TLRUCache(
            maxsize=max_entries, ttu=lambda _k, e, _now: e.expires_at, timer=clock
        )
        # id → (warm, longest key), living exactly as long as the warm's longest-lived entry.
        self._by_id: TLRUCache[str, tuple[Warm, bytes]] = TLRUCache(
            maxsize=max_entries, ttu=lambda _k, v, _now: v[0].expires_at, timer=clock
        )
        # The entries each unsettled warm registered; settle re-inserts them even if they expired
        # meanwhile (a warm that times out settles exactly when its warming entry runs out).
        self._keys_of: dict[int, list[tuple[bytes, Entry]]] = {}

    # -- lookups ---------------------------------------------------------------------------------
    async def match(self, prefix: Prefix) -> Match | None:
        entries = self._entries
        for pos, key in prefix.candidates():
            entry = entries.get(key)
            if entry is not None:
                return Match(entry=entry, position=pos, key=key)
        return None

    async def get(self, tenant: str, prefix: str) -> tuple[Warm, float | None] | None:
        found = self._by_id.get(prefix)
        if found is None or found[0].tenant != tenant:
            return None
        warm, key = found
        entry = self._entries.get(key)
        return warm, (entry.expires_at if entry is not None else None)

    def snapshot(self, tenant: str | None = None) -> list[dict[str, Any]]:
        now = self._clock()
        seen: dict[int, dict[str, Any]] = {}
        for entry in list(self._entries.values()):
            warm = entry.warm
            if tenant is not None and warm.tenant != tenant:
                continue
            view = seen.get(id(warm))
            if view is None or entry.expires_at > now + view.get("expires_in_s", 0):
                seen[id(warm)] = warm.as_json(now, entry.expires_at)
        return sorted(seen.values(), key=lambda v: v["age_s"])

    def __len__(self) -> int:
        return len(self._entries)

    # -- single flight -------------------------------------------------------------------------------
    async def begin(
        self, tenant: str, prefix: Prefix, *, kind: Kind = Kind.PREWARM, replace: bool = False
    ) -> tuple[Warm, bool]:
        last = prefix.last_breakpoint
        if last is None:
            raise ValueError("a warm needs at least one breakpoint")
        now = self._clock()
        existing = self._entries.get(prefix.key(last.position))
        replaceable = replace and existing is not None and existing.warm.kind is Kind.LEADER_JSON
        if existing is not None and not self._worth_rewarming(existing, now) and not (
            replaceable and existing.warm.state is State.WARMING
        ):
            return existing.warm, False

        ttl = max(TTL_SECONDS[bp.ttl] for bp in prefix.breakpoints) * self._ttl_scale
        warm = Warm(
            tenant=tenant,
            prefix=prefix_id(prefix.key(last.position)),
            breakpoints=len(prefix.breakpoints),
            started_at=now,
            ttl=ttl,
            kind=kind,
        )
        keys: list[tuple[bytes, Entry]] = []
        for bp in prefix.breakpoints:
            key = prefix.key(bp.position)
            current = self._entries.get(key)
            # Do not turn a live warm entry at an earlier breakpoint back into a held one.
            if current is not None and current.warm.state is State.WARM and not self._worth_rewarming(current, now):
                continue
            entry = Entry(warm, bp.position, TTL_SECONDS[bp.ttl] * self._ttl_scale, now + self._warm_timeout)
            self._store(key, entry)
            keys.append((key, entry))
        self._keys_of[id(warm)] = keys
        warm.keys = [k for k, _ in keys]
        warm.expires_at = max(warm.expires_at, now + self._warm_timeout)
        self._by_id[warm.prefix] = (warm, prefix.key(last.position))
        return warm, True

    async def peek(self, prefix: Prefix, *, replace: bool = False) -> Warm | None:
        last = prefix.last_breakpoint
        existing = self._entries.get(prefix.key(last.position)) if last is not None else None
        if existing is None or self._worth_rewarming(existing, self._clock()):
            return None
        if replace and existing.warm.kind is Kind.LEADER_JSON and existing.warm.state is State.WARMING:
            return None
        return existing.warm

    def _store(self, key: bytes, entry: Entry) -> None:
        """(Re-)insert an entry (TLRU computes expiry on insert); its warm's id lives as long."""
        self._entries[key] = entry
        warm = entry.warm
        if entry.expires_at > warm.expires_at:
            warm.expires_at = entry.expires_at
            found = self._by_id.get(warm.prefix)
            if found is not None and found[0] is warm:
                self._by_id[warm.prefix] = found

    def _worth_rewarming(self, entry: Entry, now: float) -> bool:
        state = entry.warm.state
        if state is State.WARM:
            return entry.expires_at - now <= self._rewarm_margin
        return False  # warming, uncacheable, or failed within failed_ttl: leave it be

    async def settle(self, warm: Warm, state: State, *, error: str | None = None) -> None:
        if warm.settled:
            return
        now = self._clock()
        warm.state = state
        warm.settled_at = now
        warm.error = error
        warm.expires_at = 0.0  # recomputed from the entries' new expiries below
        found = self._by_id.get(warm.prefix)
        for key, entry in self._keys_of.pop(id(warm), ()):
            current = self._entries.get(key)
            if current is not None and current is not entry:
                continue  # a newer warm took this key over
            if state is State.FAILED:
                entry.expires_at = now + self._failed_ttl
            else:
                # The upstream TTL counts from the start of the request that wrote the entry.
                entry.expires_at = warm.started_at + entry.ttl
            self._store(key, entry)
        if found is not None and found[0] is warm:
            self._by_id[warm.prefix] = found
        warm._settled.set()

    async def touch(self, match: Match) -> None:
        entry = match.entry
        warm = entry.warm
        now = self._clock()
        warm.uses += 1
        warm.last_used = now
        if warm.state is State.WARM:
            entry.expires_at = now + entry.ttl
            if self._entries.get(match.key) is entry:
                self._store(match.key, entry)

    async def refreshed(self, warm: Warm) -> None:
        now = self._clock()
        for key in warm.keys:
            entry = self._entries.get(key)
            if entry is not None and entry.warm is warm:
                entry.expires_at = now + entry.ttl
                self._store(key, entry)

    async def close(self) -> None:
        for warm, _key in list(self._by_id.values()):
            warm._settled.set()
