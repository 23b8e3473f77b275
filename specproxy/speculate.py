"""Speculation without being asked: what the proxy warms on its own, seeing every request and response.

- **Coalescing** (hold.py registers a cold request as the *leader* of its prefix; followers hold on
  it). A non-streaming leader's response begins only when its whole generation is done, so holding
  behind it would cost followers a full generation: the first follower instead makes the proxy send
  its own ``max_tokens: 0`` warm of the shared prefix (:meth:`Speculator.json_follower`), and every
  follower holds on that. Cost: two cache writes instead of N.
- **Breakpoint injection**: a request with no breakpoint whose prefix matches a warm gets one.
- **Next-turn warm**: after a response, warm the conversation extended with the reply.
- **Keep-warm**: a prefix in use is re-warmed at TTL minus a margin (a read, ×0.1, instead of a
  rewrite, ×1.25) until it goes unused for ``keep_warm_idle``.

Bodies are kept only for what keep-warm will re-send, within ``speculation_body_bytes``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import orjson
from multidict import CIMultiDict

from specproxy.bodies import cut, warm_request, with_breakpoint_at
from specproxy.bodies import next_turn as next_turn_body
from specproxy.config import Settings
from specproxy.credentials import Credentials
from specproxy.errors import RateLimited
from specproxy.forward import Relayed, upstream_request_headers
from specproxy.hold import Verdict
from specproxy.metrics import Metrics
from specproxy.prefix import (
    LOOKBACK,
    TTL_SECONDS,
    Breakpoint,
    Prefix,
    PrefixError,
)
from specproxy.registry import Kind, Match, Registry, State, Warm
from specproxy.usage import Usage
from specproxy.warmer import Warmer

log = logging.getLogger("specproxy.speculate")

NEXT_TURN_HEADER = "x-cache-warm-next"
INJECTED_HEADER = "X-Cache-Warm-Injected"


class BodyStore:
    """Bodies kept for re-sends, bounded in bytes; the oldest is dropped first."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._items: OrderedDict[Warm, int] = OrderedDict()
        self.bytes = 0

    def keep(self, warm: Warm, body: dict[str, Any], headers: CIMultiDict[str], size: int) -> bool:
        if size > self._budget:
            return False
        self.drop(warm)
        while self._items and self.bytes + size > self._budget:
            old, old_size = self._items.popitem(last=False)
            old.body = old.headers = None
            self.bytes -= old_size
        warm.body, warm.headers = body, headers
        self._items[warm] = size
        self.bytes += size
        return True

    def drop(self, warm: Warm) -> None:
        size = self._items.pop(warm, None)
        if size is not None:
            self.bytes -= size
        warm.body = warm.headers = None


def _all_positions(prefix: Prefix) -> Prefix:
    """The same chain with a breakpoint every ``LOOKBACK`` items: its candidates are every position."""
    bps = tuple(Breakpoint(p, "5m") for p in range(prefix.item_count - 1, -1, -LOOKBACK))
    return Prefix(prefix.chain, tuple(reversed(bps)), prefix.item_count, prefix.locations, prefix.cacheable)


