"""Single flight: the one rule that decides whether a new warm may take a registry key.

A key (one breakpoint's chain value) holds at most one entry. When a warm begins, each of its
breakpoint keys is offered to it; :func:`decide` says whether it takes the key or whether the
warm already there keeps it. For the warm's longest key the answer decides everything: taken, the
caller sends the warm; kept, the caller joins the existing warm and sends nothing. An earlier key
that is kept simply stays with its warm (a live entry is never turned back into a held one).

The rule, for the entry at the key (its state as read, see :func:`reads_as`, and its time left):

    no live entry                                            -> FREE       take it
    warm, with at most rewarm_margin left                    -> REWARM     take it (warm it again)
    warming, a non-streaming leader, and the caller replaces -> TAKE_OVER  take it
    anything else                                            -> KEEP       the entry stays

Who uses it: :class:`~specproxy.registry.memory.MemoryRegistry` (``begin``, ``peek``), and so the
Redis backend's local :class:`~specproxy.registry.shared.Mirror` (itself a memory registry, which
also installs warms learnt from other replicas with it); and the Redis claim script, whose
``may_take`` is :data:`MAY_TAKE_LUA` below, the same rule on what Redis stores (the record's
``s`` and ``kd``, and the key's ``PTTL``). ``tests/test_registry_conformance.py`` runs that Lua in
a real ``redis-server`` against :func:`decide` on a table of cases.
"""

from __future__ import annotations

import enum
from typing import Final

from specproxy.registry.model import Entry, Kind, State


class Take(enum.StrEnum):
    """What :func:`decide` found at a key."""

    FREE = "free"  # no live entry
    REWARM = "rewarm"  # a warm entry within rewarm_margin of its expiry
    TAKE_OVER = "take-over"  # a non-streaming leader still in flight, and the caller replaces it
    KEEP = "keep"  # anything else: the existing warm keeps the key (the caller joins it)

    @property
    def taken(self) -> bool:
        """True when the new warm takes the key."""
        return self is not Take.KEEP


def reads_as(entry: Entry, now: float, failed_ttl: float) -> State:
    """The state ``entry`` reads as at ``now``: its warm's, except that a warm still ``warming``
    past its ``warm_timeout`` reads as ``failed``.

    A warming entry is registered to live ``warm_timeout + failed_ttl``: the last ``failed_ttl`` of
    that is the timed-out warm's grace as a failure (``GET /prewarm/{id}`` answers ``failed``, and a
    storm of /prewarm calls does not re-send it), exactly as long as any failed warm is remembered.
    """
    state = entry.warm.state
    if state is State.WARMING and entry.expires_at - now <= failed_ttl:
        return State.FAILED
    return state


def decide(
    existing: Entry | None, now: float, *, rewarm_margin: float, failed_ttl: float, replace: bool = False
) -> Take:
    """Single flight: may a new warm take the key ``existing`` (its live entry, or None) is at?

    ``replace``: the caller may take over from a non-streaming leader still in flight (a
    coalescing warm: holding behind a whole generation would cost more than a second prefill).
    """
    if existing is None or existing.expires_at <= now:
        return Take.FREE
    state = reads_as(existing, now, failed_ttl)
    if state is State.WARM and existing.expires_at - now <= rewarm_margin:
        return Take.REWARM
    if state is State.FAILED and existing.warm.kind in (Kind.LEADER, Kind.LEADER_JSON):
        return Take.FREE  # a client's own request that never began (e.g. its 400): nothing to protect
    if replace and state is State.WARMING and existing.warm.kind is Kind.LEADER_JSON:
        return Take.TAKE_OVER
    return Take.KEEP


# The same rule in Lua, for the Redis claim script (specproxy.registry.redis prepends it). ``value``
# is the key's record (JSON, or false when the key is absent), ``pttl`` its PTTL in ms; margin and
# failed are rewarm_margin and failed_ttl in ms. Keep it line for line with decide() above.
MAY_TAKE_LUA: Final = """
local function may_take(value, pttl, margin, failed, replace)
  if not value or pttl <= 0 then return true end                      -- FREE
  local old = cjson.decode(value)
  local state = old['s']
  if state == 'warming' and pttl <= failed then state = 'failed' end  -- reads_as: timed out
  if state == 'warm' and pttl <= margin then return true end          -- REWARM
  if state == 'failed' and (old['kd'] == 'leader' or old['kd'] == 'leader-json') then return true end  -- FREE
  if replace and state == 'warming' and old['kd'] == 'leader-json' then return true end  -- TAKE_OVER
  return false                                                        -- KEEP
end
"""
