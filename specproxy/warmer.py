"""Sends warms upstream in the background and settles their registry entries.

A warm is Anthropic's documented pre-warm: the prefix with ``max_tokens: 0``, non-streaming; the
upstream runs prefill and answers at once with empty content and the usage that says whether a
cache entry was written. Where ``max_tokens: 0`` is refused (thinking enabled, ``tool_choice``
any/tool, ``output_config.format``, or an upstream that answers it with a 400) it falls back to
``max_tokens: 1`` streamed, and settles on ``message_start``, closing the connection right after.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict

from specproxy.bodies import warm_request
from specproxy.credentials import PerCredential
from specproxy.errors import RateLimited
from specproxy.prefix import Prefix
from specproxy.registry import Kind, Registry, State, Warm
from specproxy.sse import SSEReader
from specproxy.upstream_profile import ANTHROPIC, UpstreamProfile
from specproxy.upstream_profile import refuses_max_tokens_0 as _refuses_max_tokens_0
from specproxy.usage import Usage

log = logging.getLogger("specproxy.warmer")

_WARM_HEADER_DROP = frozenset({"content-type", "accept-encoding", "accept"})


@dataclass(frozen=True, slots=True)
class WarmResult:
    """What one warm found: its state, the ``max_tokens`` it was sent with, and its usage."""

    state: State
    mode: str
    usage: dict[str, Any] | None = None  # as the upstream sent it (shared with other replicas)
    error: str | None = None
    tokens: Usage | None = None  # ``usage`` converted, once
    refused_max_tokens_0: bool = False

    @classmethod
    def of(cls, mode: str, usage: Any, profile: UpstreamProfile = ANTHROPIC) -> WarmResult:
        """A successful warm's result from the usage it reported (read as ``profile`` says: an
        engine has no creation counter, so its completed warm is ``warm``)."""
        if not isinstance(usage, dict):
            return cls(State.WARM if profile.engine else State.UNCACHEABLE, mode)
        tokens = profile.usage(usage)
        state = State.WARM if profile.warm_wrote_cache(usage) else State.UNCACHEABLE
        return cls(state, mode, usage=usage, tokens=tokens)


def needs_fallback(body: Mapping[str, Any]) -> bool:
    """True when ``max_tokens: 0`` is refused for this body (the docs' list)."""
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        return True
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
        return True
    output_config = body.get("output_config")
    return isinstance(output_config, dict) and "format" in output_config


def warm_body(request: Mapping[str, Any], mode: str, *, stream: bool = True) -> bytes:
    """The upstream body of a warm: ``request`` (see :func:`specproxy.bodies.warm_request`) generating
    nothing (mode "0") or one token (mode "1"), streamed unless ``stream`` is off (engines)."""
    out = dict(request)
    if mode == "0":
        out["max_tokens"] = 0
    else:
        thinking = request.get("thinking")
        budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
        # Thinking needs max_tokens > budget_tokens; we close the stream at message_start anyway.
        enabled = isinstance(thinking, dict) and thinking.get("type") == "enabled"
        out["max_tokens"] = budget + 1 if enabled and isinstance(budget, int) else 1
        if stream:
            out["stream"] = True
    return orjson.dumps(out)


def refuses_max_tokens_0(status: int, error: Mapping[str, Any] | None) -> bool:
    """True when an upstream answer is the refusal of ``max_tokens: 0`` itself (an upstream that
    predates it, a feature that excludes it, or an engine's validation error), not any other
    invalid request (see :func:`specproxy.upstream_profile.refuses_max_tokens_0`)."""
    return _refuses_max_tokens_0(status, error)


class TenantWarmLimits:
    """Per-tenant bounds on warms: in flight at once, and started per rolling minute."""

    def __init__(self, max_in_flight: int, per_minute: int, max_tenants: int = 10_000) -> None:
        self._max_in_flight = max_in_flight
        self._per_minute = per_minute
        self._in_flight: dict[str, int] = {}
        # Bounded by count and age (a tenant's window is forgotten a minute after its last start).
        self._starts: PerCredential[deque[float]] = PerCredential(max_tenants, 60.0, deque)

    @property
    def tracked(self) -> int:
        """Tenants whose rate window is remembered now."""
        return len(self._starts)

    def acquire(self, tenant: str) -> None:
        """Count a warm start, or raise :class:`RateLimited` with a ``retry-after``."""
        now = time.monotonic()
        starts = self._starts.touch(tenant)
        while starts and now - starts[0] >= 60.0:
            starts.popleft()
        if self._in_flight.get(tenant, 0) >= self._max_in_flight:
            raise RateLimited(
                f"Too many warms in flight for this credential (limit {self._max_in_flight}).", retry_after=1
            )
        if len(starts) >= self._per_minute:
            raise RateLimited(
                f"Too many warms this minute for this credential (limit {self._per_minute}).",
                retry_after=60.0 - (now - starts[0]),
            )
        starts.append(now)
        self._in_flight[tenant] = self._in_flight.get(tenant, 0) + 1

    def release(self, tenant: str, *, started: bool = True) -> None:
        """A warm ended; with ``started=False`` it was never sent (deduplicated) and does not count."""
        if not started:
            starts = self._starts.get(tenant)
            if starts:
                starts.pop()
        left = self._in_flight.get(tenant, 0) - 1
        if left > 0:
            self._in_flight[tenant] = left
        else:
            self._in_flight.pop(tenant, None)
            starts = self._starts.get(tenant)
            if starts is not None and not starts:
                self._starts.pop(tenant)

    def in_flight(self, tenant: str) -> int:
        return self._in_flight.get(tenant, 0)


Settled = Callable[[Warm, "WarmResult"], None]


class Warmer:
    """Fires warms in the background (bounded per tenant), settles the registry from their usage, and
    tells its subscribers (metrics, speculation, test harnesses) each time a warm settles."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        upstream: str,
        registry: Registry,
        *,
        warm_timeout: float,
        limits: TenantWarmLimits,
    ) -> None:
        self._subscribers: list[Settled] = []
        self._session = session
        self._url = upstream.rstrip("/") + "/v1/messages"
        self._registry = registry
        self._timeout = aiohttp.ClientTimeout(total=warm_timeout)
        self.limits = limits
        self._tasks: set[asyncio.Task[None]] = set()
        self.results: deque[WarmResult] = deque(maxlen=1000)
        self.profile: UpstreamProfile = ANTHROPIC  # set at start-up (upstream_profile)

    def subscribe(self, callback: Settled) -> None:
        """Call ``callback(warm, result)`` each time a warm this warmer sent settles."""
        self._subscribers.append(callback)

    def unsubscribe(self, callback: Settled) -> None:
        self._subscribers.remove(callback)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def warm(
        self,
        tenant: str,
        prefix: Prefix,
        body: dict[str, Any],
        headers: CIMultiDict[str],
        *,
        kind: Kind = Kind.PREWARM,
        replace: bool = False,
    ) -> tuple[Warm, bool]:
        """Register ``prefix`` (single flight) and, when it is new, send its warm in the background.

        Deduplication comes first: a warm already in flight or warm answers with its state, sends
        nothing and does not count against the tenant's limits. Only a warm that will be sent is
        limited, raising :class:`RateLimited` when the tenant is over them.
        """
        existing = await self._registry.peek(prefix, replace=replace)
        if existing is not None:
            return existing, False
        self.limits.acquire(tenant)
        try:
            warm, started = await self._registry.begin(tenant, prefix, kind=kind, replace=replace)
        except BaseException:
            self.limits.release(tenant, started=False)
            raise
        if started:
            warm.model = body.get("model") if isinstance(body.get("model"), str) else None
            self.start(warm, warm_request(body, prefix), headers)
        else:
            self.limits.release(tenant, started=False)
        return warm, started

    async def resend(self, request: Mapping[str, Any], headers: CIMultiDict[str]) -> WarmResult:
        """Send a warm of ``request`` (a :func:`warm_request`) now and return what it found, without
        touching the registry (keep-warm)."""
        return await self._send_with_fallback(request, _warm_headers(headers))

    def start(self, warm: Warm, request: Mapping[str, Any], headers: CIMultiDict[str]) -> None:
        """Send ``warm`` in the background. The caller has registered it with the registry."""
        task = asyncio.get_running_loop().create_task(self._run(warm, request, headers))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, warm: Warm, request: Mapping[str, Any], client_headers: CIMultiDict[str]) -> None:
        result = WarmResult(State.FAILED, "0", error="cancelled")
        try:
            result = await self._send_with_fallback(request, _warm_headers(client_headers))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a warm must always settle, whatever went wrong
            log.warning("warm %s failed: %s", warm.prefix, type(exc).__name__)
            result = WarmResult(State.FAILED, "0", error=type(exc).__name__)
        finally:
            warm.mode = result.mode
            warm.usage = result.usage
            self.results.append(result)
            self.limits.release(warm.tenant)
            await self._registry.settle(warm, result.state, error=result.error)
            for callback in list(self._subscribers):
                callback(warm, result)
            log.debug("warm %s settled %s (max_tokens %s)", warm.prefix, result.state, result.mode)

    async def _send_with_fallback(self, request: Mapping[str, Any], headers: CIMultiDict[str]) -> WarmResult:
        if self.profile.warm_max_tokens == 1:  # an engine that refuses max_tokens 0: one token, whole
            return await self._send(request, headers, "1", stream=self.profile.warm_stream)
        if needs_fallback(request):
            return await self._send(request, headers, "1")
        result = await self._send(request, headers, "0")
        if result.refused_max_tokens_0 and self.profile.fallback_to_one:
            # The upstream refuses max_tokens: 0 (it predates it): the older one-token form works.
            result = await self._send(request, headers, "1")
        return result

    async def _send(
        self, request: Mapping[str, Any], headers: CIMultiDict[str], mode: str, *, stream: bool = True
    ) -> WarmResult:
        profile = self.profile
        data = warm_body(request, mode, stream=stream)
        try:
            try:
                resp = await self._post(data, headers)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # The pooled connection was dead before any answer (the upstream closed it while
                # idle, or after its last stream): nothing reached the model. A warm generates
                # nothing, so it is safe to send again, once, on a fresh connection (RFC 9112
                # 9.3.1: a request known to be idempotent may be retried).
                resp = await self._post(data, headers)
            async with resp:
                if resp.status >= 400:
                    error = await _error_of(resp)
                    return WarmResult(State.FAILED, mode, error=str(error.get("type") or f"http_{resp.status}"),
                                      refused_max_tokens_0=refuses_max_tokens_0(resp.status, error))
                if mode == "0" or not stream:
                    payload = orjson.loads(await resp.read())
                    return WarmResult.of(mode, payload.get("usage") if isinstance(payload, dict) else None, profile)
                reader = SSEReader()
                async for chunk in resp.content.iter_any():
                    for event, raw in reader.feed(chunk):
                        if event == "message_start":
                            message = orjson.loads(raw)
                            message = message.get("message") if isinstance(message, dict) else None
                            resp.close()  # settle here; generating the token is not wanted
                            usage = message.get("usage") if isinstance(message, dict) else None
                            return WarmResult.of(mode, usage, profile)
                        if event == "error":
                            return WarmResult(State.FAILED, mode, error="stream_error")
                return WarmResult(State.FAILED, mode, error="stream ended before message_start")
        except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError) as exc:
            return WarmResult(State.FAILED, mode, error=type(exc).__name__)

    async def _post(self, data: bytes, headers: CIMultiDict[str]) -> aiohttp.ClientResponse:
        return await self._session.post(
            self._url, data=data, headers=headers, timeout=self._timeout, auto_decompress=True, allow_redirects=False,
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _warm_headers(client_headers: CIMultiDict[str]) -> CIMultiDict[str]:
    headers = CIMultiDict((k, v) for k, v in client_headers.items() if k.lower() not in _WARM_HEADER_DROP)
    headers["content-type"] = "application/json"
    headers["accept-encoding"] = "identity"
    return headers


async def _error_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """The ``error`` object of an upstream error answer, or ``{}`` when it has none."""
    try:
        data = orjson.loads(await resp.read())
    except (orjson.JSONDecodeError, aiohttp.ClientError, TimeoutError, OSError):
        return {}
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(data, dict) and error is None and isinstance(data.get("message"), str):
        return data  # a flat error object (SGLang's {"object": "error", "message": ...})
    return error if isinstance(error, dict) else {}
