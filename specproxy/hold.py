"""Holding: for one ``/v1/messages`` request, decide whether to wait for a warm, wait, and say what happened.

A request is held only when its longest registered prefix is ``warming``. It waits on the warm's
event (never polling) and goes upstream the moment the warm settles, when ``max_hold`` passes, or
never, if the client disconnects first (the handler is cancelled; nothing is sent). The verdict
becomes the ``X-Cache-Warm*`` response headers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson

from specproxy.credentials import presented
from specproxy.prefix import Prefix, PrefixError, compute, has_breakpoint_marker, prefix_id, tenant_digest
from specproxy.registry import Kind, Match, Registry, State, Warm

HEADER: Final = "X-Cache-Warm"
HEADER_WAIT: Final = "X-Cache-Warm-Wait-Ms"
HEADER_PREFIX: Final = "X-Cache-Warm-Prefix"
HEADER_INJECTED: Final = "X-Cache-Warm-Injected"

# Outcomes (the X-Cache-Warm values).
HIT: Final = "hit"  # matched a warm entry; went at once
HELD: Final = "held"  # waited for an in-flight warm that then wrote the cache
TIMEOUT: Final = "timeout"  # waited max_hold; went anyway
FAILED: Final = "failed"  # the matched warm failed; went at once
UNCACHEABLE: Final = "uncacheable"  # the matched warm wrote nothing (under the minimum)
MISS: Final = "miss"  # cacheable, nothing matched
BYPASS: Final = "bypass"  # no breakpoint, not JSON, no credential, or not a Messages call
UNHELD: Final = "unheld"  # matched a warming prefix but went at once: hold limits full, or shutting down

_SETTLED_OUTCOME: Final = {State.WARM: HELD, State.UNCACHEABLE: UNCACHEABLE, State.FAILED: FAILED}
_AT_ONCE_OUTCOME: Final = {State.WARM: HIT, State.UNCACHEABLE: UNCACHEABLE, State.FAILED: FAILED}


@dataclass(slots=True)
class Verdict:
    """What happened to one request before it went upstream."""

    outcome: str
    wait_ms: int = 0
    prefix: str | None = None
    tenant: str | None = None
    body: dict[str, Any] | None = None
    parsed: Prefix | None = None
    raw: bytes | None = None  # set only when the body was changed (breakpoint injection)
    injected: bool = False
    leader: Warm | None = None  # this request leads its prefix: it settles the entry when it begins
    coalesced: bool = False  # held behind another request rather than an app's /prewarm
    held_s: float | None = None  # seconds held, when the request was held at all
    match: Match | None = None

    def headers(self) -> dict[str, str]:
        out = {HEADER: self.outcome, HEADER_WAIT: str(self.wait_ms)}
        if self.prefix:
            out[HEADER_PREFIX] = self.prefix
        if self.injected:
            out[HEADER_INJECTED] = "1"
        return out


class HoldLimits:
    """Bounds on requests held at once, in total and per tenant."""

    def __init__(self, total: int, per_tenant: int) -> None:
        self._total_max = total
        self._tenant_max = per_tenant
        self.total = 0
        self._by_tenant: dict[str, int] = {}

    def try_acquire(self, tenant: str) -> bool:
        n = self._by_tenant.get(tenant, 0)
        if self.total >= self._total_max or n >= self._tenant_max:
            return False
        self.total += 1
        self._by_tenant[tenant] = n + 1
        return True

    def release(self, tenant: str) -> None:
        self.total -= 1
        n = self._by_tenant[tenant] - 1
        if n:
            self._by_tenant[tenant] = n
        else:
            del self._by_tenant[tenant]

    def held(self, tenant: str) -> int:
        return self._by_tenant.get(tenant, 0)


class Speculation(Protocol):
    """What holding asks of the speculator (specproxy.speculate), when speculation is on."""

    async def inject(self, verdict: Verdict) -> bool: ...

    async def json_follower(self, verdict: Verdict, match: Match, headers: Any) -> Warm | None: ...

    def used(self, warm: Warm, ttl: float) -> None: ...


class Holder:
    """Routes a request: parses once, hashes once, matches, holds if a warm is in flight."""

    def __init__(
        self,
        registry: Registry,
        *,
        max_hold: float,
        limits: HoldLimits,
        volatile_prefixes: Sequence[str] = (),
        coalesce: bool = False,
        inject: bool = False,
        tenant_of: Callable[[Mapping[str, str]], str | None] | None = None,
    ) -> None:
        self._tenant_of = tenant_of  # the credential policy's tenant (injection: one shared tenant)
        self.speculation: Speculation | None = None
        self._coalesce = coalesce
        self._inject = inject
        self._registry = registry
        self._max_hold = max_hold
        self._limits = limits
        self._volatile = tuple(volatile_prefixes)
        self._waiting: dict[Warm, int] = {}
        self.draining = False

    def identify(self, headers: Mapping[str, str], raw: bytes) -> Verdict:
        """Parse and hash: a ``bypass`` verdict, or one carrying the prefix to match (outcome ``miss``)."""
        if not has_breakpoint_marker(raw) and not self._inject:
            return Verdict(BYPASS)  # cannot carry a breakpoint: not even parsed
        cred = presented(headers) if self._tenant_of is None else self._tenant_of(headers)
        if cred is None:
            return Verdict(BYPASS)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return Verdict(BYPASS)
        if not isinstance(body, dict):
            return Verdict(BYPASS)
        tenant = tenant_digest(cred) if self._tenant_of is None else cred
        try:
            parsed = compute(body, tenant, self._volatile)
        except PrefixError:
            return Verdict(BYPASS)  # the upstream will answer it with its own error
        if not parsed.breakpoints:
            return Verdict(BYPASS, tenant=tenant, body=body, parsed=parsed)
        return Verdict(MISS, tenant=tenant, body=body, parsed=parsed)

    async def route(self, headers: Mapping[str, str], raw: bytes) -> Verdict:
        """Decide, and hold when the longest match is warming. Raises CancelledError if the client leaves."""
        verdict = self.identify(headers, raw)
        if verdict.parsed is None or verdict.tenant is None:
            return verdict
        spec = self.speculation
        if verdict.outcome == BYPASS:
            # No breakpoint: only breakpoint injection can make this request read a warm.
            if not (self._inject and spec is not None and await spec.inject(verdict)):
                return verdict
            verdict.outcome = MISS
        match = await self._registry.match(verdict.parsed)
        if match is None and self._coalesce and verdict.body is not None:
            kind = Kind.LEADER if verdict.body.get("stream") is True else Kind.LEADER_JSON
            leader, started = await self._registry.begin(verdict.tenant, verdict.parsed, kind=kind)
            if started:
                verdict.leader = leader  # goes now; its response settles the entry for followers
                return verdict
            match = await self._registry.match(verdict.parsed)  # another request led meanwhile
        if match is None:
            return verdict
        verdict.match = match
        warm = match.warm
        verdict.prefix = prefix_id(match.key)
        if warm.state is not State.WARMING:
            verdict.outcome = _AT_ONCE_OUTCOME[warm.state]
            if warm.state is State.WARM:
                await self._use(match)
            return verdict
        if warm.kind is Kind.LEADER_JSON and spec is not None:
            # Holding behind a whole non-streaming generation would cost more than a second prefill.
            helper = await spec.json_follower(verdict, match, headers)
            if helper is not None:
                warm = helper
        verdict.coalesced = warm.kind in (Kind.LEADER, Kind.LEADER_JSON, Kind.COALESCE)

        tenant = verdict.tenant
        if self.draining or not self._limits.try_acquire(tenant):
            verdict.outcome = UNHELD
            return verdict
        start = time.monotonic()
        self._waiting[warm] = self._waiting.get(warm, 0) + 1
        try:
            await warm.wait(self._max_hold)
        finally:
            self._limits.release(tenant)
            left = self._waiting.pop(warm) - 1
            if left:
                self._waiting[warm] = left
            verdict.held_s = time.monotonic() - start
            verdict.wait_ms = int(verdict.held_s * 1000)
        if warm.state is State.WARMING:  # max_hold passed, or released by drain()
            verdict.outcome = UNHELD if self.draining else TIMEOUT
            return verdict
        verdict.outcome = _SETTLED_OUTCOME[warm.state]
        if warm.state is State.WARM and warm is match.warm:
            await self._use(match)
        return verdict

    async def _use(self, match: Match) -> None:
        await self._registry.touch(match)
        if self.speculation is not None:
            self.speculation.used(match.warm, match.entry.ttl)

    @property
    def held(self) -> int:
        return self._limits.total

    def drain(self) -> None:
        """Shutting down: release every held request to the upstream now, and hold no more."""
        self.draining = True
        for warm in list(self._waiting):
            warm.release_waiters()
