"""A validated request as the cache sees it: an ordered sequence of blocks, their identities,
token counts, and breakpoints.

The sequence is every tool definition, then every system block, then every content block of
every message (with its message's index and role). Position ``i``'s key is a SHA-256 chain over
everything up to and including block ``i``, rooted in the model; the level invalidators are folded
in where their level starts (system level: ``speed``, web search and citations toggles; messages
level: ``tool_choice``, ``thinking``, whether any image is present), so that changing them leaves
earlier levels' keys unchanged. ``cache_control`` is not part of any key. Each block also has a
lookback position: a run of consecutive ``tool_use`` blocks is one position, and so is a run of
consecutive ``tool_result`` blocks (the prompt-caching page: "On the Claude API, a run of
consecutive ``tool_use`` blocks counts as one position"). System text blocks
starting with a volatile prefix (Claude Code's ``x-anthropic-billing-header:``) keep their place
and their tokens but add nothing to the key, like the real API evidently does.

This module is the simulator's own implementation of prefix identity; it must not share code
with the proxy's, so that each checks the other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Final, Literal

from specproxy.errors import InvalidRequest
from specproxy.sim.tokens import block_tokens, canonical, strip_cache_control
from specproxy.sim.validate import Block, MessagesRequest

Ttl = Literal["5m", "1h"]

_ROOT: Final = b"specproxy-sim/1\x00"
_INELIGIBLE_TYPES: Final = frozenset({"thinking", "redacted_thinking"})
_RUN_TYPES: Final = frozenset({"tool_use", "tool_result"})  # a run of one of these is one lookback position
_TTL_ORDER_TAIL: Final = (
    "a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block. "
    "Note that blocks are processed in the following order: `tools`, `system`, `messages`."
)


@dataclass(frozen=True, slots=True)
class Breakpoint:
    """A position whose prefix may be written to the cache, with the TTL it asks for."""

    position: int
    ttl: Ttl


@dataclass(frozen=True, slots=True)
class Prompt:
    """The cache's view of one request."""

    keys: tuple[bytes, ...]  # keys[i]: identity of the prefix ending at block i
    cumulative: tuple[int, ...]  # cumulative[i]: tokens of blocks 0..i
    breakpoints: tuple[Breakpoint, ...]  # sorted by position, one per position
    groups: tuple[int, ...] = ()  # groups[i]: lookback position of block i (runs of tool blocks share one)

    def lookback_blocks(self, block: int, positions: int) -> range:
        """The blocks a breakpoint on ``block`` checks, newest first: ``positions`` lookback
        positions back from it, the breakpoint's own position counted first."""
        if not self.groups:
            return range(block, max(block - positions, -1), -1)
        floor = self.groups[block] - positions  # the first position beyond the window
        low = block
        while low > 0 and self.groups[low - 1] > floor:
            low -= 1
        return range(block, low - 1, -1)

    @property
    def total_tokens(self) -> int:
        return self.cumulative[-1] if self.cumulative else 0

    def tokens_through(self, position: int) -> int:
        """Tokens of the prefix ending at ``position`` (0 for position -1)."""
        return self.cumulative[position] if position >= 0 else 0


@dataclass(frozen=True, slots=True)
class _Item:
    path: str
    block: Block
    identity: bytes | None  # None: leaves the chain unchanged (volatile block)
    tokens: int
    eligible: bool  # may carry cache_control


def _eligible(block: Block) -> bool:
    if block.get("type") in _INELIGIBLE_TYPES:
        return False
    return not (block.get("type") == "text" and block.get("text") == "")


def _has_image(blocks: Any) -> bool:
    if not isinstance(blocks, (list, tuple)):
        return False
    for block in blocks:
        if isinstance(block, dict):
            if block.get("type") == "image":
                return True
            if _has_image(block.get("content")):
                return True
    return False


def _level_salts(req: MessagesRequest) -> tuple[bytes, bytes]:
    raw = req.raw
    web_search = any(str(t.get("type", "")).startswith("web_search") for t in req.tools)
    citations = any(
        isinstance(b.get("citations"), dict) and b["citations"].get("enabled") is True
        for m in req.messages
        for b in m.blocks
    )
    images = any(_has_image(m.blocks) for m in req.messages)
    system_salt = canonical({"speed": raw.get("speed"), "web_search": web_search, "citations": citations})
    messages_salt = canonical(
        {"tool_choice": raw.get("tool_choice"), "thinking": raw.get("thinking"), "images": images}
    )
    return system_salt, messages_salt


