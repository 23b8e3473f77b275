"""The warm registry: which prefixes are warming or warm, per tenant, and waiting for them to settle.

One small async :class:`Registry` protocol with two backends: :class:`MemoryRegistry` (the default,
in process) and :class:`~specproxy.registry.redis.RedisRegistry` (replicas sharing warm state; each
keeps a :class:`~specproxy.registry.shared.Mirror`, a memory registry, and Redis carries the rest).

    model.py    states, kinds, Warm, Entry, Match, the Registry protocol
    memory.py   the in-process backend
    shared.py   what replicas exchange (records, notes) and the local mirror
    redis.py    the Redis backend (imported on first use: ``from specproxy.registry import RedisRegistry``)

States:

    warming ──► warm          the warm's response began and its usage shows a cache write or read
        │──────► uncacheable   it succeeded but wrote nothing (prefix under the model's minimum)
        └──────► failed        it got an error; kept ``failed_ttl`` so a storm does not re-send it
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from specproxy.registry.memory import MemoryRegistry
from specproxy.registry.model import Entry, Kind, Match, Registry, State, Warm

if TYPE_CHECKING:
    from specproxy.registry.redis import RedisRegistry

__all__ = ["Entry", "Kind", "Match", "MemoryRegistry", "RedisRegistry", "Registry", "State", "Warm"]


def __getattr__(name: str) -> Any:
    # The Redis backend (and the redis client library) is imported only by those who use it.
    if name == "RedisRegistry":
        from specproxy.registry.redis import RedisRegistry

        return RedisRegistry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
