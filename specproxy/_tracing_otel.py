"""The OpenTelemetry implementation of :mod:`specproxy.tracing` (imported only with ``otel_enabled``).

Spans (attribute names: the OpenTelemetry HTTP and GenAI semantic conventions, plus ``specproxy.*``):

- ``{METHOD} {route}``, SERVER, one per request (``/healthz``, ``/metrics``, ``/status*`` and
  ``/openapi.json`` are not traced), child of the client's ``traceparent`` when it sent one;
- ``specproxy.hold``, INTERNAL, child of its request, when the request was held; linked to the warm
  (or leading request) that released it;
- ``chat {model}``, CLIENT, child of its request: the upstream call, with the GenAI usage; its
  context is the ``traceparent`` the upstream receives;
- ``warm {model}``, CLIENT, the root of its own trace: a warm the proxy sent, from its start to its
  settle; linked to the request that started it and to every request it released.

The upstream span opens when the request path asks for the headers to send (``inject``) and ends
when it reports the outcome (``finish``), or with the request if the call failed. A warm's span is
made when the warm settles (the warmer's ``subscribe``); the requests it releases resume after
that. So the span stays open, its end time already fixed, until every request that was deciding
at that moment has decided, and each one it released adds a link on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from specproxy import __version__
from specproxy.config import Settings
from specproxy.forward import Relayed
from specproxy.identity import Identity
from specproxy.keys import Handler
from specproxy.outcome import Outcome, Verdict
from specproxy.prefix import prefix_id
from specproxy.registry import State, Warm
from specproxy.tracing import TRACE, service_name, traces_endpoint
from specproxy.usage import Usage
from specproxy.warmer import WarmResult

UNTRACED: Final = frozenset({"/healthz", "/metrics", "/status", "/status.json", "/openapi.json"})
PROVIDER: Final = "anthropic"
_NOT_RELEASED: Final = frozenset({Outcome.TIMEOUT, Outcome.UNHELD})  # held, but no settle let it go
_RECENT: Final = 1024  # settled warms remembered for a request that resumes after their span ended
_MISMATCH_OUTCOMES: Final = frozenset({Outcome.HIT, Outcome.HELD})
_PROPAGATOR: Final = TraceContextTextMapPropagator()


def _route(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else ""
    return None if canonical in ("", "/{tail}") else canonical


def _usage_attributes(usage: Usage) -> dict[str, int]:
    """GenAI usage: ``input_tokens`` includes the cached and cache-written tokens (the convention
    says it SHOULD); Anthropic's own ``input_tokens`` is only the part after the last breakpoint."""
    return {
        "gen_ai.usage.input_tokens": usage.input + usage.cache_read + usage.cache_written,
        "gen_ai.usage.output_tokens": usage.output,
        "gen_ai.usage.cache_read.input_tokens": usage.cache_read,
        "gen_ai.usage.cache_creation.input_tokens": usage.cache_written,
    }


def _ids(warm: Warm) -> frozenset[str]:
    return frozenset({warm.prefix, *(prefix_id(k) for k in warm.keys)})


@dataclass(eq=False, slots=True)
class _Releaser:
    """A settled warm's span waiting for the requests that were deciding when it settled."""

    span: Span
    ids: frozenset[str]
    end_ns: int | None  # None: a leading request's upstream span, ended by that request
    waiting: set[_Hold] = field(default_factory=set)


