"""A bounded map whose values expire, with a cap per tenant: the registry's storage.

Each value knows its tenant and when it expires (read through the two functions the table is
built with, at the moment of asking, so a value whose expiry moves needs no re-insertion to be
read right). Bounds, checked on every insertion of a new key:

- ``per_tenant``: a tenant holding that many keys evicts its own least recently written one, so no
  tenant, however many warms it starts (failed leaders, say), can push out another tenant's;
- ``maxsize``: the whole table, the least recently written key first (a backstop: with
  ``per_tenant`` below it, one tenant alone never reaches it).

Expired values are never returned, and are dropped (a heap of expiry times, popped lazily) before
anything live is evicted. A write that moves a value's expiry later costs no heap work: the key's
earlier heap item, once due, finds the value still live and is queued again at its new expiry.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_HEAP_SLACK = 2  # rebuild the expiry heap once it holds this many times more items than the table


class Table(Generic[K, V]):
    """Keys to values, each living until ``expires(value)``, bounded in total and per ``tenant(value)``."""

    def __init__(
        self,
        *,
        maxsize: int,
        per_tenant: int | None,
        expires: Callable[[V], float],
        tenant: Callable[[V], str],
        clock: Callable[[], float],
    ) -> None:
        if maxsize < 1 or (per_tenant is not None and per_tenant < 1):
            raise ValueError("a table holds at least one key")
        self.maxsize = maxsize
        self.per_tenant = per_tenant
        self._expires = expires
        self._tenant = tenant
        self._clock = clock
        self._data: OrderedDict[K, V] = OrderedDict()  # least recently written first
        self._by_tenant: dict[str, OrderedDict[K, None]] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._due: dict[K, tuple[float, int]] = {}  # each key's live heap item: (time, seq)
        self._seq = itertools.count()

    # -- reading ---------------------------------------------------------------------------------
    def get(self, key: K, now: float | None = None) -> V | None:
        """The live value at ``key``, or None (an expired one is dropped)."""
        value = self._data.get(key)
        if value is None:
            return None
        if self._expires(value) <= (self._clock() if now is None else now):
            self._remove(key)
            return None
        return value

    def values(self) -> list[V]:
        """Every live value, least recently written first."""
        now = self._clock()
        self.expire(now)
        expires = self._expires
        return [value for value in self._data.values() if expires(value) > now]

    def count(self, tenant: str) -> int:
        """Keys ``tenant`` holds (live, once expired ones are dropped)."""
        self.expire()
        return len(self._by_tenant.get(tenant, ()))

    def __len__(self) -> int:
        self.expire()
        return len(self._data)

    # -- writing ---------------------------------------------------------------------------------
    def put(self, key: K, value: V) -> None:
        """Insert or replace ``key``'s value (it becomes the most recently written), then bound the table."""
        now = self._clock()
        self.expire(now)
        tenant = self._tenant(value)
        old = self._data.get(key)
        if old is not None and self._tenant(old) != tenant:
            self._remove(key)
            old = None
        if old is None:
            keys = self._by_tenant.get(tenant)
            if keys is None:
                keys = self._by_tenant[tenant] = OrderedDict()
            if self.per_tenant is not None and len(keys) >= self.per_tenant:
                self._remove(next(iter(keys)))  # the tenant's own oldest
                keys = self._by_tenant.setdefault(tenant, OrderedDict())
            if len(self._data) >= self.maxsize:
                self._remove(next(iter(self._data)))  # the table's oldest
                keys = self._by_tenant.setdefault(tenant, OrderedDict())
            keys[key] = None
        else:
            self._by_tenant[tenant].move_to_end(key)
        self._data[key] = value
        self._data.move_to_end(key)
        expires = self._expires(value)
        due = self._due.get(key)
        if due is None or expires < due[0]:  # an expiry that moved later needs no new heap item
            self._schedule(key, expires)

    def pop(self, key: K) -> V | None:
        """Remove ``key``; its value, or None."""
        value = self._data.get(key)
        if value is not None:
            self._remove(key)
        return value

    def expire(self, now: float | None = None) -> None:
        """Drop every value whose expiry has passed."""
        now = self._clock() if now is None else now
        heap = self._heap
        if len(heap) > _HEAP_SLACK * len(self._data) + 64:
            self._heap = heap = [(t, seq, k) for k, (t, seq) in self._due.items()]
            heapq.heapify(heap)
        while heap and heap[0][0] <= now:
            _, seq, key = heapq.heappop(heap)
            due = self._due.get(key)
            if due is None or due[1] != seq:
                continue  # superseded by an earlier expiry, or removed since
            expires = self._expires(self._data[key])
            if expires <= now:
                self._remove(key)
            else:
                self._schedule(key, expires)  # its expiry moved on meanwhile

    def _schedule(self, key: K, expires: float) -> None:
        seq = next(self._seq)
        self._due[key] = (expires, seq)
        heapq.heappush(self._heap, (expires, seq, key))

    def clear(self) -> None:
        self._data.clear()
        self._by_tenant.clear()
        self._heap.clear()
        self._due.clear()

    def _remove(self, key: K) -> None:
        value = self._data.pop(key)
        del self._due[key]
        tenant = self._tenant(value)
        keys = self._by_tenant.get(tenant)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._by_tenant[tenant]
