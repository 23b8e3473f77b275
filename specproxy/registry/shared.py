"""Warms shared between replicas: the shared warm, what replicas tell each other, and the local mirror.

Whatever carries them (:mod:`specproxy.registry.redis` uses Redis), replicas exchange *records*:
one small JSON object per warm naming it (a uid), its tenant, its breakpoint keys and its state,
announced on every begin and settle; and *notes* of uses and refreshes. Each replica keeps every
live warm it has heard of in a :class:`Mirror`, a :class:`MemoryRegistry` that can also adopt
warms another replica began; ``match`` then never leaves the process.

A record (every time is a duration or a wall-clock epoch: replicas share no monotonic clock)::

    {"u": uid, "r": origin replica, "t": tenant digest, "p": 16-hex id, "b": breakpoints,
     "ttl": warm ttl s, "a": started (epoch s), "kd": kind, "k": [[position, chain hex, entry ttl s], ...],
     "s": state, "e": error, "m": mode, "md": model, "us": usage}
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from specproxy.prefix import TTL_SECONDS, Prefix, prefix_id
from specproxy.registry.memory import MemoryRegistry
from specproxy.registry.model import Kind, Match, State, Warm
from specproxy.registry.table import Table

LOST_GRACE: Final = 5.0  # seconds past warm_timeout before an unannounced remote warm is given up


@dataclass(eq=False, slots=True)
class SharedWarm(Warm):
    """A warm with a fleet-wide identity: its uid, the replica that sends it, and its breakpoint keys."""

    uid: str = ""
    origin: str = ""
    spec: tuple[tuple[bytes, int, float], ...] = ()  # its breakpoints: (chain value, position, entry ttl), longest last


def new_warm(
    tenant: str, prefix: Prefix, *, origin: str, now: float, kind: Kind = Kind.PREWARM, ttl_scale: float = 1.0
) -> SharedWarm:
    """A fresh ``warming`` warm for ``prefix``'s breakpoints, begun on replica ``origin``."""
    last = prefix.last_breakpoint
    if last is None:
        raise ValueError("a warm needs at least one breakpoint")
    return SharedWarm(
        tenant=tenant,
        prefix=prefix_id(prefix.key(last.position)),
        breakpoints=len(prefix.breakpoints),
        started_at=now,
        ttl=max(TTL_SECONDS[bp.ttl] for bp in prefix.breakpoints) * ttl_scale,
        kind=kind,
        uid=secrets.token_hex(8),
        origin=origin,
        spec=tuple((prefix.key(bp.position), bp.position, TTL_SECONDS[bp.ttl] * ttl_scale)
                   for bp in prefix.breakpoints),
    )


def to_record(warm: SharedWarm, *, now: float, wall: float | None = None) -> dict[str, Any]:
    """The wire record of ``warm``; ``now`` is the local clock, ``wall`` the epoch (default: now)."""
    wall = time.time() if wall is None else wall
    return {
        "u": warm.uid,
        "r": warm.origin,
        "t": warm.tenant,
        "p": warm.prefix,
        "b": warm.breakpoints,
        "ttl": warm.ttl,
        "a": round(wall - (now - warm.started_at), 6),
        "kd": str(warm.kind),
        "k": [[pos, key.hex(), ttl] for key, pos, ttl in warm.spec],
        "s": str(warm.state),
        "e": warm.error,
        "m": warm.mode,
        "md": warm.model,
        "us": warm.usage,
    }


def from_record(rec: dict[str, Any], *, now: float, wall: float | None = None) -> SharedWarm:
    """A local copy of the warm a record describes (settled already when the record is).

    Raises ``KeyError``, ``TypeError`` or ``ValueError`` on a malformed record.
    """
    wall = time.time() if wall is None else wall
    spec = tuple((bytes.fromhex(str(h)), int(pos), float(ttl)) for pos, h, ttl in rec["k"])
    if not spec:
        raise ValueError("a record names at least one key")
    warm = SharedWarm(
        tenant=str(rec["t"]),
        prefix=str(rec["p"]),
        breakpoints=int(rec["b"]),
        started_at=now - max(0.0, wall - float(rec["a"])),
        ttl=float(rec["ttl"]),
        kind=Kind(rec.get("kd", Kind.PREWARM)),
        uid=str(rec["u"]),
        origin=str(rec["r"]),
        spec=spec,
    )
    state = State(rec["s"])
    if state is not State.WARMING:
        apply_outcome(warm, rec)
        warm.state = state
        warm.settled_at = now
        warm.error = rec.get("e")
        warm._settled.set()
    return warm