class Speculator:
    """The proxy's own warms: coalescing help, injection, next turn and keep-warm."""

    def __init__(self, settings: Settings, registry: Registry, warmer: Warmer, metrics: Metrics,
                 credentials: Credentials) -> None:
        self._s = settings
        self._registry = registry
        self._warmer = warmer
        self._metrics = metrics
        self._credentials = credentials
        self._volatile = settings.volatile_system_prefixes
        self.bodies = BodyStore(settings.speculation_body_bytes)
        self._timers: dict[Warm, asyncio.TimerHandle] = {}
        self._active: set[Warm] = set()  # kept warm now: scheduled, or being re-sent
        self._kept: dict[str, int] = {}  # tenant -> prefixes kept warm
        self._tasks: set[asyncio.Task[None]] = set()

    def _upstream_headers(self, headers: Any) -> CIMultiDict[str]:
        return self._credentials.to_upstream(upstream_request_headers(headers))

    # --- coalescing ---------------------------------------------------------------------------------
    async def json_follower(self, verdict: Verdict, match: Match, headers: Any) -> Warm | None:
        """A follower of a non-streaming leader: warm the shared prefix ourselves; hold on that."""
        assert verdict.body is not None and verdict.parsed is not None and verdict.tenant is not None
        if verdict.parsed.images:
            return None  # a cut body would drop images: not the same prefix upstream; follow the leader
        made = cut(verdict.body, verdict.parsed, match.position)
        if made is None:
            return None
        body, parsed = made
        try:
            warm, _ = await self._warmer.warm(verdict.tenant, parsed, body, self._upstream_headers(headers),
                                              kind=Kind.COALESCE, replace=True)
        except RateLimited:
            return None
        return warm

    # --- breakpoint injection -----------------------------------------------------------------------
    async def inject(self, verdict: Verdict) -> bool:
        """Give a breakpoint-less request one where a warm matches it. Only the body changes."""
        parsed, body = verdict.parsed, verdict.body
        if parsed is None or body is None or verdict.tenant is None or parsed.item_count == 0:
            return False
        if body.get("cache_control") is not None:
            return False
        match = await self._registry.match(_all_positions(parsed))
        if match is None or match.warm.state not in (State.WARM, State.WARMING):
            return False
        if match.position not in parsed.cacheable:
            return False
        ttl = "1h" if match.entry.ttl >= TTL_SECONDS["1h"] * self._s.cache_ttl_scale else "5m"
        new_body = with_breakpoint_at(body, parsed, match.position, ttl)
        verdict.parsed = parsed.with_breakpoint(match.position, ttl)
        verdict.body = new_body
        verdict.raw = orjson.dumps(new_body)
        verdict.injected = True
        self._metrics.injected.inc()
        return True

    # --- next turn ------------------------------------------------------------------------------------
    def wants_next_turn(self, headers: Mapping[str, str]) -> bool:
        flag = headers.get(NEXT_TURN_HEADER)
        if flag is not None:
            return flag.strip().lower() in ("1", "true", "yes", "on")
        return self._s.next_turn

    async def next_turn(self, verdict: Verdict, relayed: Relayed, headers: Any) -> Warm | None:
        """Warm this conversation extended with the reply, breakpoint on the reply's last block."""
        body, tenant, content = verdict.body, verdict.tenant, relayed.content
        if relayed.status != 200 or body is None or tenant is None or not content or verdict.parsed is None:
            return None
        if not verdict.parsed.breakpoints:
            return None
        try:
            made = next_turn_body(body, verdict.parsed, content)
            if made is None:
                return None
            extended, parsed = made
            warm, started = await self._warmer.warm(tenant, parsed, extended, self._upstream_headers(headers),
                                                    kind=Kind.NEXT_TURN)
        except PrefixError:
            return None  # e.g. TTL order: a 1h breakpoint kept before... never alter the order
        except RateLimited:
            self._metrics.next_turn.labels("rate_limited").inc()
            return None
        if started:
            warm.next_turn_of = verdict.prefix
            self._metrics.next_turn.labels("sent").inc()
        return warm

    # --- keep-warm ------------------------------------------------------------------------------------
    @property
    def keeps_bodies(self) -> bool:
        """Whether anything will re-send a warm (keep-warm on): only then are bodies kept at all."""
        return self._s.keep_warm

    def keep_body(self, warm: Warm, body: dict[str, Any], prefix: Prefix, headers: Any, size: int) -> None:
        """Keep what a keep-warm re-send needs (only when keep-warm is on)."""
        if self.keeps_bodies:
            self.bodies.keep(warm, warm_request(body, prefix), self._upstream_headers(headers), size)

    def used(self, warm: Warm, ttl: float) -> None:
        """``warm``'s prefix was written or read: count a next-turn use; schedule its keep-warm refresh."""
        if warm.kind is Kind.NEXT_TURN and warm.uses == 1:
            self._metrics.next_turn.labels("used").inc()
        if not self._s.keep_warm or warm.state is not State.WARM or warm.body is None or warm in self._active:
            return
        if self._kept.get(warm.tenant, 0) >= self._s.keep_warm_max_per_tenant:
            return
        self._kept[warm.tenant] = self._kept.get(warm.tenant, 0) + 1
        self._active.add(warm)
        self._schedule(warm, ttl)

    def _schedule(self, warm: Warm, ttl: float) -> None:
        delay = max(0.0, ttl - self._s.keep_warm_margin)
        loop = asyncio.get_running_loop()
        self._timers[warm] = loop.call_later(delay, self._fire, warm, ttl)

    def _fire(self, warm: Warm, ttl: float) -> None:
        task = asyncio.get_running_loop().create_task(self._refresh(warm, ttl))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, warm: Warm, ttl: float) -> None:
        self._timers.pop(warm, None)
        idle = time.monotonic() - (warm.last_used or warm.started_at)
        if idle > self._s.keep_warm_idle or warm.body is None or warm.headers is None:
            self._stop(warm)  # unused: let it expire
            return
        result = await self._warmer.resend(warm.body, warm.headers)
        usage = result.usage or {}
        if result.state is State.FAILED:
            outcome = "failed"
        elif usage.get("cache_creation_input_tokens"):
            outcome = "write"  # the entry had already gone: this re-send paid a rewrite
            log.info("keep-warm of %s found the cache gone and rewrote it", warm.prefix)
        else:
            outcome = "read"
        self._metrics.keep_warm.labels(outcome).inc()
        if result.usage:
            self._metrics.usage(Usage.from_api(result.usage), warm.model, warm.tenant)
        if outcome == "failed":
            self._stop(warm)
            return
        await self._registry.refreshed(warm)
        self._schedule(warm, ttl)

    def _stop(self, warm: Warm) -> None:
        self._active.discard(warm)
        left = self._kept.get(warm.tenant, 1) - 1
        if left > 0:
            self._kept[warm.tenant] = left
        else:
            self._kept.pop(warm.tenant, None)
        self.bodies.drop(warm)

    async def close(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
