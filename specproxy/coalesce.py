"""Coalescing: who leads, who follows, and for how long a request is held. The one place it is decided.

For one identified ``/v1/messages`` request, :meth:`Coalescer.decide` returns a frozen
:class:`Decision`: the :class:`~specproxy.outcome.Verdict` (the ``X-Cache-Warm*`` headers) and, when
the request leads its prefix, the registry entry it must settle once its response has begun.

The rules, in order, at most :data:`ROUNDS` times within ``max_hold``:

1. **Match** the request's prefix chain against the registry (longest live entry wins).
2. **Follow** when that entry is ``warming``: hold until it settles, then match again. A
   non-streaming leader answers only after its whole generation, so its followers never hold on
   it: the first one sends a ``max_tokens: 0`` warm of the shared prefix (a cut body, or its own
   body when no cut can stand for the prefix, e.g. images), and they all hold on that. Where no
   such warm can be sent (the tenant's warm limits are full) the follower goes at once, ``unheld``.
3. **Lead** when coalescing is on and nothing live covers the request's *last* breakpoint, even
   if a shorter prefix is warm (a warm system prompt in front of a new document): the request is
   registered as the warm of its own prefix and goes at once; later requests follow it.
4. Otherwise go, with the outcome the match's state gives: ``hit``, ``held``, ``failed``,
   ``uncacheable``, or ``miss`` when nothing matched.

Whatever a request read after waiting counts as a use of that entry (so a helper warm every
follower read is not "wasted"). Held requests are bounded in number, per tenant and in bytes;
over a bound a request goes at once, never refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from multidict import CIMultiDict

from specproxy.bodies import cut
from specproxy.errors import RateLimited
from specproxy.identity import Identity
from specproxy.outcome import Outcome, Verdict
from specproxy.prefix import prefix_id
from specproxy.registry import Kind, Match, Registry, State, Warm
from specproxy.warmer import Warmer

log = logging.getLogger("specproxy.coalesce")

ROUNDS: Final = 3  # match → hold → match → hold → match: enough for "system warm, then a leader"
_SETTLED: Final = {State.WARM: Outcome.HIT, State.UNCACHEABLE: Outcome.UNCACHEABLE, State.FAILED: Outcome.FAILED}
_LEADS: Final = frozenset({Kind.LEADER, Kind.LEADER_JSON, Kind.COALESCE})


def _failed_leader(match: Match) -> bool:
    return match.warm.state is State.FAILED and match.warm.kind in (Kind.LEADER, Kind.LEADER_JSON)


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict for one request, and the warm it leads (it settles it when its response begins)."""

    verdict: Verdict
    lead: Warm | None = None


