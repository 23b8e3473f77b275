"""Prometheus metrics (all ``specproxy_*``) and the running totals the status page shows.

Each application gets its own ``CollectorRegistry`` (several proxies can live in one test process).
No ``_created`` series: they double the series count and carry nothing a dashboard or alert uses
(``prometheus_client.disable_created_metrics()``, process-wide, on import). Tenant identity
becomes a label only when ``metrics_tenant_label`` is on, and then only as the first 16 hex
characters of the credential digest, never the credential.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from specproxy.usage import Usage

if TYPE_CHECKING:
    from specproxy.registry import Warm

disable_created_metrics()  # type: ignore[no-untyped-call]

log = logging.getLogger("specproxy.metrics")

# $ per million tokens: (base input, output). Cache multipliers come from the facts page:
# 5-minute write x1.25, 1-hour write x2, read x0.1. Overridable by the `pricing` setting.
DEFAULT_PRICING: Final[dict[str, tuple[float, float]]] = {
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-1": (15.0, 75.0),
    "claude-opus-4": (15.0, 75.0),
    "claude-sonnet-4-6": (3.0, 15.0),
    "claude-sonnet-4-5": (3.0, 15.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-3-7-sonnet": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-3-5-haiku": (0.8, 4.0),
}
FALLBACK_PRICE: Final = (3.0, 15.0)
WRITE_5M: Final = 1.25
WRITE_1H: Final = 2.0
READ: Final = 0.1

_TIME_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def price_of(model: str | None, pricing: Mapping[str, tuple[float, float]] = DEFAULT_PRICING) -> tuple[float, float]:
    """(input, output) $/MTok for a model id; dated ids (``…-20250929``) and aliases match by prefix."""
    if model:
        best = ""
        for name in pricing:
            if model.startswith(name) and len(name) > len(best):
                best = name
        if best:
            return pricing[best]
    return FALLBACK_PRICE


def cost(
    usage: Usage, model: str | None, pricing: Mapping[str, tuple[float, float]] = DEFAULT_PRICING,
    price: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """(dollars spent, dollars the same call would have cost with no caching at all)."""
    p_in, p_out = price if price is not None else price_of(model, pricing)
    spent = (
        usage.input * p_in
        + usage.cache_write_5m * p_in * WRITE_5M
        + usage.cache_write_1h * p_in * WRITE_1H
        + usage.cache_read * p_in * READ
        + usage.output * p_out
    ) / 1e6
    uncached = ((usage.input + usage.cache_write_5m + usage.cache_write_1h + usage.cache_read) * p_in
                + usage.output * p_out) / 1e6
    return spent, uncached


@dataclass
class Totals:
    """Plain running totals for the status page (Prometheus is for scraping, this is for people)."""

    outcomes: Tally[str] = field(default_factory=Tally)
    tokens: Tally[str] = field(default_factory=Tally)
    warms: Tally[str] = field(default_factory=Tally)
    dollars_spent: float = 0.0
    dollars_saved: float = 0.0
    mismatches: int = 0
    wasted: int = 0


class Metrics:
    """Every metric of one proxy, in its own registry."""

    def __init__(self, *, tenant_label: bool = False, pricing: Mapping[str, tuple[float, float]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tenant_label = tenant_label
        self.pricing = dict(pricing or DEFAULT_PRICING)
        self._prices: dict[str, tuple[float, float]] = {}  # memo: model id -> price_of(model)
        self.totals = Totals()
        t = ("tenant",) if tenant_label else ()
        r = self.registry
        self.requests = Counter("specproxy_requests", "Requests served, by path, status and X-Cache-Warm outcome",
                                ("path", "status", "outcome", *t), registry=r)
        self.warms = Counter("specproxy_warms", "Warms settled, by result and max_tokens mode",
                             ("result", "mode", *t), registry=r)
        self.held = Gauge("specproxy_held_requests", "Requests held right now", registry=r)
        self.hold_seconds = Histogram("specproxy_hold_seconds", "Time requests were held", buckets=_TIME_BUCKETS,
                                      registry=r)
        self.upstream_ttfb = Histogram("specproxy_upstream_ttfb_seconds", "Upstream time to response headers",
                                       ("path",), buckets=_TIME_BUCKETS, registry=r)
        self.upstream_total = Histogram("specproxy_upstream_seconds", "Upstream time to the last byte",
                                        ("path",), buckets=_TIME_BUCKETS, registry=r)
        self.tokens = Counter("specproxy_tokens", "Tokens by kind and model, from response usage",
                              ("kind", "model", *t), registry=r)
        self.wasted = Counter("specproxy_warms_wasted", "Warms that expired without a single use", registry=r)
        self.wasted_dollars = Counter("specproxy_warms_wasted_dollars",
                                      "Estimated dollars spent on warms that expired without a single use",
                                      registry=r)
        self.mismatch = Counter("specproxy_warm_mismatch",
                                "Requests the proxy called hit/held whose usage shows no cache read", registry=r)
        self.dollars_spent = Counter("specproxy_dollars_spent", "Estimated dollars spent (pricing table)", registry=r)
        self.dollars_saved = Counter("specproxy_dollars_saved",
                                     "Estimated dollars saved versus no caching, by the responses that saved "
                                     "(cache writes' extra cost is netted in specproxy_dollars_saved_net)",
                                     registry=r)
        self.dollars_saved_net = Gauge("specproxy_dollars_saved_net", "Net estimated dollars saved (may be < 0)",
                                       registry=r)
        self.registry_entries = Gauge("specproxy_registry_entries", "Live warm registry entries", registry=r)
        self.degraded = Gauge("specproxy_registry_degraded", "1 when the shared registry is unreachable", registry=r)
        self.coalesced = Counter("specproxy_coalesced", "Requests held behind an in-flight request", registry=r)
        self.next_turn = Counter("specproxy_next_turn_warms", "Next-turn warms, by whether a later turn used them",
                                 ("result",), registry=r)
        self.keep_warm = Counter("specproxy_keep_warm_refreshes", "Keep-warm re-warms, by what the usage showed",
                                 ("result",), registry=r)
        self.injected = Counter("specproxy_breakpoints_injected", "Requests that got a breakpoint inserted",
                                registry=r)

    def _t(self, tenant: str | None) -> tuple[str, ...]:
        return ((tenant or "")[:16],) if self.tenant_label else ()

    def request(self, path: str, status: int, outcome: str, tenant: str | None = None) -> None:
        self.requests.labels(path, str(status), outcome, *self._t(tenant)).inc()
        if outcome != "none":  # the status page counts outcomes of Messages calls and prewarms only
            self.totals.outcomes[outcome] += 1

    def warm_settled(self, result: str, mode: str, tenant: str | None = None) -> None:
        self.warms.labels(result, mode, *self._t(tenant)).inc()
        self.totals.warms[result] += 1

    def warm_wasted(self, warm: Warm | None = None) -> None:
        """A warm expired unread; with ``warm``, what it cost is added to the wasted dollars."""
        self.wasted.inc()
        self.totals.wasted += 1
        if warm is not None and isinstance(warm.usage, dict):
            self.wasted_dollars.inc(cost(Usage.from_api(warm.usage), warm.model, self.pricing)[0])

    def usage(self, usage: Usage, model: str | None, tenant: str | None = None) -> None:
        """Count a response's tokens and its estimated dollars."""
        m = model or "unknown"
        for kind, n in usage.as_dict().items():
            if n:
                self.tokens.labels(kind, m, *self._t(tenant)).inc(n)
                self.totals.tokens[kind] += n
        price = self._prices.get(m)
        if price is None:
            if len(self._prices) >= 256:  # model ids come from upstream answers: keep the memo bounded
                self._prices.clear()
            price = self._prices[m] = price_of(model, self.pricing)
        spent, uncached = cost(usage, model, price=price)
        self.dollars_spent.inc(spent)
        saved = uncached - spent
        if saved > 0:
            self.dollars_saved.inc(saved)
        self.totals.dollars_spent += spent
        self.totals.dollars_saved += saved
        self.dollars_saved_net.set(self.totals.dollars_saved)

    def warm_mismatch(self) -> None:
        self.mismatch.inc()
        self.totals.mismatches += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def summary(self) -> dict[str, Any]:
        t = self.totals
        return {
            "outcomes": dict(t.outcomes),
            "tokens": dict(t.tokens),
            "warms": dict(t.warms),
            "warms_wasted": t.wasted,
            "warm_mismatches": t.mismatches,
            "dollars_spent": round(t.dollars_spent, 6),
            "dollars_saved": round(t.dollars_saved, 6),
        }