def announcement(rec: bytes, remaining_ms: Sequence[int]) -> bytes:
    """A record as announced: plus ``x``, each key's ms left (for first-time receivers).

    The claim script adds ``c``, which keys it gave the warm (``[1, 0, 1]``: one flag per key, in
    order; receivers take exactly those); a replica of an earlier version sent ``"c": 1`` (the
    longest key only).
    """
    return rec[:-1] + b',"x":' + orjson.dumps(list(remaining_ms)) + b"}"


def note(replica: str, warm: SharedWarm, key: bytes | None) -> bytes:
    """The announcement of a use of ``warm`` at ``key`` (``t``), or of a keep-warm refresh (``f``)."""
    if key is None:
        return orjson.dumps({"op": "f", "r": replica, "u": warm.uid})
    return orjson.dumps({"op": "t", "r": replica, "u": warm.uid, "k": key.hex()})


def apply_outcome(warm: Warm, rec: dict[str, Any]) -> None:
    """Copy what the sending replica learnt from the upstream (mode, usage, model) onto ``warm``."""
    warm.mode = rec.get("m") or warm.mode
    warm.usage = rec.get("us") or warm.usage
    warm.model = rec.get("md") or warm.model


class Mirror(MemoryRegistry):
    """This replica's view of every live warm of the fleet: its own, and those it adopted from others.

    Besides the entries of a :class:`MemoryRegistry` it indexes warms by uid, begins its own warms as
    :class:`SharedWarm`, adopts records (a known warm only ever moves forward: ``warming`` to
    settled), and gives up on a remote warm that never announces its outcome (its replica died)
    ``warm_timeout`` plus a grace after it began.
    """

    def __init__(
        self,
        *,
        replica: str,
        max_entries: int,
        warm_timeout: float,
        failed_ttl: float,
        rewarm_margin: float,
        ttl_scale: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_entries_per_tenant: int | None = None,
    ) -> None:
        super().__init__(max_entries=max_entries, warm_timeout=warm_timeout, failed_ttl=failed_ttl,
                         rewarm_margin=rewarm_margin, ttl_scale=ttl_scale, clock=clock,
                         max_entries_per_tenant=max_entries_per_tenant)
        self.ttl_scale = ttl_scale
        self.replica = replica
        per_tenant = min(max_entries_per_tenant, max_entries) if max_entries_per_tenant else None
        # uid → warm, as long as the warm's longest-lived entry (bounded like the entries).
        self._by_uid: Table[str, SharedWarm] = Table(
            maxsize=max_entries, per_tenant=per_tenant, clock=clock,
            expires=lambda w: w.expires_at, tenant=lambda w: w.tenant,
        )
        self._lost: dict[str, asyncio.TimerHandle] = {}

    # -- lookups -----------------------------------------------------------------------------------
    def own(self, uids: Iterable[str]) -> list[SharedWarm]:
        """The warms among ``uids`` this replica still knows."""
        return [warm for uid in list(uids) if (warm := self._by_uid.get(uid)) is not None]

    def known(self) -> list[SharedWarm]:
        """Every warm this replica knows, read at one instant."""
        return self._by_uid.values()

    def remaining(self, warm: SharedWarm, key: bytes, ttl: float, now: float) -> float:
        """Seconds ``warm``'s entry at ``key`` has left: this mirror's view, else what its state implies."""
        entry = self._entries.get(key, now)
        if entry is not None and entry.warm is warm:
            return entry.expires_at - now
        if warm.state is State.WARMING:
            return warm.started_at + self._warm_timeout + self._failed_ttl - now
        if warm.state is State.FAILED:
            return (warm.settled_at or now) + self._failed_ttl - now
        return max(warm.started_at, warm.last_used or 0.0) + ttl - now

    def current(self, warm: Warm) -> Warm:
        """``warm`` as it reads now: failed if it has been warming longer than warm_timeout."""
        self._check_timeout(warm, self._clock())
        return warm

    # -- changes -----------------------------------------------------------------------------------
    def _new_warm(self, tenant: str, prefix: Prefix, kind: Kind, now: float) -> SharedWarm:
        return new_warm(tenant, prefix, origin=self.replica, now=now, kind=kind, ttl_scale=self.ttl_scale)

    def _track(self, warm: Warm) -> None:
        if isinstance(warm, SharedWarm):
            self._by_uid.put(warm.uid, warm)

    async def adopt(
        self,
        rec: dict[str, Any],
        remaining_ms: Sequence[float],
        *,
        taken: Sequence[bool] | None = None,
        claim: bool = False,
    ) -> SharedWarm:
        """Make a record known here and return its warm; ``remaining_ms`` is each key's time left.

        A new warm is installed: at exactly the keys Redis gave it (``taken``), else, when Redis has
        just given it the prefix (``claim``), at its longest key and where the single-flight rule
        lets it take the others, else only where the rule lets it. A known warm only moves forward,
        releasing its holders when the record is settled.
        """
        now = self._clock()
        warm = self._by_uid.get(str(rec["u"]))
        if warm is None:
            warm = from_record(rec, now=now)
            n = len(warm.spec)
            force: list[bool | None] | None = None
            if taken is not None:
                if len(taken) != n:
                    raise ValueError("one flag per key")
                force = [bool(t) for t in taken]
            elif claim:
                force = [*([None] * (n - 1)), True]
            self._install(warm, warm.spec, [now + r / 1000 for r in remaining_ms], force=force)
            if not warm.settled:
                delay = warm.started_at + self._warm_timeout + LOST_GRACE - now
                self._lost[warm.uid] = asyncio.get_running_loop().call_later(delay, self._give_up, warm)
            return warm
        state = State(rec["s"])
        if state is not State.WARMING and not warm.settled:
            apply_outcome(warm, rec)
            await self.settle(warm, state, error=rec.get("e"))
        return warm

    async def apply(self, msg: Any) -> None:
        """An announcement from another replica: a record, a use (``t``) or a refresh (``f``).

        Raises ``KeyError``, ``TypeError``, ``ValueError`` on a malformed one.
        """
        if not isinstance(msg, dict) or msg.get("r") == self.replica:
            return
        op = msg.get("op")
        if op is None:
            c = msg.get("c")
            taken = [bool(t) for t in c] if isinstance(c, list) else None
            await self.adopt(msg, [float(x) for x in msg["x"]], taken=taken, claim=bool(c))
            return
        if op not in ("f", "t"):
            return  # a barrier (see RedisRegistry.sync) or an operation of a later version
        warm = self._by_uid.get(msg["u"])
        if warm is None:
            return
        if op == "f":
            await self.refreshed(warm)
        else:
            key = bytes.fromhex(msg["k"])
            entry = self._entries.get(key)
            if entry is not None and entry.warm is warm:
                await self.touch(Match(entry=entry, position=entry.position, key=key))

    def _give_up(self, warm: SharedWarm) -> None:
        self._lost.pop(warm.uid, None)
        if not warm.settled:
            self._settle_now(warm, State.FAILED, "lost", self._clock())

    def _settled(self, warm: Warm) -> None:
        if isinstance(warm, SharedWarm):
            handle = self._lost.pop(warm.uid, None)
            if handle is not None:
                handle.cancel()

    async def close(self) -> None:
        """Shutdown: as :meth:`MemoryRegistry.close`, wake every waiter (remote warms too) without settling."""
        for handle in self._lost.values():
            handle.cancel()
        self._lost.clear()
        for warm in self.known():
            warm.release_waiters()
        await super().close()
