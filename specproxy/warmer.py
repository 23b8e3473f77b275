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

from specproxy.errors import RateLimited
from specproxy.prefix import Prefix
from specproxy.registry import Kind, Registry, State, Warm
from specproxy.sse import SSEReader

log = logging.getLogger("specproxy.warmer")

_WARM_HEADER_DROP = frozenset({"content-type", "accept-encoding", "accept"})


@dataclass(slots=True)
class WarmResult:
    state: State
    mode: str
    usage: dict[str, Any] | None = None
    error: str | None = None


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


def warm_body(body: Mapping[str, Any], mode: str) -> bytes:
    """The upstream body of a warm: the client's prompt, generating nothing (mode "0") or one token."""
    out = {k: v for k, v in body.items() if k not in ("stream", "max_tokens")}
    if mode == "0":
        out["max_tokens"] = 0
    else:
        thinking = body.get("thinking")
        budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
        # Thinking needs max_tokens > budget_tokens; we close the stream at message_start anyway.
        out["max_tokens"] = budget + 1 if isinstance(budget, int) and thinking.get("type") == "enabled" else 1  # type: ignore[union-attr]
        out["stream"] = True
    return orjson.dumps(out)


def state_from_usage(usage: Mapping[str, Any] | None) -> State:
    """``warm`` when the warm wrote or read a cache entry; ``uncacheable`` when it did neither."""
    if not usage:
        return State.UNCACHEABLE
    written = usage.get("cache_creation_input_tokens") or 0
    read = usage.get("cache_read_input_tokens") or 0
    return State.WARM if (written or read) else State.UNCACHEABLE


class TenantWarmLimits:
    """Per-tenant bounds on warms: in flight at once, and started per rolling minute."""

    def __init__(self, max_in_flight: int, per_minute: int) -> None:
        self._max_in_flight = max_in_flight
        self._per_minute = per_minute
        self._in_flight: dict[str, int] = {}
        self._starts: dict[str, deque[float]] = {}

    def acquire(self, tenant: str) -> None:
        """Count a warm start, or raise :class:`RateLimited` with a ``retry-after``."""
        now = time.monotonic()
        starts = self._starts.setdefault(tenant, deque())
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
                del self._starts[tenant]

    def in_flight(self, tenant: str) -> int:
        return self._in_flight.get(tenant, 0)


class Warmer:
    """Fires warms in the background (bounded per tenant) and settles the registry from their usage."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        upstream: str,
        registry: Registry,
        *,
        warm_timeout: float,
        limits: TenantWarmLimits,
        on_settled: Callable[[Warm, WarmResult], None] | None = None,
    ) -> None:
        self._on_settled = on_settled
        self._session = session
        self._url = upstream.rstrip("/") + "/v1/messages"
        self._registry = registry
        self._timeout = aiohttp.ClientTimeout(total=warm_timeout)
        self.limits = limits
        self._tasks: set[asyncio.Task[None]] = set()
        self.results: deque[WarmResult] = deque(maxlen=1000)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def warm(
        self,
        tenant: str,
        prefix: Prefix,
        body: Mapping[str, Any],
        headers: CIMultiDict[str],
        *,
        kind: Kind = Kind.PREWARM,
        replace: bool = False,
    ) -> tuple[Warm, bool]:
        """Register ``prefix`` (single flight) and, when it is new, send its warm in the background.

        Raises :class:`RateLimited` when the tenant is over its warm limits; a deduplicated warm
        sends nothing and does not count against them.
        """
        self.limits.acquire(tenant)
        try:
            warm, started = await self._registry.begin(tenant, prefix, kind=kind, replace=replace)
        except BaseException:
            self.limits.release(tenant, started=False)
            raise
        if started:
            warm.model = body.get("model") if isinstance(body.get("model"), str) else None
            self.start(warm, body, headers)
        else:
            self.limits.release(tenant, started=False)
        return warm, started

    async def resend(self, body: Mapping[str, Any], headers: CIMultiDict[str]) -> WarmResult:
        """Send a warm now and return what it found, without touching the registry (keep-warm)."""
        return await self._send(body, _warm_headers(headers), "1" if needs_fallback(body) else "0")

    def start(self, warm: Warm, body: Mapping[str, Any], headers: CIMultiDict[str]) -> None:
        """Send ``warm`` in the background. The caller has registered it with the registry."""
        task = asyncio.get_running_loop().create_task(self._run(warm, body, headers))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, warm: Warm, body: Mapping[str, Any], client_headers: CIMultiDict[str]) -> None:
        headers = _warm_headers(client_headers)
        result = WarmResult(State.FAILED, "0", error="cancelled")
        try:
            mode = "1" if needs_fallback(body) else "0"
            result = await self._send(body, headers, mode)
            if mode == "0" and result.error == "invalid_request_error":
                # An upstream that predates max_tokens: 0 refuses it: the older one-token form works.
                result = await self._send(body, headers, "1")
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
            if self._on_settled is not None:
                self._on_settled(warm, result)
            log.debug("warm %s settled %s (max_tokens %s)", warm.prefix, result.state, result.mode)

    async def _send(self, body: Mapping[str, Any], headers: CIMultiDict[str], mode: str) -> WarmResult:
        try:
            async with self._session.post(
                self._url, data=warm_body(body, mode), headers=headers, timeout=self._timeout,
                auto_decompress=True, allow_redirects=False,
            ) as resp:
                if resp.status >= 400:
                    error_type = await _error_type(resp)
                    return WarmResult(State.FAILED, mode, error=error_type)
                if mode == "0":
                    data = orjson.loads(await resp.read())
                    usage = data.get("usage") if isinstance(data, dict) else None
                    return WarmResult(state_from_usage(usage), mode, usage=usage)
                reader = SSEReader()
                async for chunk in resp.content.iter_any():
                    for event, payload in reader.feed(chunk):
                        if event == "message_start":
                            usage = orjson.loads(payload).get("message", {}).get("usage")
                            resp.close()  # settle here; generating the token is not wanted
                            return WarmResult(state_from_usage(usage), mode, usage=usage)
                        if event == "error":
                            return WarmResult(State.FAILED, mode, error="stream_error")
                return WarmResult(State.FAILED, mode, error="stream ended before message_start")
        except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError) as exc:
            return WarmResult(State.FAILED, mode, error=type(exc).__name__)

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


async def _error_type(resp: aiohttp.ClientResponse) -> str:
    try:
        data = orjson.loads(await resp.read())
        return str(data["error"]["type"])
    except Exception:
        return f"http_{resp.status}"


