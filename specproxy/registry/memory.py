"""The in-process warm registry: a bounded table of entries (one per breakpoint key) plus an id index.

Single flight is :func:`specproxy.registry.rules.decide`, applied to every key a warm is offered.
Lifetimes, from the moment each is decided (this process's monotonic clock):

    warming      warm_timeout + failed_ttl from its begin; reads as ``failed`` (error ``timeout``)
                 for the last failed_ttl of that, if nothing settled it by then
    warm         the cache TTL from the warm's start, then from each use (reads refresh upstream)
    uncacheable  the cache TTL from the warm's start
    failed       failed_ttl from its settle

A warm's id lives as long as its longest-lived entry. Both tables are bounded: ``max_entries`` in
all, and ``max_entries_per_tenant`` per tenant, over which a tenant evicts its own least recently
written entry (so no tenant can push another's out by filling the registry).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from specproxy.prefix import TTL_SECONDS, Prefix, prefix_id
from specproxy.registry.model import Entry, Kind, Match, State, Warm
from specproxy.registry.rules import Take, decide, reads_as
from specproxy.registry.table import Table

if TYPE_CHECKING:
    from specproxy.config import Settings

TIMED_OUT: Final = "timeout"  # the error of a warm still warming at warm_timeout


class MemoryRegistry:
    """The in-process registry (the default backend, and each replica's mirror in Redis mode)."""

    def __init__(
        self,
        *,
        max_entries: int,
        warm_timeout: float,
        failed_ttl: float,
        rewarm_margin: float,
        clock: Callable[[], float] = time.monotonic,
        ttl_scale: float = 1.0,
        max_entries_per_tenant: int | None = None,
    ) -> None:
        self._clock = clock
        self._ttl_scale = ttl_scale
        self._warm_timeout = warm_timeout
        self._failed_ttl = failed_ttl
        self._rewarm_margin = rewarm_margin
        per_tenant = min(max_entries_per_tenant, max_entries) if max_entries_per_tenant else None
        self._entries: Table[bytes, Entry] = Table(
            maxsize=max_entries, per_tenant=per_tenant, clock=clock,
            expires=lambda e: e.expires_at, tenant=lambda e: e.warm.tenant,
        )
        # id → (warm, its longest key), living exactly as long as the warm's longest-lived entry.
        self._by_id: Table[str, tuple[Warm, bytes]] = Table(
            maxsize=max_entries, per_tenant=per_tenant, clock=clock,
            expires=lambda v: v[0].expires_at, tenant=lambda v: v[0].tenant,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> MemoryRegistry:
        """The registry ``settings`` describe (``registry = "memory"``)."""
        return cls(max_entries=settings.registry_max_entries, warm_timeout=settings.warm_timeout,
                   failed_ttl=settings.failed_ttl, rewarm_margin=settings.rewarm_margin,
                   ttl_scale=settings.cache_ttl_scale, max_entries_per_tenant=settings.max_entries_per_tenant)

    # -- lookups ---------------------------------------------------------------------------------
    async def match(self, prefix: Prefix) -> Match | None:
        now = self._clock()
        for pos, key in prefix.candidates():
            entry = self._live(key, now)
            if entry is not None:
                return Match(entry=entry, position=pos, key=key)
        return None

    async def get(self, tenant: str, prefix: str) -> tuple[Warm, float | None] | None:
        now = self._clock()
        found = self._by_id.get(prefix, now)
        if found is None or found[0].tenant != tenant:
            return None
        warm, key = found
        self._check_timeout(warm, now)
        entry = self._live(key, now)
        return warm, (entry.expires_at if entry is not None and entry.warm is warm else None)

    async def peek(self, prefix: Prefix, *, replace: bool = False) -> Warm | None:
        last = prefix.last_breakpoint
        if last is None:
            return None
        now = self._clock()
        existing = self._live(prefix.key(last.position), now)
        if existing is None or self._decide(existing, now, replace).taken:
            return None
        return existing.warm

    def snapshot(self, tenant: str | None = None) -> list[dict[str, Any]]:
        now = self._clock()
        seen: dict[int, dict[str, Any]] = {}
        for entry in self._entries.values():
            warm = entry.warm
            if tenant is not None and warm.tenant != tenant:
                continue
            self._check_timeout(warm, now)
            view = seen.get(id(warm))
            if view is None or entry.expires_at > now + view.get("expires_in_s", 0):
                seen[id(warm)] = warm.as_json(now, entry.expires_at)
        return sorted(seen.values(), key=lambda v: v["age_s"])

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        """How much is held: live entries, and warms known by id (both bounded)."""
        return {"entries": len(self._entries), "ids": len(self._by_id)}

    def count(self, tenant: str) -> int:
        """Live entries ``tenant`` holds (at most ``max_entries_per_tenant``)."""
        return self._entries.count(tenant)

    # -- single flight ---------------------------------------------------------------------------
    async def begin(
        self, tenant: str, prefix: Prefix, *, kind: Kind = Kind.PREWARM, replace: bool = False
    ) -> tuple[Warm, bool]:
        return self.begin_now(tenant, prefix, kind=kind, replace=replace)

    def begin_now(
        self, tenant: str, prefix: Prefix, *, kind: Kind = Kind.PREWARM, replace: bool = False
    ) -> tuple[Warm, bool]:
        """:meth:`begin`, decided and registered before it returns (nothing to wait for)."""
        last = prefix.last_breakpoint
        if last is None:
            raise ValueError("a warm needs at least one breakpoint")
        now = self._clock()
        existing = self._live(prefix.key(last.position), now)
        if existing is not None and not self._decide(existing, now, replace).taken:
            return existing.warm, False
        warm = self._new_warm(tenant, prefix, kind, now)
        spec = [(prefix.key(bp.position), bp.position, TTL_SECONDS[bp.ttl] * self._ttl_scale)
                for bp in prefix.breakpoints]
        self._install(warm, spec, [now + self._warm_timeout + self._failed_ttl] * len(spec), replace=replace)
        return warm, True

    def _new_warm(self, tenant: str, prefix: Prefix, kind: Kind, now: float) -> Warm:
        last = prefix.last_breakpoint
        assert last is not None
        return Warm(
            tenant=tenant,
            prefix=prefix_id(prefix.key(last.position)),
            breakpoints=len(prefix.breakpoints),
            started_at=now,
            ttl=max(TTL_SECONDS[bp.ttl] for bp in prefix.breakpoints) * self._ttl_scale,
            kind=kind,
        )

    def _decide(self, existing: Entry | None, now: float, replace: bool) -> Take:
        return decide(existing, now, rewarm_margin=self._rewarm_margin, failed_ttl=self._failed_ttl,
                      replace=replace)

    def _install(
        self,
        warm: Warm,
        spec: Sequence[tuple[bytes, int, float]],
        expiries: Sequence[float],
        *,
        replace: bool = False,
        force: Sequence[bool | None] | None = None,
    ) -> None:
        """Register ``warm`` at each key of ``spec`` (chain value, position, entry ttl; longest last),
        each entry to expire at its ``expiries``: where ``force`` says True, never where it says
        False, and otherwise where the single-flight rule lets it take the key."""
        now = self._clock()
        taken: list[bytes] = []
        for i, ((key, position, ttl), expires_at) in enumerate(zip(spec, expiries, strict=True)):
            if expires_at <= now:
                continue
            current = self._live(key, now)
            take = force[i] if force is not None else None
            if take is None:
                take = current is None or current.warm is warm or self._decide(current, now, replace).taken
            if take:
                self._store(key, Entry(warm, position, ttl, expires_at))
                taken.append(key)
        warm.keys = taken
        warm.expires_at = max(warm.expires_at, *expiries)
        longest = spec[-1][0]
        if longest in taken or self._by_id.get(warm.prefix, now) is None:
            self._by_id.put(warm.prefix, (warm, longest))
        self._track(warm)

    def _track(self, warm: Warm) -> None:
        """A warm was registered (the mirror indexes it by uid)."""

    def _store(self, key: bytes, entry: Entry) -> None:
        """(Re-)insert an entry; its warm's id lives as long as the warm's longest-lived entry."""
        self._entries.put(key, entry)
        warm = entry.warm
        if entry.expires_at > warm.expires_at:
            warm.expires_at = entry.expires_at

    def _live(self, key: bytes, now: float) -> Entry | None:
        """The live entry at ``key``; a warm that has been warming too long is failed first."""
        entry = self._entries.get(key, now)
        if entry is not None and entry.warm.state is State.WARMING and \
                reads_as(entry, now, self._failed_ttl) is State.FAILED:
            self._time_out(entry.warm, now)
        return entry

    def _check_timeout(self, warm: Warm, now: float) -> None:
        if warm.state is State.WARMING and warm.expires_at - now <= self._failed_ttl:
            self._time_out(warm, now)

    def _time_out(self, warm: Warm, now: float) -> None:
        """Nothing settled ``warm`` within warm_timeout: it is failed, its entries kept as they are
        (they expire failed_ttl after the timeout)."""
        self._settle_now(warm, State.FAILED, TIMED_OUT, now, keep_expiry=True)

    # -- changes ---------------------------------------------------------------------------------
    async def settle(self, warm: Warm, state: State, *, error: str | None = None) -> None:
        if warm.settled:
            return
        now = self._clock()
        if warm.expires_at - now <= self._failed_ttl:
            self._time_out(warm, now)  # too late: it read as failed already
        else:
            self._settle_now(warm, state, error, now)

    def _settle_now(
        self, warm: Warm, state: State, error: str | None, now: float, *, keep_expiry: bool = False
    ) -> None:
        if warm.settled:
            return
        warm.state = state
        warm.settled_at = now
        warm.error = error
        if not keep_expiry:
            warm.expires_at = 0.0  # recomputed from the entries' new expiries below
            for key in warm.keys:
                entry = self._entries.get(key, now)
                if entry is None or entry.warm is not warm:
                    continue  # gone, or a newer warm took this key over
                if state is State.FAILED:
                    entry.expires_at = now + self._failed_ttl
                else:
                    # The upstream TTL counts from the start of the request that wrote the entry.
                    entry.expires_at = warm.started_at + entry.ttl
                self._store(key, entry)
        found = self._by_id.get(warm.prefix, now)
        if found is not None and found[0] is warm:
            self._by_id.put(warm.prefix, found)  # its expiry may have moved earlier
        self._settled(warm)
        warm._settled.set()

    def _settled(self, warm: Warm) -> None:
        """A warm settled (the mirror stops waiting for a remote one)."""

    async def touch(self, match: Match) -> None:
        entry = match.entry
        warm = entry.warm
        now = self._clock()
        warm.uses += 1
        warm.last_used = now
        if warm.state is State.WARM:
            entry.expires_at = now + entry.ttl
            if self._entries.get(match.key, now) is entry:
                self._store(match.key, entry)

    async def refreshed(self, warm: Warm) -> None:
        now = self._clock()
        for key in warm.keys:
            entry = self._entries.get(key, now)
            if entry is not None and entry.warm is warm:
                entry.expires_at = now + entry.ttl
                self._store(key, entry)

    async def sync(self) -> None:
        """Nothing to share: every change is visible as soon as it is made."""

    async def close(self) -> None:
        for warm, _key in self._by_id.values():
            warm._settled.set()
        for entry in self._entries.values():
            entry.warm._settled.set()
