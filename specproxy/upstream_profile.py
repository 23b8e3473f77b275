"""Upstream profiles: what kind of server is behind the proxy, as data.

specproxy was built for Anthropic's Messages API, where a prefix is cached only up to a
``cache_control`` breakpoint, a warm is ``max_tokens: 0`` and the usage says whether it wrote the
cache. Self-hosted engines that serve ``/v1/messages`` (llama.cpp's ``llama-server``, vLLM,
SGLang) differ in each of those, so each is described here once:

- **how a warm is sent**: ``max_tokens: 0`` (Anthropic; llama.cpp, where it is ``n_predict: 0``,
  "the prompt is evaluated into the cache"), or ``max_tokens: 1`` sent whole (vLLM and SGLang
  refuse 0: "max_tokens must be positive");
- **how usage is read**: which counters exist, whether ``input_tokens`` includes the cached
  tokens, and what shows a warm wrote the cache. No engine has a creation counter: for engines
  a warm that completed (2xx) has put its prefix in the engine's cache;
- **what makes a prefix cacheable**: breakpoints for Anthropic; for engines automatic prefix
  caching, so every request is identified (with or without ``cache_control``) and matched at
  every block position against its tenant's warms (see :func:`match_positions`);
- **tenant isolation**: an engine shares one cache across all keys (specproxy still keeps warm
  state and holds per credential, but tenant B's request reads what tenant A warmed);
- **slots**: what the engine's parallel slots mean for holding.

``upstream_profile = "auto"`` asks the upstream (:func:`detect`) and falls back to ``anthropic``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import web

from specproxy.prefix import LOOKBACK, Breakpoint, Prefix
from specproxy.usage import Usage

log = logging.getLogger("specproxy.upstream")

PROFILE_NAMES: Final = ("auto", "anthropic", "vllm", "sglang", "llamacpp")


@dataclass(frozen=True, slots=True)
class UpstreamProfile:
    """How one kind of upstream caches prompts, and how the proxy warms and reads it."""

    name: str
    title: str
    # --- how a warm is sent ---
    warm_max_tokens: int  # 0: prefill only; 1: one generated token
    warm_stream: bool  # with 1: stream and settle at message_start (Anthropic's fallback), else whole
    fallback_to_one: bool  # a refusal of max_tokens 0 is retried with 1 (streamed)
    # --- how usage is read ---
    counters: tuple[str, ...]  # the usage counters it sends
    creation_counter: bool  # usage shows a cache write (cache_creation_input_tokens)
    input_includes_cache_read: bool  # input_tokens counts the cached tokens too
    # --- what makes a prefix cacheable ---
    automatic_prefix_caching: bool  # every prefix is cached: match every request at every block
    # --- tenants and slots ---
    shared_cache: bool  # one cache for every credential
    slots: str  # what the engine's slots mean for holding
    start: str  # how to start it so that cache reporting works
    # --- its connections ---
    closes_after_stream: bool = False  # drops a kept-alive connection once a streamed response ends

    @property
    def engine(self) -> bool:
        return self.automatic_prefix_caching

    def warm_wrote_cache(self, usage: Mapping[str, Any] | None) -> bool:
        """Whether a successful (2xx) warm left its prefix readable. Anthropic: its usage shows a
        write or a read (a prefix under the model's minimum shows neither). Engines have no creation
        counter: a warm that completed has put the prefix in the engine's cache."""
        if self.engine:
            return True
        if not isinstance(usage, Mapping):
            return False
        tokens = Usage.from_api(dict(usage))
        return bool(tokens.cache_read or tokens.cache_written)

    def usage(self, raw: Mapping[str, Any]) -> Usage:
        """``raw`` read into Anthropic's meaning: ``input`` is the tokens not read from the cache."""
        tokens = Usage.from_api(dict(raw))
        return self.normalise(tokens)

    def normalise(self, tokens: Usage) -> Usage:
        """A :class:`Usage` read with Anthropic's rules, corrected in place for this upstream."""
        if self.input_includes_cache_read and tokens.cache_read:
            tokens.input = max(0, tokens.input - tokens.cache_read)
        return tokens

    def public(self) -> dict[str, Any]:
        """What ``/status.json`` shows of the profile."""
        return {
            "profile": self.name,
            "title": self.title,
            "warm": f"max_tokens {self.warm_max_tokens}",
            "automatic_prefix_caching": self.automatic_prefix_caching,
            "shared_cache": self.shared_cache,
            "creation_counter": self.creation_counter,
        }


_ANTHROPIC_COUNTERS: Final = (
    "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "cache_creation", "output_tokens",
)

PROFILES: Final[dict[str, UpstreamProfile]] = {
    "anthropic": UpstreamProfile(
        name="anthropic",
        title="Anthropic Messages API",
        warm_max_tokens=0,
        warm_stream=False,
        fallback_to_one=True,
        counters=_ANTHROPIC_COUNTERS,
        creation_counter=True,
        input_includes_cache_read=False,
        automatic_prefix_caching=False,
        shared_cache=False,
        slots="none: the API serves any number of requests at once",
        start="",
    ),
    "llamacpp": UpstreamProfile(
        name="llamacpp",
        title="llama.cpp llama-server",
        warm_max_tokens=0,  # n_predict 0: the prompt is evaluated into the slot's cache, nothing generated
        warm_stream=False,
        fallback_to_one=True,
        counters=("input_tokens", "cache_read_input_tokens", "output_tokens"),
        creation_counter=False,
        input_includes_cache_read=False,
        automatic_prefix_caching=True,
        shared_cache=True,
        slots=(
            "a warm's KV lives in the slot that ran it; a later request sharing its prefix is given that "
            "slot (--slot-prompt-similarity, on by default) once it is idle, which holding guarantees"
        ),
        start="llama-server -m MODEL --parallel N --ctx-size N*CTX --cache-reuse 256 (prompt cache on by default)",
        # It answers a stream with ``Keep-Alive: timeout=5`` and then closes the connection: reusing
        # it sends the next request into a closed socket (ServerDisconnectedError).
        closes_after_stream=True,
    ),
    "vllm": UpstreamProfile(
        name="vllm",
        title="vLLM",
        warm_max_tokens=1,  # max_tokens 0 is refused: "max_tokens must be positive"
        warm_stream=False,
        fallback_to_one=False,
        # With --enable-prompt-tokens-details: input_tokens is what was not read, cache_read_input_tokens
        # the rest, cache_creation_input_tokens always 0; without it input_tokens is the whole prompt.
        counters=("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens"),
        creation_counter=False,
        input_includes_cache_read=False,
        automatic_prefix_caching=True,
        shared_cache=True,
        slots="none: every running request shares the paged KV cache and its prefix blocks",
        start="vllm serve MODEL --enable-prefix-caching --enable-prompt-tokens-details",
    ),
    "sglang": UpstreamProfile(
        name="sglang",
        title="SGLang",
        warm_max_tokens=1,  # max_tokens 0 is refused: "max_tokens must be positive"
        warm_stream=False,
        fallback_to_one=False,
        # With --enable-cache-report: input_tokens is the whole prompt, cached ones included, and
        # cache_read_input_tokens the cached part (message_start carries zeros; message_delta the counts).
        counters=("input_tokens", "cache_read_input_tokens", "output_tokens"),
        creation_counter=False,
        input_includes_cache_read=True,
        automatic_prefix_caching=True,
        shared_cache=True,
        slots="none: every running request shares the radix cache",
        start="python -m sglang.launch_server --model-path MODEL --enable-cache-report",
    ),
}

ANTHROPIC: Final = PROFILES["anthropic"]


def get(name: str) -> UpstreamProfile:
    """The profile called ``name`` (not ``auto``: see :func:`resolve`)."""
    return PROFILES[name]


def refuses_max_tokens_0(status: int, error: Mapping[str, Any] | None) -> bool:
    """True when an upstream's error answer refuses ``max_tokens: 0`` itself: Anthropic's 400
    ``invalid_request_error``, or an engine's 400/422 validation error ("max_tokens must be
    positive"), whatever its error type is called."""
    if status not in (400, 422) or not error:
        return False
    message = error.get("message")
    if not isinstance(message, str):
        message = orjson.dumps(error).decode("utf-8", "replace")
    return "max_tokens" in message


def match_positions(prefix: Prefix, ttl: str = "5m") -> Prefix:
    """For an engine (automatic prefix caching): ``prefix`` with a breakpoint every ``LOOKBACK``
    items back from its last, so the registry's lookback scan covers every block position, and
    a warm registers its last block and every twentieth before it. The body is not changed; the
    client's own breakpoints keep their TTLs."""
    n = prefix.item_count
    if n == 0:
        return prefix
    own = {bp.position: bp.ttl for bp in prefix.breakpoints}
    positions = sorted(set(range(n - 1, -1, -LOOKBACK)) | set(own))
    breakpoints = tuple(Breakpoint(p, own.get(p, ttl)) for p in positions)
    if breakpoints == prefix.breakpoints:
        return prefix
    return Prefix(prefix.chain, breakpoints, n, prefix.locations, prefix.cacheable, prefix.images)


# --- detection ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Detected:
    """What :func:`detect` found: the profile, why, and what the upstream said of itself."""

    profile: UpstreamProfile
    reason: str
    slots: int | None = None  # llama.cpp: total_slots from /props

    def public(self) -> dict[str, Any]:
        """What ``/status.json`` shows under ``upstream``."""
        out = {**self.profile.public(), "detected": self.reason}
        if self.slots is not None:
            out["slots"] = self.slots
        return out


UPSTREAM: Final = web.AppKey("upstream_profile", Detected)


def _owned_by(data: Any) -> str | None:
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        return None
    for row in rows:
        owner = row.get("owned_by") if isinstance(row, dict) else None
        if isinstance(owner, str) and owner.lower() in ("vllm", "sglang", "llamacpp", "llama.cpp"):
            return "llamacpp" if owner.lower() == "llama.cpp" else owner.lower()
    return None


def _anthropic_shaped(data: Any) -> bool:
    return isinstance(data, dict) and data.get("type") == "error" and isinstance(data.get("error"), dict) and (
        "type" in data["error"]
    )


async def _get(session: aiohttp.ClientSession, url: str, headers: Mapping[str, str],
               timeout: aiohttp.ClientTimeout) -> tuple[int, Mapping[str, str], Any] | None:
    try:
        async with session.get(url, headers=headers, timeout=timeout, allow_redirects=False) as resp:
            raw = await resp.read()
            try:
                data = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                data = None
            return resp.status, resp.headers, data
    except (aiohttp.ClientError, TimeoutError, OSError, UnicodeError, ValueError):
        return None


async def detect(
    session: aiohttp.ClientSession, upstream: str, *, headers: Mapping[str, str] | None = None,
    timeout: float = 2.0,
) -> Detected:
    """Ask the upstream what it is. Probes, in order, stopping at the first answer that tells:

    1. ``GET /v1/models``: ``owned_by`` is ``vllm``, ``sglang`` or ``llamacpp``; a ``Server:
       llama.cpp`` header on any answer; an Anthropic-shaped error (the API, or the simulator);
    2. ``GET /props`` (llama.cpp: ``total_slots``, ``default_generation_settings``);
    3. ``GET /get_server_info`` and ``GET /server_info`` (SGLang);
    4. ``GET /version`` answering only ``{"version": …}`` (vLLM).

    Falls back to ``anthropic`` when nothing tells (or the upstream does not answer).
    """
    host = (urlsplit(upstream).hostname or "").lower()
    if host == "anthropic.com" or host.endswith(".anthropic.com"):
        return Detected(ANTHROPIC, f"{host} is Anthropic's API")
    base = upstream.rstrip("/")
    hdrs = {"accept": "application/json", "accept-encoding": "identity", **(headers or {})}
    budget = aiohttp.ClientTimeout(total=timeout)
    slots: int | None = None

    async def props() -> Detected | None:
        nonlocal slots
        got = await _get(session, base + "/props", hdrs, budget)
        if got is None or got[0] != 200 or not isinstance(got[2], dict):
            return None
        data = got[2]
        if "total_slots" in data or "default_generation_settings" in data:
            total = data.get("total_slots")
            slots = total if isinstance(total, int) else None
            return Detected(PROFILES["llamacpp"], "GET /props answered like llama-server", slots)
        return None

    try:
        async with asyncio.timeout(timeout * 3):
            got = await _get(session, base + "/v1/models", hdrs, budget)
            if got is not None:
                status, resp_headers, data = got
                owner = _owned_by(data)
                server = resp_headers.get("server", "").lower()
                if owner == "llamacpp" or server.startswith("llama.cpp"):
                    found = await props()
                    why = "GET /v1/models: owned_by llamacpp" if owner else "Server: llama.cpp"
                    return Detected(PROFILES["llamacpp"], why, slots if found else None)
                if owner is not None:
                    return Detected(PROFILES[owner], f"GET /v1/models: owned_by {owner}")
                if _anthropic_shaped(data) or "request-id" in resp_headers or (
                    status == 200 and isinstance(data, dict) and "has_more" in data
                ):
                    return Detected(ANTHROPIC, f"GET /v1/models answered like Anthropic's API ({status})")
            found = await props()
            if found is not None:
                return found
            for path in ("/get_server_info", "/server_info"):
                got = await _get(session, base + path, hdrs, budget)
                if got is not None and got[0] == 200 and isinstance(got[2], dict):
                    return Detected(PROFILES["sglang"], f"GET {path} answered like SGLang")
            got = await _get(session, base + "/version", hdrs, budget)
            if got is not None and got[0] == 200 and isinstance(got[2], dict) and set(got[2]) == {"version"}:
                return Detected(PROFILES["vllm"], "GET /version answered like vLLM")
    except TimeoutError:
        return Detected(ANTHROPIC, "the upstream did not answer the probes in time")
    return Detected(ANTHROPIC, "nothing in the upstream's answers named an engine")


async def resolve(
    name: str, session: aiohttp.ClientSession, upstream: str, *, headers: Mapping[str, str] | None = None,
    timeout: float = 2.0,
) -> Detected:
    """The profile for setting ``name``: itself, or for ``auto`` what :func:`detect` finds (logged)."""
    if name != "auto":
        found = Detected(PROFILES[name], "upstream_profile setting")
        if found.profile.name == "llamacpp":
            # Only to show the slot count; the profile is not in question.
            probed = await detect(session, upstream, headers=headers, timeout=timeout)
            if probed.slots is not None:
                found = Detected(found.profile, found.reason, probed.slots)
        return found
    found = await detect(session, upstream, headers=headers, timeout=timeout)
    log.info("upstream_profile auto: %s (%s)", found.profile.name, found.reason)
    return found
