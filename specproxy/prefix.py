"""Prefix identity: flatten a Messages request into prompt items and chain-hash them.

Anthropic caches the prompt as one ordered sequence (tools, then system, then messages) and a cache
entry covers everything up to and including a breakpoint. ``h[k]`` here identifies "the prompt up to
and including item k" (vLLM's prefix-caching idea: each hash includes its parent's), so a match on
one chain value is a match on the whole prefix. Pure functions; nothing here knows of HTTP.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
import xxhash

LOOKBACK: Final = 20
MAX_BREAKPOINTS: Final = 4
TTL_SECONDS: Final[dict[str, float]] = {"5m": 300.0, "1h": 3600.0}
# Blocks that can never carry a breakpoint; automatic caching walks back past them.
_UNCACHEABLE_TYPES: Final = frozenset({"thinking", "redacted_thinking"})
_IMAGE_TYPES: Final = frozenset({"image"})


class PrefixError(ValueError):
    """The request's shape is unusable for prefix identity (the message says why)."""


@dataclass(frozen=True, slots=True)
class Breakpoint:
    """An item that carries ``cache_control``: its position in the item sequence and its TTL."""

    position: int
    ttl: str  # "5m" | "1h"


@dataclass(frozen=True, slots=True)
class Prefix:
    """A request's prefix identity: one chain value per item, and its breakpoints."""

    chain: tuple[bytes, ...]  # chain[i] identifies items[0..i]
    breakpoints: tuple[Breakpoint, ...]
    item_count: int
    # Where item i sits in the body: ("tools", i, -1), ("system", i, -1) or ("messages", m, b);
    # -1 for b (or i) when the content (or system) is a plain string.
    locations: tuple[tuple[str, int, int], ...] = ()
    cacheable: frozenset[int] = frozenset()  # positions that may carry a breakpoint
    # Images anywhere change the messages level's identity upstream, so a body cut before an image
    # is not a prefix of the whole: speculation never cuts such a body (see :func:`truncated`).
    images: bool = False

    def key(self, position: int) -> bytes:
        return self.chain[position]

    def candidates(self) -> Iterator[tuple[int, bytes]]:
        """(position, chain value) to look up, longest first, deduplicated across breakpoints.

        For each breakpoint ``b`` Anthropic checks ``b, b-1, …, b-19``; the longest registered one
        wins, so scanning positions in descending order lets the caller stop at the first hit.
        """
        positions: set[int] = set()
        for bp in self.breakpoints:
            positions.update(range(max(0, bp.position - LOOKBACK + 1), bp.position + 1))
        for pos in sorted(positions, reverse=True):
            yield pos, self.chain[pos]

    @property
    def last_breakpoint(self) -> Breakpoint | None:
        return self.breakpoints[-1] if self.breakpoints else None

    def with_breakpoint(self, position: int, ttl: str = "5m") -> Prefix:
        """The identity of the same body with one more breakpoint: no re-hashing, since
        ``cache_control`` is not part of any chain value (see :func:`with_breakpoint_at`)."""
        if any(bp.position == position for bp in self.breakpoints):
            return self
        bps = tuple(sorted((*self.breakpoints, Breakpoint(position, ttl)), key=lambda b: b.position))
        return Prefix(self.chain, bps, self.item_count, self.locations, self.cacheable, self.images)

    def extended(self, message_index: int, role: str, blocks: Sequence[dict[str, Any]]) -> Prefix:
        """The identity of this body with one more message appended (``blocks``, with no images):
        its items are chained onto the last value, so nothing before them is hashed again.

        Next-turn warms use it: the conversation plus the reply, without re-hashing the conversation.
        """
        if not self.chain or self.locations[-1][0] != "messages":
            raise PrefixError("only a body that has messages can be extended")
        chain, locations, cacheable = list(self.chain), list(self.locations), set(self.cacheable)
        h, tag = chain[-1], _message_tag(message_index, role)
        for b, block in enumerate(blocks):
            h = _step(h, tag, block)
            chain.append(h)
            locations.append(("messages", message_index, b))
            if _block_cacheable(block):
                cacheable.add(len(chain) - 1)
        return Prefix(tuple(chain), self.breakpoints, len(chain), tuple(locations), frozenset(cacheable), self.images)

    def without_breakpoints_in(self, section: str) -> Prefix:
        """The same identity with the breakpoints of one section (``messages``) removed."""
        bps = tuple(bp for bp in self.breakpoints if self.locations[bp.position][0] != section)
        return Prefix(self.chain, bps, self.item_count, self.locations, self.cacheable, self.images)

    @property
    def breakpoints_before_messages(self) -> bool:
        """True when every breakpoint lies in tools or system (thinking and tool_choice do not matter there)."""
        return bool(self.breakpoints) and all(self.locations[bp.position][0] != "messages" for bp in self.breakpoints)

    def cut(self, position: int) -> Prefix:
        """The identity of :func:`truncated` (the body cut after ``position``): a slice of this one."""
        end = position + 1
        return Prefix(
            self.chain[:end],
            tuple(bp for bp in self.breakpoints if bp.position < end),
            end,
            self.locations[:end],
            frozenset(p for p in self.cacheable if p < end),
            self.images,
        )


