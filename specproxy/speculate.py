"""Speculation: what the proxy warms on its own, as hooks on the request path (never calls back into it).

- **Before matching** — breakpoint injection (:meth:`Speculator.inject`): a request with no
  breakpoint whose prefix matches a warm of its tenant gets ``cache_control`` on the matched block.
- **After the response** (:meth:`Speculator.after`):
  - *next turn*: warm the conversation extended with the reply (the chain already computed is
    extended with the reply's blocks, nothing is hashed again), closed by a placeholder user turn
    so models without assistant prefill accept it;
  - *keep-warm*: a leader's prefix, once written, is kept for re-sends.
- **Keep-warm**, fed by uses (the coalescer's) and settled warms (the warmer's): a prefix in use is
  re-sent before its entry expires, a read (×0.1) instead of a rewrite (×1.25), until it has gone
  unused for ``keep_warm_idle``. Each refresh is due at the entry's own expiry minus
  ``keep_warm_margin``: the upstream TTL counts from the start of the request that last wrote or
  read it, and a warm with a 5m and a 1h breakpoint is refreshed on the 5m schedule.

Bodies are kept only for what keep-warm will re-send, within ``speculation_body_bytes``, in this
module's own store: registry entries never carry bodies or credentials.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from multidict import CIMultiDict

from specproxy.bodies import cut, warm_request, with_breakpoint_at
from specproxy.bodies import next_turn as next_turn_body
from specproxy.config import Settings
from specproxy.errors import RateLimited
from specproxy.forward import Relayed
from specproxy.identity import Identity
from specproxy.metrics import Metrics
from specproxy.outcome import NEXT_TURN_HEADER, Verdict
from specproxy.prefix import LOOKBACK, TTL_SECONDS, Breakpoint, Prefix, PrefixError
from specproxy.registry import Kind, Registry, State, Warm
from specproxy.warmer import Warmer, WarmResult

log = logging.getLogger("specproxy.speculate")


@dataclass(frozen=True, slots=True)
class Kept:
    """What a keep-warm re-send of one warm needs: the warm request, its headers, its refresh period."""

    request: dict[str, Any]
    headers: CIMultiDict[str]
    period: float  # the shortest TTL among its breakpoints: every entry must be read before it lapses
    size: int


class BodyStore:
    """Re-send material per warm, bounded in bytes; the oldest is dropped first."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._items: OrderedDict[Warm, Kept] = OrderedDict()
        self.bytes = 0

    def keep(self, warm: Warm, kept: Kept) -> bool:
        if kept.size > self._budget:
            return False
        self.drop(warm)
        while self._items and self.bytes + kept.size > self._budget:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.size
        self._items[warm] = kept
        self.bytes += kept.size
        return True

    def get(self, warm: Warm) -> Kept | None:
        return self._items.get(warm)

    def drop(self, warm: Warm) -> None:
        old = self._items.pop(warm, None)
        if old is not None:
            self.bytes -= old.size

    def __contains__(self, warm: Warm) -> bool:
        return warm in self._items


def _all_positions(prefix: Prefix) -> Prefix:
    """The same chain with a breakpoint every ``LOOKBACK`` items: its candidates are every position."""
    bps = tuple(Breakpoint(p, "5m") for p in range(prefix.item_count - 1, -1, -LOOKBACK))
    return Prefix(prefix.chain, tuple(reversed(bps)), prefix.item_count, prefix.locations, prefix.cacheable)


def exact_json(raw: bytes) -> Any:
    """Parse with the standard library: integers of any size stay integers when re-serialised."""
    return json.loads(raw)


