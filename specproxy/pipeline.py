"""``POST /v1/messages``, top to bottom: identify, plan, hold, forward, settle, after.

    client ─► identify ─► inject? ─► decide (coalesce.py) ─► forward ─► settle lead ─► account ─► after
               identity.py  speculate.py   match / follow / lead   forward.py   registry   accounting.py  speculate.py

1. **identify** (:func:`specproxy.identity.identify`): parse and hash once; what cannot be
   identified goes upstream untouched as ``bypass``.
2. **inject** (a speculation hook, off by default): add a breakpoint where a warm matches.
3. **decide** (:class:`specproxy.coalesce.Coalescer`): hold on an in-flight warm, lead, or go; the
   frozen :class:`~specproxy.outcome.Verdict` it returns is the ``X-Cache-Warm*`` headers.
4. **forward** (:class:`specproxy.forward.Forwarder`): the client's bytes (or the injected body),
   the upstream headers built once here and shared with speculation.
5. **settle**: a leader settles its entry right after its response has begun for the client
   (``warm`` when the usage shows a cache write or read), ``failed`` if it never began.
6. **account** (:class:`specproxy.accounting.Accounting`) and **after** (next-turn and keep-warm
   hooks of :class:`specproxy.speculate.Speculator`).

Each stage takes and returns plain values; no stage reaches back into an earlier one.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from specproxy import tracing
from specproxy.accounting import Accounting
from specproxy.coalesce import Coalescer, Decision
from specproxy.config import Settings
from specproxy.credentials import Credentials
from specproxy.errors import SpecproxyError
from specproxy.forward import Forwarder, upstream_request_headers
from specproxy.identity import Identity, identify
from specproxy.keys import LOG
from specproxy.outcome import BYPASS_VERDICT, CONTROL_HEADERS
from specproxy.registry import Registry, State, Warm
from specproxy.speculate import Speculator
from specproxy.upstream_profile import ANTHROPIC, UpstreamProfile, match_positions
from specproxy.usage import Usage


@dataclass(slots=True)
class Pipeline:
    """Everything the request path uses, wired once by the app factory."""

    settings: Settings
    credentials: Credentials
    registry: Registry
    coalescer: Coalescer
    forwarder: Forwarder
    speculator: Speculator
    accounting: Accounting
    profile: UpstreamProfile = ANTHROPIC  # what serves the upstream (specproxy.upstream_profile)

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.credentials.check(request.headers)
        raw = await request.read()
        fields = request[LOG]
        headers = upstream_headers_of(self.credentials, request)
        trace = tracing.of(request)  # spans, when otel_enabled (a no-op otherwise)

        # 1-2. identify, then the injection hook.
        inject = self.settings.inject_breakpoints
        engine = self.profile.engine  # automatic prefix caching: every request, every block position
        ident = identify(request.headers, raw, volatile=self.settings.volatile_system_prefixes,
                         need_marker=not (inject or engine), credentials=self.credentials)
        if ident is not None and engine:
            ident = dataclasses.replace(ident, prefix=match_positions(ident.prefix))
        if ident is not None and inject and not ident.cacheable:
            ident = await self.speculator.inject(ident)
        if ident is not None:
            fields["tenant"] = ident.tenant

        # 3. decide: hold, lead or go.
        decision = Decision(BYPASS_VERDICT)
        if ident is not None and ident.cacheable:
            try:
                with trace.hold() as hold:
                    decision = await self.coalescer.decide(ident, headers)
                    hold.decided(decision.verdict)
            except asyncio.CancelledError:
                fields["outcome"] = "abandoned"  # the client left while held: nothing went upstream
                raise
        verdict, lead = decision.verdict, decision.lead
        fields.update(outcome=str(verdict.outcome), wait_ms=verdict.wait_ms, prefix=verdict.prefix)

        # 4-5. forward; a leader settles once its response has begun.
        next_turn = ident is not None and self.speculator.wants_next_turn(request.headers)
        try:
            relayed = await self.forwarder.forward(
                request,
                ident.raw if ident is not None else raw,
                upstream_headers=trace.inject(headers, lead),  # opens the upstream span
                extra_headers=verdict.headers(),
                tap_usage=True,
                collect_content=next_turn,
                on_started=self._settler(lead, ident) if lead is not None else None,
            )
        except SpecproxyError as exc:
            response = exc.to_response()
            response.headers.update(verdict.headers())
            return response
        finally:
            if lead is not None and not lead.settled:
                await self.registry.settle(lead, State.FAILED, error="leader request failed")

        # 6. account, then the after-hooks (the parsed body is released when this returns).
        if relayed.usage is not None:
            self.profile.normalise(relayed.usage)  # engines: input_tokens may include the cache read
        self.accounting.relayed(verdict, relayed, fields, ident.tenant if ident is not None else None)
        trace.finish(verdict, relayed, ident)
        if ident is not None and (next_turn or lead is not None):
            await self.speculator.after(ident, verdict, lead, relayed, headers, next_turn=next_turn)
        assert relayed.response is not None
        return relayed.response

    def _settler(self, lead: Warm, ident: Identity | None) -> Callable[[Usage | None], Awaitable[None]]:
        registry = self.registry
        model = ident.body.get("model") if ident is not None else None
        engine = self.profile.engine

        async def started(usage: Usage | None) -> None:
            # This request led its prefix and its response has begun: the cache entry exists now.
            lead.model = model if isinstance(model, str) else None
            # An engine has no creation counter: its response began, so the prefix is in its cache.
            wrote = engine or bool(usage and (usage.cache_read or usage.cache_written))
            state = State.WARM if wrote else State.UNCACHEABLE
            await registry.settle(lead, state)

        return started


def upstream_headers_of(credentials: Credentials, request: web.Request) -> CIMultiDict[str]:
    """The headers a request sends upstream: hop-by-hop and the proxy's control headers removed,
    the credential swapped in injection mode."""
    return credentials.to_upstream(upstream_request_headers(request.headers, drop=CONTROL_HEADERS))