def _items(req: MessagesRequest, volatile_prefixes: tuple[str, ...]) -> list[_Item | bytes]:
    """The block sequence, with level separators (``bytes`` salts) where levels start."""
    system_salt, messages_salt = _level_salts(req)
    seq: list[_Item | bytes] = []
    for i, tool in enumerate(req.tools):
        seq.append(_Item(f"tools.{i}", tool, b"T" + canonical(tool), block_tokens(tool), True))
    seq.append(b"S" + system_salt)
    for i, block in enumerate(req.system):
        text = block.get("text", "")
        volatile = isinstance(text, str) and text.startswith(volatile_prefixes) if volatile_prefixes else False
        identity = None if volatile else b"s" + canonical(block)
        path = "system" if req.system_plain else f"system.{i}"
        seq.append(_Item(path, block, identity, block_tokens(block), _eligible(block)))
    seq.append(b"M" + messages_salt)
    for m, msg in enumerate(req.messages):
        for j, block in enumerate(msg.blocks):
            path = f"messages.{m}.content" if msg.plain else f"messages.{m}.content.{j}"
            identity = b"m" + canonical([m, msg.role, strip_cache_control(block)])
            seq.append(_Item(path, block, identity, block_tokens(block), _eligible(block)))
    return seq


def _ttl_of(cc: Any, path: str) -> Ttl:
    """Validate a ``cache_control`` value and return its TTL."""
    if not isinstance(cc, dict):
        raise InvalidRequest(f"{path}: Input should be a valid dictionary")
    if cc.get("type") != "ephemeral":
        raise InvalidRequest(f"{path}.type: Input should be 'ephemeral'")
    ttl = cc.get("ttl", "5m")
    if ttl is None:
        ttl = "5m"
    if ttl not in ("5m", "1h"):
        raise InvalidRequest(f"{path}.ttl: Input should be '5m' or '1h'")
    return "1h" if ttl == "1h" else "5m"


def build_prompt(req: MessagesRequest, model_id: str, volatile_prefixes: tuple[str, ...] = (),
                 max_breakpoints: int = 4) -> Prompt:
    """Flatten ``req`` into a :class:`Prompt`, checking its breakpoints as the API does."""
    h = hashlib.sha256(_ROOT + model_id.encode()).digest()
    keys: list[bytes] = []
    tokens: list[int] = []
    marks: list[tuple[int, Ttl, str]] = []  # (position, ttl, path of the cache_control) in prompt order
    groups: list[int] = []
    last_eligible = -1
    previous_type: Any = None
    for entry in _items(req, volatile_prefixes):
        if isinstance(entry, bytes):
            h = hashlib.sha256(h + entry).digest()
            continue
        pos = len(keys)
        if entry.identity is not None:
            h = hashlib.sha256(h + entry.identity).digest()
        keys.append(h)
        tokens.append(entry.tokens)
        kind = entry.block.get("type")
        same_run = kind in _RUN_TYPES and kind == previous_type
        groups.append(groups[-1] + (0 if same_run else 1) if groups else 0)
        previous_type = kind
        if entry.eligible:
            last_eligible = pos
        cc = entry.block.get("cache_control")
        if cc is None:
            continue
        if not entry.eligible:
            if kind == "text":
                raise InvalidRequest(f"{entry.path}.text: cache_control cannot be set for empty text blocks")
            raise InvalidRequest(f"{entry.path}.{kind}.cache_control: Extra inputs are not permitted")
        marks.append((pos, _ttl_of(cc, f"{entry.path}.cache_control"), f"{entry.path}.cache_control"))
    top = req.raw.get("cache_control")
    count = len(marks) + (1 if top is not None else 0)
    if count > max_breakpoints:
        raise InvalidRequest(
            f"A maximum of {max_breakpoints} blocks with cache_control may be provided. Found {count}."
        )
    if top is not None:
        ttl = _ttl_of(top, "cache_control")
        explicit = next((m for m in marks if m[0] == last_eligible), None)
        if explicit is not None and explicit[1] != ttl:
            raise InvalidRequest(
                f"cache_control.ttl: the automatic breakpoint's ttl='{ttl}' differs from ttl='{explicit[1]}' "
                f"of the explicit cache_control on the last cacheable block ({explicit[2]})"
            )
        if last_eligible >= 0 and explicit is None:
            marks.append((last_eligible, ttl, "cache_control"))
            marks.sort(key=lambda m: m[0])  # stable: an explicit mark stays before the automatic one
    seen_5m = False
    for _, ttl, path in marks:
        if ttl == "1h" and seen_5m:
            raise InvalidRequest(f"{path}.ttl: {_TTL_ORDER_TAIL}")
        seen_5m = seen_5m or ttl == "5m"
    by_pos: dict[int, Ttl] = {}
    for pos, ttl, _ in marks:
        by_pos[pos] = "1h" if "1h" in (ttl, by_pos.get(pos)) else ttl
    return Prompt(
        keys=tuple(keys),
        cumulative=tuple(accumulate(tokens)),
        breakpoints=tuple(Breakpoint(p, t) for p, t in sorted(by_pos.items())),
        groups=tuple(groups),
    )