class HoldLimits:
    """Bounds on what is held at once: requests in total, per tenant, and request bytes in total.

    Every change is announced (:meth:`until_held`), so a test can await "N requests are held"
    instead of polling.
    """

    def __init__(self, total: int, per_tenant: int, max_bytes: int) -> None:
        self._total_max = total
        self._tenant_max = per_tenant
        self._bytes_max = max_bytes
        self.total = 0
        self.bytes = 0
        self._by_tenant: dict[str, int] = {}
        self._changed = asyncio.Event()

    def try_acquire(self, tenant: str, size: int) -> bool:
        n = self._by_tenant.get(tenant, 0)
        if self.total >= self._total_max or n >= self._tenant_max or self.bytes + size > self._bytes_max:
            return False
        self.total += 1
        self.bytes += size
        self._by_tenant[tenant] = n + 1
        self._announce()
        return True

    def release(self, tenant: str, size: int) -> None:
        self.total -= 1
        self.bytes -= size
        n = self._by_tenant[tenant] - 1
        if n:
            self._by_tenant[tenant] = n
        else:
            del self._by_tenant[tenant]
        self._announce()

    def _announce(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until_held(self, n: int) -> None:
        """Return once exactly ``n`` requests are held (a seam for tests and harnesses)."""
        while self.total != n:
            await self._changed.wait()


Used = Callable[[Warm, float], None]


class Coalescer:
    """Decides lead, follow or go for each request; holds followers; drains at shutdown."""

    def __init__(
        self,
        registry: Registry,
        warmer: Warmer,
        *,
        max_hold: float,
        limits: HoldLimits,
        coalesce: bool,
    ) -> None:
        self._registry = registry
        self._warmer = warmer
        self._max_hold = max_hold
        self.limits = limits
        self._coalesce = coalesce
        self._waiting: dict[Warm, int] = {}
        self._used: list[Used] = []
        self.draining = False

    def on_use(self, callback: Used) -> None:
        """Call ``callback(warm, ttl)`` each time a request reads a registered entry (keep-warm listens)."""
        self._used.append(callback)

    @property
    def held(self) -> int:
        return self.limits.total

    async def decide(self, ident: Identity, headers: CIMultiDict[str]) -> Decision:
        """Match, follow, lead or go (see the module doc). Raises CancelledError if the client leaves."""
        prefix = ident.prefix
        last = prefix.last_breakpoint
        assert last is not None, "only a request with a breakpoint is coalesced"
        deadline = time.monotonic() + self._max_hold
        held_s: float | None = None
        coalesced = False
        match: Match | None = None
        for _ in range(ROUNDS):
            match = await self._registry.match(prefix)
            if match is not None and match.warm.state is State.WARMING:
                target = await self._hold_target(ident, match, headers)
                coalesced = coalesced or (target is not None and target.kind in _LEADS)
                if target is None or self.draining:
                    return Decision(self._verdict(Outcome.UNHELD, match, held_s, ident, coalesced))
                budget = deadline - time.monotonic()
                if budget <= 0:
                    return Decision(self._verdict(Outcome.TIMEOUT, match, held_s, ident, coalesced))
                waited = await self._hold(ident, target, budget)
                if waited is None:
                    return Decision(self._verdict(Outcome.UNHELD, match, held_s, ident, coalesced))
                held_s = (held_s or 0.0) + waited
                if target.state is State.WARMING:  # max_hold passed, or drain() released it
                    outcome = Outcome.UNHELD if self.draining else Outcome.TIMEOUT
                    return Decision(self._verdict(outcome, match, held_s, ident, coalesced))
                continue  # settled: match again (it may now cover more, or be ours to lead)
            if match is not None and _failed_leader(match):
                match = None  # a request that never began (its own 400, a client gone): lead afresh
            if self._coalesce and (match is None or match.position < last.position):
                kind = Kind.LEADER if ident.stream else Kind.LEADER_JSON
                lead, started = await self._registry.begin(ident.tenant, prefix, kind=kind)
                if started:
                    if match is not None and match.warm.state is State.WARM:
                        await self._use(match)
                    outcome = _SETTLED[match.warm.state] if match is not None else Outcome.MISS
                    if outcome is Outcome.HIT and held_s is not None:
                        outcome = Outcome.HELD
                    return Decision(self._verdict(outcome, match, held_s, ident, coalesced), lead=lead)
                continue  # another request led it meanwhile: follow that one
            break
        if match is None:
            return Decision(self._verdict(Outcome.MISS, None, held_s, ident, coalesced))
        state = match.warm.state
        if state is State.WARMING:  # still warming after every round (a chain of leaders): go
            return Decision(self._verdict(Outcome.UNHELD, match, held_s, ident, coalesced))
        if state is State.WARM:
            await self._use(match)
        outcome = _SETTLED[state]
        if outcome is Outcome.HIT and held_s is not None:
            outcome = Outcome.HELD
        return Decision(self._verdict(outcome, match, held_s, ident, coalesced))

    async def _hold_target(self, ident: Identity, match: Match, headers: CIMultiDict[str]) -> Warm | None:
        """What a follower of ``match`` holds on: the warm itself, or, behind a non-streaming leader,
        a ``max_tokens: 0`` warm of the shared prefix; None when no such warm can be sent."""
        warm = match.warm
        if warm.kind is not Kind.LEADER_JSON:
            return warm
        made = cut(ident.body, ident.prefix, match.position)
        body, prefix = made if made is not None else (ident.body, ident.prefix)
        try:
            helper, _ = await self._warmer.warm(ident.tenant, prefix, body, headers, kind=Kind.COALESCE, replace=True)
        except RateLimited:
            return None
        if helper.kind is Kind.LEADER_JSON and helper.state is State.WARMING:
            return None  # could not take over the leader's key: never wait out its generation
        return helper

    async def _hold(self, ident: Identity, warm: Warm, budget: float) -> float | None:
        """Hold on ``warm`` for at most ``budget`` seconds: the seconds held, or None when the hold
        limits are full (the request then goes at once)."""
        size = len(ident.raw)
        if not self.limits.try_acquire(ident.tenant, size):
            return None
        start = time.monotonic()
        self._waiting[warm] = self._waiting.get(warm, 0) + 1
        try:
            await warm.wait(budget)
        finally:
            self.limits.release(ident.tenant, size)
            left = self._waiting.pop(warm) - 1
            if left:
                self._waiting[warm] = left
        return time.monotonic() - start

    async def _use(self, match: Match) -> None:
        await self._registry.touch(match)
        for callback in self._used:
            callback(match.warm, match.entry.ttl)

    @staticmethod
    def _verdict(
        outcome: Outcome, match: Match | None, held_s: float | None, ident: Identity, coalesced: bool
    ) -> Verdict:
        return Verdict(
            outcome,
            wait_ms=int(held_s * 1000) if held_s is not None else 0,
            prefix=prefix_id(match.key) if match is not None else None,
            injected=ident.injected,
            held_s=held_s,
            coalesced=coalesced,
        )

    def drain(self) -> None:
        """Shutting down: release every held request to the upstream now, and hold no more."""
        self.draining = True
        for warm in list(self._waiting):
            warm.release_waiters()
