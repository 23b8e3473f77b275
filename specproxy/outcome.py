"""What happened to one ``/v1/messages`` request before it went upstream: the ``X-Cache-Warm*`` contract.

An :class:`Outcome` is decided once, by :mod:`specproxy.coalesce`, and carried in a frozen
:class:`Verdict`; nothing changes it afterwards. The verdict becomes the response headers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

HEADER: Final = "X-Cache-Warm"
HEADER_WAIT: Final = "X-Cache-Warm-Wait-Ms"
HEADER_PREFIX: Final = "X-Cache-Warm-Prefix"
HEADER_INJECTED: Final = "X-Cache-Warm-Injected"
NEXT_TURN_HEADER: Final = "X-Cache-Warm-Next"
# Request headers that steer the proxy and never reach the upstream.
CONTROL_HEADERS: Final = frozenset({NEXT_TURN_HEADER.lower()})


class Outcome(enum.StrEnum):
    """The ``X-Cache-Warm`` values."""

    HIT = "hit"  # matched a warm entry; went at once
    HELD = "held"  # waited for an in-flight warm that then wrote the cache
    TIMEOUT = "timeout"  # waited max_hold; went anyway
    FAILED = "failed"  # the matched warm failed; went at once
    UNCACHEABLE = "uncacheable"  # the matched warm wrote nothing (under the minimum)
    MISS = "miss"  # cacheable, nothing matched
    BYPASS = "bypass"  # no breakpoint, not JSON, no credential, or not a Messages call
    UNHELD = "unheld"  # matched a warming prefix but went at once: limits full, no helper warm, shutting down


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for one request: its outcome, how long it was held, and what it matched."""

    outcome: Outcome
    wait_ms: int = 0
    prefix: str | None = None
    injected: bool = False
    held_s: float | None = None  # seconds held, when the request was held at all
    coalesced: bool = False  # held behind another request rather than an app's /prewarm

    def headers(self) -> dict[str, str]:
        out = {HEADER: str(self.outcome), HEADER_WAIT: str(self.wait_ms)}
        if self.prefix:
            out[HEADER_PREFIX] = self.prefix
        if self.injected:
            out[HEADER_INJECTED] = "1"
        return out


BYPASS_VERDICT: Final = Verdict(Outcome.BYPASS)