class Speculator:
    """The proxy's own warms: injection before matching; next turn and keep-warm after the response."""

    def __init__(self, settings: Settings, registry: Registry, warmer: Warmer, metrics: Metrics) -> None:
        self._s = settings
        self._registry = registry
        self._warmer = warmer
        self._metrics = metrics
        self.bodies = BodyStore(settings.speculation_body_bytes)
        self._timers: dict[Warm, asyncio.TimerHandle] = {}
        self._refreshed_at: dict[Warm, float] = {}  # when the last keep-warm re-send started
        self._kept: dict[str, int] = {}  # tenant -> prefixes kept warm
        self._tasks: set[asyncio.Task[None]] = set()
        warmer.subscribe(self.warm_settled)

    # --- before matching: breakpoint injection ---------------------------------------------------------
    async def inject(self, ident: Identity) -> Identity:
        """``ident`` with a breakpoint added where a warm of its tenant matches it; else ``ident``.

        Only the body changes: it is re-parsed with the standard library, marked, and re-serialised,
        so every value (integers beyond 64 bits included) goes upstream as the client wrote it.
        """
        prefix, body = ident.prefix, ident.body
        if prefix.breakpoints or prefix.item_count == 0 or body.get("cache_control") is not None:
            return ident
        match = await self._registry.match(_all_positions(prefix))
        if match is None or match.warm.state not in (State.WARM, State.WARMING):
            return ident
        if match.position not in prefix.cacheable:
            return ident
        ttl = "1h" if match.entry.ttl >= TTL_SECONDS["1h"] * self._s.cache_ttl_scale else "5m"
        try:
            exact = exact_json(ident.raw)
        except ValueError:
            return ident
        marked = with_breakpoint_at(exact, prefix, match.position, ttl)
        raw = json.dumps(marked, ensure_ascii=False, separators=(",", ":")).encode()
        self._metrics.injected.inc()
        return replace(ident, prefix=prefix.with_breakpoint(match.position, ttl),
                       body=with_breakpoint_at(body, prefix, match.position, ttl), raw=raw, injected=True)

    # --- after the response ---------------------------------------------------------------------------
    def wants_next_turn(self, headers: Mapping[str, str]) -> bool:
        flag = headers.get(NEXT_TURN_HEADER)
        if flag is not None:
            return flag.strip().lower() in ("1", "true", "yes", "on")
        return self._s.next_turn

    async def after(
        self, ident: Identity, verdict: Verdict, lead: Warm | None, relayed: Relayed,
        headers: CIMultiDict[str], *, next_turn: bool,
    ) -> None:
        """The hooks after a relayed response: keep a leader's prefix for keep-warm; warm the next turn."""
        if lead is not None and lead.state is State.WARM and self._s.keep_warm:
            made = cut(ident.body, ident.prefix, ident.prefix.breakpoints[-1].position)
            body, prefix = made if made is not None else (ident.body, ident.prefix)
            self.keep(lead, body, prefix, headers, len(ident.raw))
            self.used(lead, lead.ttl)
        if next_turn:
            await self.next_turn(ident, verdict, relayed, headers)

    async def next_turn(self, ident: Identity, verdict: Verdict, relayed: Relayed,
                        headers: CIMultiDict[str]) -> Warm | None:
        """Warm this conversation extended with the reply, breakpoint on the reply's last block."""
        content = relayed.content
        if relayed.status != 200 or not content or not ident.prefix.breakpoints:
            return None
        try:
            made = next_turn_body(ident.body, ident.prefix, content)
            if made is None:
                return None
            extended, prefix = made
            warm, started = await self._warmer.warm(ident.tenant, prefix, extended, headers, kind=Kind.NEXT_TURN)
        except PrefixError:
            return None
        except RateLimited:
            self._metrics.next_turn.labels("rate_limited").inc()
            return None
        if started:
            warm.next_turn_of = verdict.prefix
            self._metrics.next_turn.labels("sent").inc()
        return warm

    # --- keep-warm ------------------------------------------------------------------------------------
    def keep(self, warm: Warm, body: dict[str, Any], prefix: Prefix, headers: CIMultiDict[str], size: int) -> None:
        """Keep what a keep-warm re-send of ``warm`` needs (only when keep-warm is on)."""
        if not self._s.keep_warm or not prefix.breakpoints:
            return
        period = min(TTL_SECONDS[bp.ttl] for bp in prefix.breakpoints) * self._s.cache_ttl_scale
        self.bodies.keep(warm, Kept(warm_request(body, prefix), headers, period, size))

    def warm_settled(self, warm: Warm, result: WarmResult) -> None:
        """A warm the warmer sent settled: a fresh warm entry is in use (keep-warm may keep it)."""
        if result.state is State.WARM:
            self.used(warm, warm.ttl)
        else:
            self.bodies.drop(warm)

    def used(self, warm: Warm, ttl: float) -> None:
        """``warm``'s prefix was written or read: count a next-turn use; schedule its keep-warm refresh."""
        if warm.kind is Kind.NEXT_TURN and warm.uses == 1:
            self._metrics.next_turn.labels("used").inc()
        if not self._s.keep_warm or warm.state is not State.WARM or warm in self._timers:
            return
        kept = self.bodies.get(warm)
        if kept is None:
            return
        if warm not in self._refreshed_at:  # not kept warm yet: take a slot
            if self._kept.get(warm.tenant, 0) >= self._s.keep_warm_max_per_tenant:
                return
            self._kept[warm.tenant] = self._kept.get(warm.tenant, 0) + 1
            self._refreshed_at[warm] = 0.0
        self._schedule(warm, kept)

    def _expiry(self, warm: Warm, kept: Kept) -> float:
        """When the entry written or last read by the upstream lapses (TTLs count from a request's start)."""
        last = max(warm.started_at, warm.last_used or 0.0, self._refreshed_at.get(warm, 0.0))
        return last + kept.period

    def _schedule(self, warm: Warm, kept: Kept) -> None:
        delay = max(0.0, self._expiry(warm, kept) - self._s.keep_warm_margin - time.monotonic())
        self._timers[warm] = asyncio.get_running_loop().call_later(delay, self._fire, warm)

    def _fire(self, warm: Warm) -> None:
        task = asyncio.get_running_loop().create_task(self._refresh(warm))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, warm: Warm) -> None:
        self._timers.pop(warm, None)
        kept = self.bodies.get(warm)
        now = time.monotonic()
        if kept is None or now - (warm.last_used or warm.started_at) > self._s.keep_warm_idle:
            self._stop(warm)  # unused (or its body was dropped): let it expire
            return
        if self._expiry(warm, kept) - self._s.keep_warm_margin > now:
            self._schedule(warm, kept)  # read since this was scheduled: the entry lives longer
            return
        self._refreshed_at[warm] = now
        result = await self._warmer.resend(kept.request, kept.headers)
        tokens = result.tokens
        if result.state is State.FAILED:
            outcome = "failed"
        elif tokens is not None and tokens.cache_written:
            outcome = "write"  # the entry had already gone: this re-send paid a rewrite
            log.info("keep-warm of %s found the cache gone and rewrote it", warm.prefix)
        else:
            outcome = "read"
        self._metrics.keep_warm.labels(outcome).inc()
        if tokens is not None:
            self._metrics.usage(tokens, warm.model, warm.tenant)
        if outcome == "failed":
            self._stop(warm)
            return
        await self._registry.refreshed(warm)
        self._schedule(warm, kept)

    def _stop(self, warm: Warm) -> None:
        if self._refreshed_at.pop(warm, None) is not None:
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
