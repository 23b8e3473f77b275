"""One registry, two backends, the same answers.

Every registry behaviour (begin, single flight, match over the prefix chain, settle, touch, expiry,
the warm_timeout, eviction, the per-tenant cap, peek, tenant isolation) runs against the in-memory
registry and against the Redis backend (two replicas sharing a real ``redis-server``), with the
same expected results. A backend offers two views, ``reg`` and ``other``: the same registry for
memory, two replicas for Redis, so every cross-replica promise is checked where it applies and
costs nothing where it does not. ``quiet()`` is the registry's own barrier (``sync``), never a poll.

Time is a manual clock; for Redis, ``advance`` also moves every key's TTL by as much, so Redis and
the mirrors agree on what has expired (as they do in real time).

The last test runs the claim script's Lua rule in Redis against the Python rule on a table of cases.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from specproxy.prefix import Prefix, compute, prefix_id, tenant_digest
from specproxy.registry import Entry, Kind, MemoryRegistry, RedisRegistry, Registry, State, Warm
from specproxy.registry.rules import Take, decide
from specproxy.registry.shared import SharedWarm, new_warm, to_record
from specproxy.testing import ManualClock
from tests.redis_server import REDIS_SERVER, RedisServer

A = tenant_digest("key-a")
B = tenant_digest("key-b")
OPTS: dict[str, Any] = {"max_entries": 100, "warm_timeout": 60.0, "failed_ttl": 10.0, "rewarm_margin": 30.0}


def req(n: int = 3, bps: tuple[int, ...] = (2,), *, ttl: str = "5m", tenant: str = A, text: str = "b") -> Prefix:
    """``n`` text blocks ``{text}0..``, with a breakpoint on each of ``bps``."""
    blocks: list[dict[str, Any]] = [{"type": "text", "text": f"{text}{i}"} for i in range(n)]
    for bp in bps:
        blocks[bp]["cache_control"] = {"type": "ephemeral", "ttl": ttl}
    return compute({"model": "m", "messages": [{"role": "user", "content": blocks}]}, tenant)


@dataclass(slots=True)
class Backend:
    name: str
    reg: Registry  # where warms begin and settle
    other: Registry  # another replica (memory: the same registry)
    clock: ManualClock
    client: aioredis.Redis | None = None

    async def quiet(self) -> None:
        """Everything ``reg`` did is shared and applied on ``other`` (and back)."""
        await self.reg.sync()
        await self.other.sync()
        await self.reg.sync()

    async def advance(self, seconds: float) -> None:
        await self.quiet()
        self.clock.advance(seconds)
        if self.client is not None:  # time passes in Redis as much as on the replicas' clock
            ms = int(seconds * 1000)
            async for key in self.client.scan_iter(match="specproxy:*"):
                left = await self.client.pttl(key)
                if left > 0:
                    await (self.client.delete(key) if left <= ms else self.client.pexpire(key, left - ms))

    async def found(self, prefix: Prefix, reg: Registry | None = None) -> tuple[int, State, str] | None:
        """What ``prefix`` matches: (position, state, warm id), or None."""
        m = await (reg or self.reg).match(prefix)
        return None if m is None else (m.position, m.warm.state, m.warm.prefix)

    async def both(self, prefix: Prefix) -> list[tuple[int, State, str] | None]:
        """``found`` on both views, after the backend is quiet."""
        await self.quiet()
        return [await self.found(prefix, self.reg), await self.found(prefix, self.other)]


Factory = Callable[..., contextlib.AbstractAsyncContextManager[Backend]]


@pytest.fixture(params=["memory", "redis"])
def make(request: pytest.FixtureRequest) -> Factory:
    """``async with make(**overrides) as b``: a backend with ``OPTS`` plus ``overrides``."""
    if request.param == "redis" and REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")

    @contextlib.asynccontextmanager
    async def factory(**overrides: Any) -> AsyncIterator[Backend]:
        clock = ManualClock()
        opts = {**OPTS, **overrides}
        if request.param == "memory":
            reg = MemoryRegistry(clock=clock, **opts)
            yield Backend("memory", reg, reg, clock)
            await reg.close()
            return
        server = RedisServer()
        await server.start()
        regs = [RedisRegistry(server.url, clock=clock, op_timeout=2.0, reconnect_max=0.2, **opts) for _ in range(2)]
        client = aioredis.Redis.from_url(server.url)
        try:
            for r in regs:
                await r.start()
            assert not any(r.degraded for r in regs)
            yield Backend("redis", regs[0], regs[1], clock, client)
            assert not any(r.degraded for r in regs)  # every answer above came from shared state
        finally:
            for r in regs:
                await r.close()
            await client.aclose()
            await server.close()

    return factory


# --- begin and single flight ----------------------------------------------------------------------


async def test_begin_registers_a_warming_warm_at_each_breakpoint(make: Factory) -> None:
    async with make() as b:
        p = req(8, (2, 5))
        warm, started = await b.reg.begin(A, p)
        assert started
        assert (warm.state, warm.kind, warm.breakpoints, warm.prefix) == (
            State.WARMING, Kind.PREWARM, 2, prefix_id(p.key(5)))
        assert await b.both(p) == [(5, State.WARMING, warm.prefix)] * 2
        assert await b.both(req(3, (2,))) == [(2, State.WARMING, warm.prefix)] * 2  # the earlier breakpoint


async def test_a_second_begin_joins_the_warm_in_flight_on_any_replica(make: Factory) -> None:
    async with make() as b:
        first, started = await b.reg.begin(A, req())
        again, again_started = await b.reg.begin(A, req())
        assert started and not again_started and again is first
        await b.quiet()
        there, there_started = await b.other.begin(A, req())
        assert not there_started and (there.prefix, there.state) == (first.prefix, State.WARMING)


async def test_concurrent_begins_on_one_replica_start_exactly_one_warm(make: Factory) -> None:
    async with make() as b:
        for kind in (Kind.PREWARM, Kind.LEADER):
            p = req(text=str(kind))
            results = await asyncio.gather(*(b.reg.begin(A, p, kind=kind) for _ in range(5)))
            assert sorted(started for _, started in results) == [False] * 4 + [True]
            assert len({warm.prefix for warm, _ in results}) == 1


async def test_a_leaders_begin_is_decided_before_it_returns(make: Factory) -> None:
    async with make() as b:
        leader, started = await b.reg.begin(A, req(), kind=Kind.LEADER)
        assert started and leader.kind is Kind.LEADER
        assert await b.found(req()) == (2, State.WARMING, leader.prefix)  # no sharing awaited: already here
        assert await b.both(req()) == [(2, State.WARMING, leader.prefix)] * 2


async def test_a_warm_entry_is_not_warmed_again_until_it_nears_expiry(make: Factory) -> None:
    async with make() as b:
        warm, _ = await b.reg.begin(A, req())
        await b.reg.settle(warm, State.WARM)
        await b.advance(260)  # 40 s left: outside the 30 s margin
        assert (await b.reg.begin(A, req()))[1] is False
        assert await b.other.peek(req()) is not None
        await b.advance(15)  # 25 s left: inside it
        assert await b.other.peek(req()) is None
        rewarm, started = await b.reg.begin(A, req())
        assert started and rewarm is not warm and rewarm.prefix == warm.prefix
        assert await b.both(req()) == [(2, State.WARMING, warm.prefix)] * 2


async def test_an_uncacheable_prefix_is_not_warmed_again_while_it_lives(make: Factory) -> None:
    async with make() as b:
        warm, _ = await b.reg.begin(A, req())
        await b.reg.settle(warm, State.UNCACHEABLE)
        await b.advance(290)  # 10 s left: an uncacheable entry is never re-warmed early
        assert (await b.reg.begin(A, req()))[1] is False
        await b.advance(11)
        assert await b.both(req()) == [None, None]
        assert (await b.reg.begin(A, req()))[1] is True


async def test_a_failed_warm_is_remembered_for_failed_ttl_only(make: Factory) -> None:
    async with make() as b:
        warm, _ = await b.reg.begin(A, req())
        await b.reg.settle(warm, State.FAILED, error="overloaded_error")
        assert await b.both(req()) == [(2, State.FAILED, warm.prefix)] * 2
        assert (await b.other.begin(A, req()))[1] is False
        await b.advance(11)
        assert await b.both(req()) == [None, None]
        assert (await b.reg.begin(A, req()))[1] is True


async def test_a_coalescing_warm_replaces_a_non_streaming_leader_only(make: Factory) -> None:
    async with make() as b:
        slow, _ = await b.reg.begin(A, req(text="json"), kind=Kind.LEADER_JSON)
        streaming, _ = await b.reg.begin(A, req(text="sse"), kind=Kind.LEADER)
        await b.quiet()
        assert await b.other.peek(req(text="json")) is not None
        assert await b.other.peek(req(text="json"), replace=True) is None
        assert await b.other.peek(req(text="sse"), replace=True) is not None
        helper, started = await b.other.begin(A, req(text="json"), kind=Kind.COALESCE, replace=True)
        assert started and helper.kind is Kind.COALESCE
        kept, kept_started = await b.other.begin(A, req(text="sse"), kind=Kind.COALESCE, replace=True)
        assert not kept_started and kept.prefix == streaming.prefix
        await b.quiet()
        for view in (b.reg, b.other):
            m = await view.match(req(text="json"))
            assert m is not None and m.warm.kind is Kind.COALESCE
        # a settled leader is not taken over either
        await b.reg.settle(streaming, State.WARM)
        assert (await b.other.begin(A, req(text="sse"), kind=Kind.COALESCE, replace=True))[1] is False
        assert slow.state is State.WARMING  # the replaced leader still settles its own holders


async def test_peek_sends_and_registers_nothing(make: Factory) -> None:
    async with make() as b:
        assert await b.reg.peek(req()) is None
        assert await b.both(req()) == [None, None]
        assert len(b.reg) == 0
        warm, _ = await b.reg.begin(A, req())
        found = await b.reg.peek(req())
        assert found is not None and found.prefix == warm.prefix


# --- match ----------------------------------------------------------------------------------------


async def test_match_takes_the_longest_registered_prefix_within_the_lookback(make: Factory) -> None:
    async with make() as b:
        short, _ = await b.reg.begin(A, req(3, (2,)))
        long, _ = await b.reg.begin(A, req(7, (6,)))
        await b.reg.settle(short, State.WARM)
        assert await b.both(req(12, (11,))) == [(6, State.WARMING, long.prefix)] * 2
        assert await b.both(req(5, (4,))) == [(2, State.WARM, short.prefix)] * 2
        assert await b.both(req(30, (29,))) == [None, None]  # 2 and 6 are more than 20 blocks back
        assert await b.both(req(30, (3, 29))) == [(2, State.WARM, short.prefix)] * 2  # the first breakpoint's window
        assert await b.both(req(3, (2,), tenant=B)) == [None, None]


# --- settle, touch, expiry ------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "error"), [(State.WARM, None), (State.UNCACHEABLE, None),
                                              (State.FAILED, "overloaded_error")])
async def test_a_settle_releases_every_waiter_with_its_state(make: Factory, state: State, error: str | None) -> None:
    async with make() as b:
        warm, _ = await b.reg.begin(A, req())
        await b.quiet()
        matches = [await view.match(req()) for view in (b.reg, b.other)]
        waits = [asyncio.create_task(m.warm.wait(30)) for m in matches if m is not None]
        assert len(waits) == 2
        await asyncio.sleep(0)
        assert not any(w.done() for w in waits)
        warm.mode = "0"  # what the warmer learnt upstream travels with the outcome
        await b.reg.settle(warm, state, error=error)
        assert await asyncio.gather(*waits) == [True, True]
        seen = [(m.warm.state, m.warm.error, m.warm.mode) for m in matches if m is not None]
        assert seen == [(state, error, "0")] * 2
        await b.reg.settle(warm, State.FAILED, error="late")  # the first outcome is final
        assert await b.both(req()) == [(2, state, warm.prefix)] * 2


async def test_a_warm_entry_lives_its_ttl_from_the_warm_start_and_from_each_use(make: Factory) -> None:
    async with make() as b:
        warm, _ = await b.reg.begin(A, req())
        await b.advance(10)
        await b.reg.settle(warm, State.WARM)
        await b.advance(280)  # 290 s after the warm started
        await b.quiet()
        m = await b.other.match(req())
        assert m is not None
        await b.other.touch(m)  # a use on any replica: 300 s from now, and counted on the warm
        await b.quiet()
        assert warm.uses == 1 and warm.last_used is not None
        await b.advance(200)
        assert await b.both(req()) == [(2, State.WARM, warm.prefix)] * 2
        await b.advance(101)
        assert await b.both(req()) == [None, None]
        assert await b.reg.get(A, warm.prefix) is None  # its id goes with its entries


async def test_a_touch_counts_a_use_of_any_state_but_refreshes_only_a_warm_entry(make: Factory) -> None:
    async with make() as b:
        warm, _ = await b.reg.begin(A, req())
        m = await b.reg.match(req())
        assert m is not None
        await b.reg.touch(m)
        assert warm.uses == 1
        await b.reg.settle(warm, State.UNCACHEABLE)
        await b.advance(250)
        m = await b.reg.match(req())
        assert m is not None
        await b.reg.touch(m)
        await b.advance(51)  # 301 s after the start: an uncacheable entry is not kept alive by reads
        assert await b.both(req()) == [None, None]
        assert warm.uses == 2


async def test_a_keep_warm_refresh_gives_every_entry_a_ttl_from_now(make: Factory) -> None:
    async with make() as b:
        p = req(8, (2, 5))
        warm, _ = await b.reg.begin(A, p)
        await b.reg.settle(warm, State.WARM)
        await b.advance(250)
        await b.reg.refreshed(warm)
        await b.advance(250)  # 500 s after the start, 250 after the refresh
        assert await b.both(p) == [(5, State.WARM, warm.prefix)] * 2
        assert await b.both(req(3, (2,))) == [(2, State.WARM, warm.prefix)] * 2
        await b.advance(51)
        assert await b.both(p) == [None, None]


async def test_a_1h_breakpoint_lives_an_hour(make: Factory) -> None:
    async with make() as b:
        warm, _ = await b.reg.begin(A, req(ttl="1h"))
        await b.reg.settle(warm, State.WARM)
        await b.advance(3000)
        assert await b.both(req(ttl="1h")) == [(2, State.WARM, warm.prefix)] * 2
        await b.advance(601)
        assert await b.both(req(ttl="1h")) == [None, None]


async def test_a_warm_still_warming_at_warm_timeout_reads_as_failed_for_failed_ttl(make: Factory) -> None:
    async with make() as b:
        warm, _ = await b.reg.begin(A, req())
        await b.advance(59)
        assert await b.both(req()) == [(2, State.WARMING, warm.prefix)] * 2
        await b.advance(2)  # nothing settled it within warm_timeout (60 s)
        for view in (b.reg, b.other):
            found = await view.get(A, warm.prefix)
            assert found is not None
            assert (found[0].state, found[0].error) == (State.FAILED, "timeout")
        assert await b.both(req()) == [(2, State.FAILED, warm.prefix)] * 2
        assert (await b.other.begin(A, req()))[1] is False  # a failure is not re-sent for failed_ttl
        await b.reg.settle(warm, State.WARM)  # too late: the outcome stays failed
        assert warm.state is State.FAILED
        await b.advance(9)
        assert await b.reg.get(A, warm.prefix) is None
        assert await b.both(req()) == [None, None]
        assert (await b.reg.begin(A, req()))[1] is True


# --- bounds ---------------------------------------------------------------------------------------


async def test_entries_are_bounded_and_the_oldest_is_evicted_first(make: Factory) -> None:
    async with make(max_entries=3) as b:
        warms = [(await b.reg.begin(A, req(text=f"w{i}")))[0] for i in range(5)]
        await b.quiet()
        assert len(b.reg) == len(b.other) == 3
        for i, warm in enumerate(warms):
            expected = None if i < 2 else (2, State.WARMING, warm.prefix)
            assert await b.both(req(text=f"w{i}")) == [expected] * 2


async def test_a_tenant_filling_the_registry_evicts_only_its_own_entries(make: Factory) -> None:
    async with make(max_entries=12, max_entries_per_tenant=4) as b:
        kept = []
        for i in range(2):
            warm, _ = await b.reg.begin(A, req(text=f"a{i}"))
            await b.reg.settle(warm, State.WARM)
            kept.append(warm)
        flood = []
        for i in range(20):  # cold requests of another tenant whose upstream calls all fail
            leader, started = await b.reg.begin(B, req(tenant=B, text=f"f{i}"), kind=Kind.LEADER)
            assert started
            await b.reg.settle(leader, State.FAILED, error="leader request failed")
            flood.append(leader)
        await b.quiet()
        for i, warm in enumerate(kept):
            assert await b.both(req(text=f"a{i}")) == [(2, State.WARM, warm.prefix)] * 2
        for i, leader in enumerate(flood):  # B keeps its 4 newest, and pushed nobody else out
            expected = None if i < 16 else (2, State.FAILED, leader.prefix)
            assert await b.both(req(tenant=B, text=f"f{i}")) == [expected] * 2
        assert len(b.reg) == len(b.other) == 6


# --- isolation and views --------------------------------------------------------------------------


async def test_another_tenant_never_matches_reads_or_sees_a_warm(make: Factory) -> None:
    async with make() as b:
        warm, _ = await b.reg.begin(A, req())
        await b.reg.settle(warm, State.WARM)
        await b.quiet()
        for view in (b.reg, b.other):
            assert await view.match(req(tenant=B)) is None
            assert await view.get(B, warm.prefix) is None
            assert await view.get(A, "not-an-id") is None
            found = await view.get(A, warm.prefix)
            assert found is not None and found[0].state is State.WARM and found[1] is not None
            assert view.snapshot(tenant=B) == []
        assert (await b.other.begin(B, req(tenant=B)))[1] is True  # its own warm, not a join


async def test_snapshot_shows_ids_and_states_never_content(make: Factory) -> None:
    async with make() as b:
        warm, _ = await b.reg.begin(A, req(text="secret-prompt-text"))
        await b.quiet()
        for view in (b.reg, b.other):
            snap = view.snapshot()
            assert [(row["prefix"], row["state"]) for row in snap] == [(warm.prefix, "warming")]
            assert "secret-prompt-text" not in repr(snap)


# --- the Lua rule is the Python rule --------------------------------------------------------------

# (state at the key, its kind, seconds it has left, replace) -> what decide() answers. Warming
# entries live warm_timeout (60) + failed_ttl (10): 5 s left is a warm that timed out.
CASES: list[tuple[State | None, Kind, float, bool, Take]] = [
    (None, Kind.PREWARM, 0, False, Take.FREE),
    (None, Kind.PREWARM, 0, True, Take.FREE),
    (State.WARM, Kind.PREWARM, 200, False, Take.KEEP),
    (State.WARM, Kind.PREWARM, 20, False, Take.REWARM),
    (State.WARM, Kind.LEADER_JSON, 20, True, Take.REWARM),
    (State.WARM, Kind.LEADER_JSON, 200, True, Take.KEEP),
    (State.WARMING, Kind.PREWARM, 65, False, Take.KEEP),
    (State.WARMING, Kind.PREWARM, 65, True, Take.KEEP),
    (State.WARMING, Kind.LEADER, 65, True, Take.KEEP),
    (State.WARMING, Kind.LEADER_JSON, 65, False, Take.KEEP),
    (State.WARMING, Kind.LEADER_JSON, 65, True, Take.TAKE_OVER),
    (State.WARMING, Kind.LEADER_JSON, 5, True, Take.FREE),  # timed out: reads as failed; a failed leader is free
    (State.WARMING, Kind.LEADER, 5, False, Take.FREE),
    (State.WARMING, Kind.PREWARM, 5, False, Take.KEEP),
    (State.FAILED, Kind.PREWARM, 5, False, Take.KEEP),
    (State.FAILED, Kind.LEADER_JSON, 5, True, Take.FREE),  # a request that never began protects nothing
    (State.FAILED, Kind.LEADER, 5, False, Take.FREE),
    (State.FAILED, Kind.COALESCE, 5, True, Take.KEEP),
    (State.UNCACHEABLE, Kind.PREWARM, 200, False, Take.KEEP),
    (State.UNCACHEABLE, Kind.PREWARM, 20, False, Take.KEEP),
    (State.UNCACHEABLE, Kind.LEADER_JSON, 20, True, Take.KEEP),
]


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH (apt-get install redis-server)")
async def test_the_claim_scripts_lua_rule_agrees_with_decide_on_every_case() -> None:
    clock = ManualClock()
    server = RedisServer()
    await server.start()
    reg = RedisRegistry(server.url, clock=clock, op_timeout=2.0, **OPTS)
    client = aioredis.Redis.from_url(server.url)
    try:
        await reg.start()

        async def place(p: Prefix, position: int, state: State, kind: Kind, left: float) -> str:
            """Another replica's record at ``p``'s key for ``position``, written straight into Redis."""
            other = new_warm(A, p, origin="elsewhere", now=clock(), kind=kind)
            rec = to_record(other, now=clock())
            rec["s"] = str(state)
            await client.set(f"specproxy:w:{{{A[:16]}}}:{p.key(position).hex()}", orjson.dumps(rec),
                             px=int(left * 1000))
            return other.uid

        async def holder(p: Prefix, position: int) -> str | None:
            raw = await client.get(f"specproxy:w:{{{A[:16]}}}:{p.key(position).hex()}")
            return None if raw is None else str(orjson.loads(raw)["u"])

        for i, (state, kind, left, replace, expected) in enumerate(CASES):
            python = decide(
                None if state is None else Entry(Warm(A, "x", 1, clock(), 300.0, state=state, kind=kind), 2, 300.0,
                                                 clock() + left),
                clock(), rewarm_margin=OPTS["rewarm_margin"], failed_ttl=OPTS["failed_ttl"], replace=replace)
            assert python is expected, (i, state, kind, left, replace)
            # At the longest key: the claim succeeds exactly when the rule lets it take the key.
            # This replica's mirror has never heard of the record, so only the script decides.
            p = req(8, (2, 5), text=f"case{i}-")
            placed = None if state is None else await place(p, 5, state, kind, left)
            claim_kind = Kind.COALESCE if replace else Kind.PREWARM
            warm, started = await reg.begin(A, p, kind=claim_kind, replace=replace)
            await reg.sync()
            assert started is expected.taken, (i, state, kind, left, replace)
            assert isinstance(warm, SharedWarm)
            # taken: this warm holds the key in Redis; kept: the record placed there does, and is the answer
            assert await holder(p, 5) == (warm.uid if expected.taken else placed)
            assert (warm.uid == placed) is not expected.taken
            # At an earlier key (the longest free): the key is taken exactly when the rule says so.
            q = req(8, (2, 5), text=f"early{i}-")
            if state is not None:
                await place(q, 2, state, kind, left)
            warm, started = await reg.begin(A, q, kind=claim_kind, replace=replace)
            await reg.sync()
            assert started and isinstance(warm, SharedWarm) and await holder(q, 5) == warm.uid
            assert (await holder(q, 2) == warm.uid) is expected.taken, (i, state, kind, left, replace)
        assert not reg.degraded
    finally:
        await reg.close()
        await client.aclose()
        await server.close()
