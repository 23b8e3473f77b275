"""OpenTelemetry traces of the request path: off by default, and free when off.

The request path calls a small API and never imports OpenTelemetry itself::

    trace = tracing.of(request)             # this request's handle (a no-op when tracing is off)
    with trace.hold() as hold:              # around the coalescing decision
        decision = await coalescer.decide(ident, headers)
        hold.decided(decision.verdict)
    relayed = await forwarder.forward(..., upstream_headers=trace.inject(headers, lead))
    trace.finish(verdict, relayed, ident)   # outcome, usage, status: ends the upstream span

With ``otel_enabled`` (:func:`setup`) the app adds a middleware that opens one SERVER span per
request (continuing the client's ``traceparent``), and subscribes to the warmer: each warm it sent
becomes a span of its own trace, linked to the request that started it and to the requests it
released. The implementation, which needs the ``otel`` extra, is in
:mod:`specproxy._tracing_otel`; what each span carries is in docs/observability.md. No span
attribute ever holds prompt text, a body, a header value or a credential: only ids, states,
counts, durations, the model name and the upstream's request id.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from aiohttp import web
from multidict import CIMultiDict

from specproxy.config import ConfigError, Settings

if TYPE_CHECKING:
    from specproxy._tracing_otel import OtelTracing as OtelTracing
    from specproxy.forward import Relayed
    from specproxy.identity import Identity
    from specproxy.outcome import Verdict
    from specproxy.registry import Warm

INSTALL_HINT: Final = "otel_enabled needs the OpenTelemetry SDK: pip install 'specproxy[otel]'"


class HoldTrace(Protocol):
    def decided(self, verdict: Verdict) -> None:
        """The coalescing decision for this request (call it inside ``hold()``)."""


class RequestTrace(Protocol):
    """One request's spans, as the request path sees them."""

    def hold(self) -> Any:
        """A context manager around the coalescing decision; yields a :class:`HoldTrace`."""

    def inject(self, headers: CIMultiDict[str], lead: Warm | None = None) -> CIMultiDict[str]:
        """Open the upstream span (``lead``: the warm this request leads, whose followers it will
        release) and return the headers to send with its ``traceparent``; the same object when off."""

    def finish(self, verdict: Verdict, relayed: Relayed | None, ident: Identity | None) -> None:
        """The request's outcome, usage and upstream status (call it after the upstream call)."""


class _Noop:
    """Tracing off: every call returns at once, nothing is allocated per request."""

    __slots__ = ()

    def hold(self) -> _Noop:
        return self

    def __enter__(self) -> _Noop:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def decided(self, verdict: Verdict) -> None:
        return None

    def inject(self, headers: CIMultiDict[str], lead: Warm | None = None) -> CIMultiDict[str]:
        return headers

    def finish(self, verdict: Verdict, relayed: Relayed | None, ident: Identity | None) -> None:
        return None


NOOP: Final = _Noop()
TRACE: Final = web.RequestKey("specproxy_trace", object)  # set by the tracing middleware
ENABLED: Final = web.AppKey("specproxy_tracing_enabled", bool)  # set by the app factory


def of(request: web.Request) -> RequestTrace:
    """This request's trace handle: the no-op one unless the tracing middleware opened a span.
    (Off, this is one dict lookup: the app says so, and the request is not searched.)"""
    try:
        if not request.app[ENABLED]:
            return NOOP
        return cast(RequestTrace, request[TRACE])
    except KeyError:  # an app not built by create_app, or an untraced path
        return NOOP


def traces_endpoint(base: str) -> str:
    """``http://collector:4318`` → ``http://collector:4318/v1/traces`` (a full traces URL stays)."""
    base = base.rstrip("/")
    return base if base.endswith("/v1/traces") else base + "/v1/traces"


def service_name(settings: Settings, env: Mapping[str, str]) -> str:
    return settings.otel_service_name or env.get("OTEL_SERVICE_NAME") or "specproxy"


def setup(settings: Settings, *, exporter: Any = None, env: Mapping[str, str] | None = None) -> OtelTracing | None:
    """The app's tracing, or None when it is off (``otel_enabled`` false, or ``OTEL_SDK_DISABLED=true``).

    ``exporter`` (a span exporter, e.g. the SDK's in-memory one) replaces the OTLP/HTTP exporter and
    exports each span as it ends; otherwise spans are batched to ``otel_endpoint`` (or the SDK's
    ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``). Raises :class:`ConfigError` when the SDK is missing.
    """
    env = os.environ if env is None else env
    if not settings.otel_enabled or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    try:
        from specproxy._tracing_otel import OtelTracing
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc.name} is missing)") from None
    return OtelTracing.create(settings, exporter=exporter, env=env)