class OtelTracing:
    """Spans for one proxy app: a middleware, the request handles, and a warmer subscriber."""

    def __init__(self, provider: TracerProvider, upstream: str) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("specproxy", __version__)
        parts = urlsplit(upstream)
        self.server: dict[str, str | int] = {"server.address": parts.hostname or "", "server.port": parts.port or
                        (443 if parts.scheme == "https" else 80)}
        self.deciding: set[_Hold] = set()
        self.pending: list[_Releaser] = []
        self.recent: OrderedDict[str, SpanContext] = OrderedDict()

    @classmethod
    def create(cls, settings: Settings, *, exporter: SpanExporter | None, env: Mapping[str, str]) -> OtelTracing:
        resource = Resource.create({"service.name": service_name(settings, env), "service.version": __version__})
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = traces_endpoint(settings.otel_endpoint) if settings.otel_endpoint else None
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        return cls(provider, settings.upstream)

    # --- the request span ---------------------------------------------------------------------------
    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = _route(request)
        if route in UNTRACED:
            return await handler(request)
        attributes: dict[str, Any] = {"http.request.method": request.method, "url.path": request.path,
                                      "url.scheme": request.scheme}
        if route is not None:
            attributes["http.route"] = route
        parent = _PROPAGATOR.extract(request.headers)
        span = self.tracer.start_span(f"{request.method} {route or 'passthrough'}", context=parent,
                                      kind=SpanKind.SERVER, attributes=attributes)
        handle = _Request(self, span)
        request[TRACE] = handle
        token = otel_context.attach(trace.set_span_in_context(span))
        status = 499  # the client went away first
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            status = 500
            span.record_exception(exc)
            raise
        finally:
            otel_context.detach(token)
            handle.end(status)

    # --- warms ----------------------------------------------------------------------------------------
    def warm_settled(self, warm: Warm, result: WarmResult) -> None:
        """Warmer subscriber: the warm's span, from its start to now, in a trace of its own."""
        now_ns = time.time_ns()
        start_ns = now_ns - int(max(0.0, time.monotonic() - warm.started_at) * 1e9)
        links = []
        started_by = trace.get_current_span().get_span_context()  # the warm task's context: its request
        if started_by.is_valid:
            links.append(Link(started_by, {"specproxy.link": "started_by"}))
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": PROVIDER,
            **self.server,
            "specproxy.prefix": warm.prefix,
            "specproxy.warm.kind": str(warm.kind),
            "specproxy.warm.state": str(result.state),
            "specproxy.warm.mode": result.mode,
            "specproxy.warm.breakpoints": warm.breakpoints,
        }
        if warm.model:
            attributes["gen_ai.request.model"] = warm.model
        tokens = result.tokens or (Usage.from_api(result.usage) if result.usage else None)
        if tokens is not None:
            attributes.update(_usage_attributes(tokens))
        span = self.tracer.start_span(f"warm {warm.model}" if warm.model else "warm",
                                      context=otel_context.Context(), kind=SpanKind.CLIENT,
                                      attributes=attributes, links=links, start_time=start_ns)
        if result.state is State.FAILED:
            span.set_attribute("error.type", result.error or "failed")
            span.set_status(Status(StatusCode.ERROR))
        self._remember(_ids(warm), span.get_span_context())
        releaser = _Releaser(span, _ids(warm), now_ns, set(self.deciding))
        if releaser.waiting:
            self.pending.append(releaser)
        else:
            span.end(end_time=now_ns)

    def _remember(self, ids: frozenset[str], ctx: SpanContext) -> None:
        for i in ids:
            self.recent[i] = ctx
            self.recent.move_to_end(i)
        while len(self.recent) > _RECENT:
            self.recent.popitem(last=False)

    def decided(self, hold: _Hold, request_ctx: SpanContext, released: str | None) -> list[Link]:
        """``hold`` has left the decision (``released``: the prefix id it was released on, if any):
        link it both ways to what released it, and end the warm spans nobody else is waiting for."""
        links: list[Link] = []
        for releaser in list(self.pending) if self.pending else ():
            releaser.waiting.discard(hold)
            if released is not None and released in releaser.ids:
                releaser.span.add_link(request_ctx, {"specproxy.link": "released"})
                links.append(Link(releaser.span.get_span_context(), {"specproxy.link": "released_by"}))
            if not releaser.waiting and releaser.end_ns is not None:
                self.pending.remove(releaser)
                releaser.span.end(end_time=releaser.end_ns)
        if released is not None and not links and released in self.recent:
            links.append(Link(self.recent[released], {"specproxy.link": "released_by"}))
        return links

    def lead(self, warm: Warm, span: Span) -> _Releaser:
        """A request leads ``warm``: its upstream span releases the followers (linked while open)."""
        releaser = _Releaser(span, _ids(warm), None)
        self.pending.append(releaser)
        self._remember(releaser.ids, span.get_span_context())
        return releaser

    def unlead(self, releaser: _Releaser) -> None:
        """The leading request's upstream call is over: end its span now, or, while requests it may
        have released are still deciding, once they have (its end time fixed now)."""
        releaser.end_ns = time.time_ns()
        releaser.waiting = set(self.deciding)
        if not releaser.waiting:
            with contextlib.suppress(ValueError):
                self.pending.remove(releaser)
            releaser.span.end(end_time=releaser.end_ns)

    async def close(self) -> None:
        for releaser in self.pending:
            if releaser.end_ns is not None:
                releaser.span.end(end_time=releaser.end_ns)
        self.pending.clear()
        # Flushing may wait on the collector: off the event loop.
        await asyncio.get_running_loop().run_in_executor(None, self.provider.shutdown)