def tenant_digest(credential: str) -> str:
    """SHA-256 digest (hex) of a credential: the tenant's identity, never the credential itself."""
    return hashlib.sha256(credential.encode("utf-8", "surrogatepass")).hexdigest()


def prefix_id(chain_value: bytes) -> str:
    """The 16-hex id shown to users for a chain value."""
    return chain_value.hex()[:16]


def _canonical(item: Any) -> bytes:
    """Canonical bytes of a block: sorted keys, ``cache_control`` removed (it does not change the prompt).

    orjson, not ``str.encode``: strings it parsed keep their UTF-8 form, so this re-serialisation of
    a 600 KB context block costs little more than a copy (measured ~9x faster than str.encode for
    non-ASCII text).
    """
    if isinstance(item, dict) and "cache_control" in item:
        item = {k: v for k, v in item.items() if k != "cache_control"}
    return orjson.dumps(item, option=orjson.OPT_SORT_KEYS)


def _step(h: bytes, tag: bytes, block: Any) -> bytes:
    """One link of the chain: the parent's value, the item's tag (section, message and role), the item."""
    return xxhash.xxh3_128_digest(h + tag + _canonical(block))


def _message_tag(index: int, role: Any) -> bytes:
    return f"m{index}:{role}".encode()


def _is_volatile(block: Any, volatile_prefixes: Sequence[str]) -> bool:
    if not volatile_prefixes or not isinstance(block, dict) or block.get("type") != "text":
        return False
    text = block.get("text")
    return isinstance(text, str) and text.startswith(tuple(volatile_prefixes))


def _ttl_of(cc: Any) -> str:
    if not isinstance(cc, dict):
        raise PrefixError("cache_control: Input should be an object")
    ttl = cc.get("ttl", "5m")
    if not isinstance(ttl, str) or ttl not in TTL_SECONDS:
        raise PrefixError(f"cache_control.ttl: Input should be '5m' or '1h', got {ttl!r}")
    return str(ttl)


def _contains_image(value: Any) -> bool:
    if isinstance(value, dict):
        if _type_of(value) in _IMAGE_TYPES:
            return True
        content = value.get("content")
        return isinstance(content, list) and any(_contains_image(c) for c in content)
    return False


