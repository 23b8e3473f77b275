"""The prompt cache engine: lookback reads, writes at breakpoints, TTLs, workspaces, and the rule
that a new entry becomes readable only once the response that writes it has begun.

A request is looked up when it arrives (:meth:`PromptCache.plan`): the plan says what it reads,
what it writes and how its input tokens split into ``cache_read_input_tokens``,
``cache_creation_input_tokens`` (5m/1h) and ``input_tokens``. Reads refresh the entry at once;
writes are only *pending* until :meth:`PromptCache.commit` runs when the response begins. So two
parallel cold requests on one prefix both write, as with the real API.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from specproxy.sim.prompt import Prompt, Ttl

Clock = Callable[[], float]
EntryKey = tuple[str, bytes]  # (workspace, prefix key)


@dataclass(slots=True)
class Entry:
    """A cache entry: readable until ``expires_at`` (on the cache's clock)."""

    expires_at: float
    ttl_s: float


@dataclass(frozen=True, slots=True)
class Usage:
    """The input side of a response's ``usage``."""

    input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0

    @property
    def uncached_tokens(self) -> int:
        """Tokens that go through prefill (not read from the cache)."""
        return self.input_tokens + self.cache_creation_input_tokens

    def as_dict(self, output_tokens: int) -> dict[str, object]:
        """The Messages API ``usage`` object."""
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.ephemeral_5m_input_tokens,
                "ephemeral_1h_input_tokens": self.ephemeral_1h_input_tokens,
            },
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }


@dataclass(slots=True)
class CachePlan:
    """What one request reads and writes; its writes land when :meth:`PromptCache.commit` runs."""

    tenant: str
    started_at: float
    usage: Usage
    read_position: int  # -1: nothing read
    writes: list[tuple[bytes, float]] = field(default_factory=list)  # (prefix key, TTL seconds)
    committed: bool = False
    workspace: str = ""  # whose entries: the cache is isolated per workspace ("" = the tenant's own)

    @property
    def owner(self) -> str:
        return self.workspace or self.tenant


class PromptCache:
    """Entries per (workspace, prefix key), bounded in number; the oldest touched is dropped first."""

    def __init__(self, *, clock: Clock, max_entries: int, lookback: int, ttl_5m_s: float, ttl_1h_s: float) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._lookback = lookback
        self._ttl: dict[Ttl, float] = {"5m": ttl_5m_s, "1h": ttl_1h_s}
        self._entries: OrderedDict[EntryKey, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def _readable(self, key: EntryKey, now: float) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= now:
            del self._entries[key]
            return None
        return entry

    def contains(self, workspace: str, prefix_key: bytes) -> bool:
        """Whether ``workspace`` has a readable entry for ``prefix_key`` now."""
        return self._readable((workspace, prefix_key), self._clock()) is not None

    def plan(self, tenant: str, prompt: Prompt, *, min_tokens: int, workspace: str = "") -> CachePlan:
        """Look ``prompt`` up in ``workspace``'s entries (default: the tenant's own) at arrival;
        refresh what it reads, plan what it writes."""
        owner = workspace or tenant
        now = self._clock()
        hit = -1
        for bp in prompt.breakpoints:
            for pos in prompt.lookback_blocks(bp.position, self._lookback):
                if pos <= hit:
                    break
                if self._readable((owner, prompt.keys[pos]), now) is not None:
                    hit = pos
                    break
        if hit >= 0:
            key = (owner, prompt.keys[hit])
            entry = self._entries[key]
            entry.expires_at = max(entry.expires_at, now + entry.ttl_s)
            self._entries.move_to_end(key)
        read = prompt.tokens_through(hit)
        written = [bp for bp in prompt.breakpoints
                   if bp.position > hit and prompt.tokens_through(bp.position) >= min_tokens]
        split: dict[Ttl, int] = {"5m": 0, "1h": 0}
        prev = hit
        for bp in written:
            split[bp.ttl] += prompt.tokens_through(bp.position) - prompt.tokens_through(prev)
            prev = bp.position
        usage = Usage(
            input_tokens=prompt.total_tokens - prompt.tokens_through(prev),
            cache_creation_input_tokens=split["5m"] + split["1h"],
            cache_read_input_tokens=read,
            ephemeral_5m_input_tokens=split["5m"],
            ephemeral_1h_input_tokens=split["1h"],
        )
        return CachePlan(
            tenant=tenant,
            started_at=now,
            usage=usage,
            read_position=hit,
            writes=[(prompt.keys[bp.position], self._ttl[bp.ttl]) for bp in written],
            workspace=workspace,
        )

    def commit(self, plan: CachePlan) -> int:
        """Make the plan's writes readable (its response has begun). Returns entries written."""
        if plan.committed:
            return 0
        plan.committed = True
        for prefix_key, ttl_s in plan.writes:
            key = (plan.owner, prefix_key)
            expires_at = plan.started_at + ttl_s
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = Entry(expires_at=expires_at, ttl_s=ttl_s)
            else:
                entry.expires_at = max(entry.expires_at, expires_at)
                entry.ttl_s = max(entry.ttl_s, ttl_s)
                self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return len(plan.writes)