class _Hold:
    """The coalescing decision of one request; a ``specproxy.hold`` span when it was held."""

    __slots__ = ("_request", "_start", "verdict")

    def __init__(self, request: _Request) -> None:
        self._request = request
        self._start = 0
        self.verdict: Verdict | None = None

    def __enter__(self) -> _Hold:
        self._start = time.time_ns()
        self._request.tracing.deciding.add(self)
        return self

    def decided(self, verdict: Verdict) -> None:
        self.verdict = verdict

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        tracing = self._request.tracing
        tracing.deciding.discard(self)
        v = self.verdict
        released = v.prefix if v is not None and v.held_s is not None and v.outcome not in _NOT_RELEASED else None
        parent = self._request.span
        links = tracing.decided(self, parent.get_span_context(), released)
        if v is not None and v.held_s is None:
            return  # went at once: no hold to show
        attributes: dict[str, Any] = {}
        if v is not None:
            attributes = {"specproxy.cache_warm": str(v.outcome), "specproxy.wait_ms": v.wait_ms,
                          "specproxy.coalesced": v.coalesced}
            if v.prefix:
                attributes["specproxy.prefix"] = v.prefix
        else:
            attributes["specproxy.cache_warm"] = "abandoned"  # the client left while this was deciding
        span = tracing.tracer.start_span("specproxy.hold", context=trace.set_span_in_context(parent),
                                         kind=SpanKind.INTERNAL, attributes=attributes, links=links,
                                         start_time=self._start)
        if v is None and kind is not None and not issubclass(kind, asyncio.CancelledError):
            span.set_status(Status(StatusCode.ERROR))
        span.end()


class _Request:
    """One request's handle: its SERVER span and, once started, its upstream CLIENT span."""

    __slots__ = ("_leading", "_upstream", "span", "tracing")

    def __init__(self, tracing: OtelTracing, span: Span) -> None:
        self.tracing = tracing
        self.span = span
        self._upstream: Span | None = None
        self._leading: _Releaser | None = None

    def hold(self) -> _Hold:
        return _Hold(self)

    def inject(self, headers: CIMultiDict[str], lead: Warm | None = None) -> CIMultiDict[str]:
        """Open the upstream span; a copy of ``headers`` whose ``traceparent`` is that span's (the
        client's own is replaced: the upstream call is a child of this proxy's request)."""
        tracing = self.tracing
        span = self._upstream
        if span is None:
            span = self._upstream = tracing.tracer.start_span(
                "chat", context=trace.set_span_in_context(self.span), kind=SpanKind.CLIENT,
                attributes={"gen_ai.operation.name": "chat", "gen_ai.provider.name": PROVIDER, **tracing.server},
            )
            if lead is not None:
                self._leading = tracing.lead(lead, span)
        out = CIMultiDict(headers)
        out.popall("traceparent", None)
        out.popall("tracestate", None)
        _PROPAGATOR.inject(out, context=trace.set_span_in_context(span))
        return out

    def finish(self, verdict: Verdict, relayed: Relayed | None, ident: Identity | None) -> None:
        span = self.span
        span.set_attribute("specproxy.cache_warm", str(verdict.outcome))
        span.set_attribute("specproxy.wait_ms", verdict.wait_ms)
        if verdict.prefix:
            span.set_attribute("specproxy.prefix", verdict.prefix)
        if verdict.injected:
            span.set_attribute("specproxy.injected", True)
        up = self._upstream
        if up is None or relayed is None:
            return
        model = ident.body.get("model") if ident is not None else None
        if isinstance(model, str):
            up.set_attribute("gen_ai.request.model", model)
            up.update_name(f"chat {model}")
        if relayed.model:
            up.set_attribute("gen_ai.response.model", relayed.model)
        up.set_attribute("http.response.status_code", relayed.status)
        up.set_attribute("specproxy.cache_warm", str(verdict.outcome))
        if relayed.request_id:
            up.set_attribute("specproxy.upstream.request_id", relayed.request_id)
        if relayed.usage is not None:
            up.set_attributes(_usage_attributes(relayed.usage))
            if verdict.outcome in _MISMATCH_OUTCOMES and relayed.usage.cache_read == 0:
                span.set_attribute("specproxy.mismatch", True)
        if relayed.status >= 400 or relayed.broken:
            up.set_attribute("error.type", "stream_broken" if relayed.broken else str(relayed.status))
            up.set_status(Status(StatusCode.ERROR))
        self._end_upstream()

    def _end_upstream(self) -> None:
        if self._upstream is not None:
            if self._leading is not None:
                self.tracing.unlead(self._leading)  # ends the span, maybe once its followers decided
                self._leading = None
            else:
                self._upstream.end()
            self._upstream = None

    def end(self, status: int) -> None:
        """The middleware's last word: the status sent, and every span of this request ended."""
        up = self._upstream
        if up is not None:  # finish() never came: the upstream call failed (502/504) or was cut off
            up.set_attribute("error.type", str(status) if status != 499 else "client_closed")
            up.set_status(Status(StatusCode.ERROR))
            self._end_upstream()
        span = self.span
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))
        span.end()
