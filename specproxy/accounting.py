"""Accounting: what each relayed request and each settled warm cost, saved or wasted.

Two subscribers of the request path, and nothing else: :meth:`Accounting.relayed` is the
pipeline's last stage for every ``/v1/messages`` call; :meth:`Accounting.warm_settled` listens to
the warmer. Usage is converted once (by the tap or the warmer) and read here only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from specproxy.forward import Relayed
from specproxy.metrics import Metrics
from specproxy.outcome import Outcome, Verdict
from specproxy.registry import Kind, State, Warm
from specproxy.usage import Usage
from specproxy.warmer import WarmResult

log = logging.getLogger("specproxy.accounting")


class Accounting:
    """Metrics and log fields per request; settled, wasted and next-turn counts per warm."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._timers: set[asyncio.TimerHandle] = set()

    def relayed(self, verdict: Verdict, relayed: Relayed, fields: dict[str, Any], tenant: str | None) -> None:
        """One relayed Messages call: timings, tokens, dollars; flags a hit that read nothing."""
        metrics = self._metrics
        if verdict.held_s is not None:
            metrics.hold_seconds.observe(verdict.held_s)
            if verdict.coalesced and verdict.outcome is Outcome.HELD:
                metrics.coalesced.inc()
        metrics.upstream_ttfb.labels("/v1/messages").observe(relayed.ttfb)
        metrics.upstream_total.labels("/v1/messages").observe(relayed.total)
        fields.update(upstream_request_id=relayed.request_id, upstream_ttfb_ms=round(relayed.ttfb * 1000, 2),
                      upstream_ms=round(relayed.total * 1000, 2))
        if relayed.broken:
            fields["broken"] = True
        usage = relayed.usage
        if usage is None:
            return
        fields.update(model=relayed.model, usage=usage.as_dict())
        metrics.usage(usage, relayed.model, tenant)
        if verdict.outcome in (Outcome.HIT, Outcome.HELD) and usage.cache_read == 0:
            metrics.warm_mismatch()
            fields["mismatch"] = True
            log.warning(
                "prefix %s was %s but the response read no cache: the prompt may be under the model's minimum, "
                "or differ from the warm before its breakpoint",
                verdict.prefix, verdict.outcome,
            )

    def warm_settled(self, warm: Warm, result: WarmResult) -> None:
        """A warm settled: count it and its tokens; once its TTL has run out, count it wasted if unused."""
        metrics = self._metrics
        metrics.warm_settled(str(result.state), result.mode, warm.tenant)
        tokens = result.tokens or (Usage.from_api(result.usage) if result.usage else None)
        if tokens is not None:
            metrics.usage(tokens, warm.model, warm.tenant)
        if result.state is not State.WARM:
            return

        def check() -> None:
            self._timers.discard(handle)
            if warm.uses == 0:
                metrics.warm_wasted(warm)
                if warm.kind is Kind.NEXT_TURN:
                    metrics.next_turn.labels("unused").inc()

        delay = max(0.0, warm.started_at + warm.ttl - time.monotonic())
        handle = asyncio.get_running_loop().call_later(delay, check)
        self._timers.add(handle)

    def close(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
