"""The in-process warm registry: a bounded map of entries plus an id index."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from cachetools import TLRUCache

from specproxy.prefix import TTL_SECONDS, Prefix, prefix_id
from specproxy.registry.model import Entry, Kind, Match, State, Warm


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