def compute(body: dict[str, Any], tenant: str, volatile_prefixes: Sequence[str] = ()) -> Prefix:
    """Flatten ``body`` (a parsed Messages request) into items and chain-hash them.

    ``tenant`` is the credential digest: it seeds the chain, so two tenants never share a value.
    Raises :class:`PrefixError` when the body's shape cannot be a Messages request.
    """
    model = body.get("model")
    if not isinstance(model, str):
        raise PrefixError("model: Field required")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise PrefixError("messages: Input should be a valid list")
    tools = body.get("tools")
    if tools is None:
        tools = []
    elif not isinstance(tools, list):
        raise PrefixError("tools: Input should be a valid list")
    system = body.get("system")
    if system is None:
        system_blocks: list[Any] = []
    elif isinstance(system, str):
        system_blocks = [{"type": "text", "text": system}] if system else []
    elif isinstance(system, list):
        system_blocks = system
    else:
        raise PrefixError("system: Input should be a valid string or list")

    chain: list[bytes] = []
    locations: list[tuple[str, int, int]] = []
    cacheable_positions: set[int] = set()
    breakpoints: list[Breakpoint] = []
    eligible_last: int = -1  # last item that may carry an automatic breakpoint
    has_image = False

    # Namespace: tenant and model seed the chain; each level's invalidators are folded in where the
    # level starts, so changing one leaves earlier levels' values untouched.
    h = xxhash.xxh3_128_digest(orjson.dumps(["ns", tenant, model]))

    def push(block: Any, tag: bytes, cacheable: bool, where: tuple[str, int, int], volatile: bool = False) -> None:
        nonlocal h, eligible_last
        if not volatile:  # a volatile block keeps its position (lookback counts it) but adds no identity
            h = _step(h, tag, block)
        chain.append(h)
        locations.append(where)
        pos = len(chain) - 1
        if cacheable:
            eligible_last = pos
            cacheable_positions.add(pos)
        cc = block.get("cache_control") if isinstance(block, dict) else None
        if cc is not None:
            if not cacheable:
                raise PrefixError(f"cache_control cannot be set on item {pos} (thinking or empty text)")
            breakpoints.append(Breakpoint(pos, _ttl_of(cc)))

    for i, tool in enumerate(tools):
        push(tool, b"t", True, ("tools", i, -1))

    system_params = {k: body[k] for k in ("speed",) if k in body}
    h = xxhash.xxh3_128_digest(h + b"S" + orjson.dumps(system_params, option=orjson.OPT_SORT_KEYS))
    for i, block in enumerate(system_blocks):
        where = ("system", -1 if isinstance(system, str) else i, -1)
        push(block, b"s", _block_cacheable(block), where, _is_volatile(block, volatile_prefixes))

    normalised: list[tuple[bytes, list[Any], bool]] = []
    for idx, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise PrefixError(f"messages.{idx}: Input should be an object")
        role = msg.get("role")
        content = msg.get("content")
        if isinstance(content, str):
            blocks: list[Any] = [{"type": "text", "text": content}] if content else []
        elif isinstance(content, list):
            blocks = content
        else:
            raise PrefixError(f"messages.{idx}.content: Input should be a valid string or list")
        has_image = has_image or any(_contains_image(b) for b in blocks)
        normalised.append((_message_tag(idx, role), blocks, isinstance(content, str)))

    message_params: dict[str, Any] = {k: body[k] for k in ("tool_choice", "thinking") if k in body}
    message_params["images"] = has_image
    h = xxhash.xxh3_128_digest(h + b"M" + orjson.dumps(message_params, option=orjson.OPT_SORT_KEYS))
    for m, (tag, blocks, plain) in enumerate(normalised):
        for b, block in enumerate(blocks):
            push(block, tag, _block_cacheable(block), ("messages", m, -1 if plain else b))

    auto = body.get("cache_control")
    # Automatic caching uses one of the 4 slots even when it lands on an explicit breakpoint.
    count = len(breakpoints) + (auto is not None)
    if count > MAX_BREAKPOINTS:
        raise PrefixError(f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {count}.")
    if auto is not None:
        ttl = _ttl_of(auto)
        if eligible_last < 0:
            raise PrefixError("cache_control: no block in the request can carry a cache breakpoint")
        if not any(bp.position == eligible_last for bp in breakpoints):
            breakpoints.append(Breakpoint(eligible_last, ttl))
            breakpoints.sort(key=lambda b: b.position)
    return Prefix(
        chain=tuple(chain),
        breakpoints=tuple(breakpoints),
        item_count=len(chain),
        locations=tuple(locations),
        cacheable=frozenset(cacheable_positions),
        images=has_image,
    )


def _block_cacheable(block: Any) -> bool:
    if not isinstance(block, dict):
        return False
    kind = _type_of(block)
    if kind in _UNCACHEABLE_TYPES:
        return False
    return not (kind == "text" and not block.get("text"))


def _type_of(block: dict[str, Any]) -> str | None:
    """A block's ``type`` when it is a string: arbitrary JSON there is the upstream's to refuse."""
    kind = block.get("type")
    return kind if isinstance(kind, str) else None


def has_breakpoint_marker(raw: bytes) -> bool:
    """Fast pre-check on raw bytes: could this body carry any breakpoint at all?

    A body without the substring ``cache_control`` cannot, and is forwarded without being parsed.
    Searched from the end: a breakpoint usually follows the long context, so it is found early.
    """
    return raw.rfind(b"cache_control") >= 0
