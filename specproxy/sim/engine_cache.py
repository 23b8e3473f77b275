"""The engine dialects' prefix caches: automatic, engine-wide, at the engine's token granularity.

Inference engines cache prefixes on their own (no ``cache_control``, no minimum length, no TTL:
entries live until evicted), so the engine dialects render each request to a token stream and
reuse its longest cached prefix:

- vLLM: automatic prefix caching of full KV blocks (16 tokens by default), a hash chain per block;
- SGLang: RadixAttention, a radix tree over tokens (page size 1 by default);
- llama.cpp: each slot keeps the tokens of its last prompt; a request takes the idle slot whose
  prompt shares the largest fraction of it (``--slot-prompt-similarity``, 0.1), else the least
  recently used one, and reuses the common prefix. With every slot busy it waits for one.

All three recompute at least the prompt's last token (a full hit still needs its logits), so at most
``n - 1`` of ``n`` prompt tokens are read. Sources in ``docs/simulator.md``.

The token stream follows ``specproxy.sim.tokens``: about four characters a token, the same counts
``count_tokens`` reports, with each block's first token marked by its section and role so that the
same text in another role is another token.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from specproxy.sim.tokens import CHARS_PER_TOKEN, DOCUMENT_TOKENS, IMAGE_TOKENS, canonical

Clock = Callable[[], float]
SLOT_PROMPT_SIMILARITY: Final = 0.1  # llama-server's default --slot-prompt-similarity
BILLING_HEADER: Final = "x-anthropic-billing-header"  # vLLM drops this system block (it defeats caching)


def _chunks(marker: str, content: str) -> list[str]:
    out = [content[i:i + CHARS_PER_TOKEN] for i in range(0, len(content), CHARS_PER_TOKEN)]
    if out:
        out[0] = marker + out[0]
    return out


def _opaque(marker: str, value: Any, count: int) -> list[str]:
    digest = hashlib.sha256(canonical(value)).hexdigest()[:16]
    return [f"{marker}{digest}:{i}" for i in range(count)]


def block_token_strings(marker: str, block: Any) -> list[str]:
    """One block as a list of token strings, as many as ``tokens.block_tokens`` counts for it."""
    if isinstance(block, str):
        return _chunks(marker, block)
    if not isinstance(block, dict):
        return _chunks(marker, canonical(block).decode())
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        return _chunks(marker, block["text"])
    if kind == "thinking" and isinstance(block.get("thinking"), str):
        return _chunks(marker, block["thinking"])
    if kind == "image":
        return _opaque(marker, block.get("source"), IMAGE_TOKENS)
    if kind == "document":
        source = block.get("source")
        if isinstance(source, dict) and source.get("type") == "text" and isinstance(source.get("data"), str):
            return _chunks(marker, source["data"])
        return _opaque(marker, source, DOCUMENT_TOKENS)
    if kind == "tool_result":
        content = block.get("content")
        if content is None:
            return [marker + "\x00result"]
        if isinstance(content, str):
            return _chunks(marker, content)
        if isinstance(content, list):
            return [t for b in content for t in block_token_strings(marker, b)]
    return _chunks(marker, canonical(block).decode())


def render_tokens(tools: Any, system: Any, messages: Any, *, drop_billing_header: bool) -> list[str]:
    """The prompt's token stream: tools, system, then every message block (``cache_control`` is
    not part of it: the engines ignore it)."""
    out: list[str] = []
    for tool in tools:
        out += block_token_strings("\x01tool\x02", tool)
    for block in system:
        text = block.get("text", "")
        if drop_billing_header and isinstance(text, str) and text.startswith(BILLING_HEADER):
            continue
        out += block_token_strings("\x01system\x02", block)
    for msg in messages:
        for block in msg.blocks:
            out += block_token_strings(f"\x01{msg.role}\x02", block)
    return out


@dataclass(slots=True)
class Lookup:
    """What one request found in the engine cache; ``commit`` stores its prompt."""

    tokens: list[str]
    cached: int
    slot: int = -1  # llama.cpp: the slot the request runs in
    committed: bool = False
    released: bool = False
    hashes: list[bytes] = field(default_factory=list)


class EngineCache(Protocol):
    block_tokens: int

    async def acquire(self, tokens: list[str]) -> Lookup: ...

    def commit(self, lookup: Lookup) -> int: ...

    def release(self, lookup: Lookup) -> None: ...

    def clear(self) -> None: ...

    def __len__(self) -> int: ...


def _cap(cached: int, n: int, block: int) -> int:
    """At most the full blocks within the first ``n - 1`` tokens: the last token is recomputed."""
    return min(cached, max(n - 1, 0) // block * block)


class BlockCache:
    """vLLM's and SGLang's cache: full blocks of ``block_tokens`` tokens, keyed by a hash chain,
    least recently used evicted first beyond ``max_blocks``."""

    def __init__(self, block_tokens: int, max_blocks: int) -> None:
        self.block_tokens = block_tokens
        self._max = max_blocks
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()

    def _hashes(self, tokens: list[str]) -> list[bytes]:
        size = self.block_tokens
        h = b"engine/1"
        out: list[bytes] = []
        for start in range(0, len(tokens) - size + 1, size):
            h = hashlib.sha256(h + "\x00".join(tokens[start:start + size]).encode()).digest()
            out.append(h)
        return out

    async def acquire(self, tokens: list[str]) -> Lookup:
        hashes = self._hashes(tokens)
        hit = 0
        for h in hashes:
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            hit += 1
        return Lookup(tokens, _cap(hit * self.block_tokens, len(tokens), self.block_tokens), hashes=hashes)

    def commit(self, lookup: Lookup) -> int:
        if lookup.committed:
            return 0
        lookup.committed = True
        new = 0
        for h in lookup.hashes:
            if h in self._blocks:
                self._blocks.move_to_end(h)
            else:
                self._blocks[h] = None
                new += 1
        while len(self._blocks) > self._max:
            self._blocks.popitem(last=False)
        return new * self.block_tokens

    def release(self, lookup: Lookup) -> None:
        lookup.released = True


@dataclass(slots=True)
class _Slot:
    tokens: list[str] = field(default_factory=list)
    last_used: float = 0.0
    busy: bool = False


def _common_prefix(a: list[str], b: list[str]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotCache:
    """llama.cpp's slots: each reuses the prefix its last prompt shares with the next one."""

    block_tokens = 1

    def __init__(self, slots: int, clock: Clock) -> None:
        self._slots = [_Slot() for _ in range(slots)]
        self._clock = clock
        self._freed = asyncio.Event()  # set (and replaced) whenever a slot is released

    def __len__(self) -> int:
        return sum(len(s.tokens) for s in self._slots)

    def clear(self) -> None:
        for slot in self._slots:
            slot.tokens = []

    def slots(self) -> list[dict[str, Any]]:
        """``GET /slots``: each slot's id, cached tokens and state."""
        return [{"id": i, "n_past": len(s.tokens), "is_processing": s.busy} for i, s in enumerate(self._slots)]

    def _choose(self, tokens: list[str]) -> int | None:
        idle = [i for i, s in enumerate(self._slots) if not s.busy]
        if not idle:
            return None
        best, best_sim = None, 0.0
        for i in idle:
            cached = self._slots[i].tokens
            if not cached or not tokens:
                continue
            sim = _common_prefix(cached, tokens) / len(tokens)
            if sim > best_sim:
                best, best_sim = i, sim
        if best is not None and best_sim >= SLOT_PROMPT_SIMILARITY:
            return best
        return min(idle, key=lambda i: self._slots[i].last_used)

    async def acquire(self, tokens: list[str]) -> Lookup:
        while (chosen := self._choose(tokens)) is None:  # every slot busy: the task waits for one
            await self._freed.wait()
        slot = self._slots[chosen]
        slot.busy = True
        slot.last_used = self._clock()
        return Lookup(tokens, _cap(_common_prefix(slot.tokens, tokens), len(tokens), 1), slot=chosen)

    def commit(self, lookup: Lookup) -> int:
        if lookup.committed or lookup.slot < 0:
            return 0
        lookup.committed = True
        self._slots[lookup.slot].tokens = list(lookup.tokens)
        return len(lookup.tokens) - lookup.cached

    def release(self, lookup: Lookup) -> None:
        if lookup.released or lookup.slot < 0:
            return
        lookup.released = True
        self._slots[lookup.slot].busy = False
        self._slots[lookup.slot].last_used = self._clock()
        freed, self._freed = self._freed, asyncio.Event()
        freed.set()


def new_engine_cache(profile: Any, clock: Clock) -> EngineCache | None:
    """The cache of ``profile``'s dialect; ``None`` for the Anthropic dialect (its own cache)."""
    if profile.dialect in ("vllm", "sglang"):
        return BlockCache(profile.block_tokens, profile.max_cache_entries)
    if profile.dialect == "llamacpp":
        return SlotCache(profile.engine_slots, clock)
    return None
