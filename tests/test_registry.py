"""The in-memory warm registry: single flight, states, expiry, isolation, waiting."""

from __future__ import annotations

import asyncio
from typing import Any

from specproxy.prefix import compute, tenant_digest
from specproxy.registry import MemoryRegistry, State

A = tenant_digest("key-a")
B = tenant_digest("key-b")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def req(n: int = 3, bp: int = 2, ttl: str = "5m", tenant: str = A) -> Any:
    blocks: list[dict[str, Any]] = [{"type": "text", "text": f"b{i}"} for i in range(n)]
    blocks[bp]["cache_control"] = {"type": "ephemeral", "ttl": ttl}
    return compute({"model": "m", "messages": [{"role": "user", "content": blocks}]}, tenant)


def registry(clock: Clock, **kw: Any) -> MemoryRegistry:
    opts: dict[str, Any] = {"max_entries": 100, "warm_timeout": 60.0, "failed_ttl": 10.0, "rewarm_margin": 30.0}
    opts.update(kw)
    return MemoryRegistry(clock=clock, **opts)


async def test_second_begin_for_a_warming_prefix_sends_nothing() -> None:
    reg = registry(Clock())
    w1, started1 = await reg.begin(A, req())
    w2, started2 = await reg.begin(A, req())
    assert started1 and not started2 and w1 is w2


async def test_waiters_are_released_when_the_warm_settles() -> None:
    reg = registry(Clock())
    warm, _ = await reg.begin(A, req())
    waiters = [asyncio.create_task(warm.wait(5)) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(t.done() for t in waiters)
    await reg.settle(warm, State.WARM)
    assert await asyncio.gather(*waiters) == [True, True, True]


async def test_wait_returns_false_at_timeout() -> None:
    reg = registry(Clock())
    warm, _ = await reg.begin(A, req())
    assert await warm.wait(0.01) is False


async def test_a_longer_request_matches_through_lookback() -> None:
    reg = registry(Clock())
    warm, _ = await reg.begin(A, req(3, 2))
    await reg.settle(warm, State.WARM)
    m = await reg.match(req(10, 9))
    assert m is not None and m.position == 2 and m.warm is warm


async def test_other_tenant_never_matches_or_reads_state() -> None:
    reg = registry(Clock())
    warm, _ = await reg.begin(A, req())
    assert await reg.match(req(tenant=B)) is None
    assert await reg.get(B, warm.prefix) is None
    assert (await reg.get(A, warm.prefix)) is not None


async def test_warm_entry_expires_with_its_ttl_from_the_warm_start_and_refreshes_on_use() -> None:
    clock = Clock()
    reg = registry(clock)
    warm, _ = await reg.begin(A, req())
    clock.now += 10
    await reg.settle(warm, State.WARM)
    clock.now += 280  # 290 s after the warm started
    m = await reg.match(req())
    assert m is not None
    await reg.touch(m)  # refreshed: 300 s from now
    clock.now += 200
    assert await reg.match(req()) is not None
    clock.now += 101
    assert await reg.match(req()) is None


async def test_failed_warm_is_remembered_for_failed_ttl_only() -> None:
    clock = Clock()
    reg = registry(clock)
    warm, _ = await reg.begin(A, req())
    await reg.settle(warm, State.FAILED, error="overloaded_error")
    _, started = await reg.begin(A, req())
    assert not started
    clock.now += 11
    _, started = await reg.begin(A, req())
    assert started


async def test_warm_near_expiry_may_be_warmed_again() -> None:
    clock = Clock()
    reg = registry(clock)
    warm, _ = await reg.begin(A, req())
    await reg.settle(warm, State.WARM)
    clock.now += 250
    assert (await reg.begin(A, req()))[1] is False
    clock.now += 25  # 25 s left, inside the 30 s margin
    assert (await reg.begin(A, req()))[1] is True


async def test_entries_are_bounded_and_oldest_evicted_first() -> None:
    reg = registry(Clock(), max_entries=3)
    for i in range(5):
        await reg.begin(A, req(3 + i, 2 + i))
    assert len(reg) == 3


async def test_snapshot_shows_ids_and_states_never_content() -> None:
    reg = registry(Clock())
    warm, _ = await reg.begin(A, req())
    snap = reg.snapshot()
    assert snap[0]["prefix"] == warm.prefix and snap[0]["state"] == "warming"
    assert "b0" not in repr(snap)
    assert reg.snapshot(tenant=B) == []


async def test_a_warms_id_is_forgotten_when_its_entries_expire() -> None:
    clock = Clock()
    reg = registry(clock)
    warm, _ = await reg.begin(A, req())
    await reg.settle(warm, State.WARM)
    clock.now += 200
    assert await reg.get(A, warm.prefix) is not None
    m = await reg.match(req())
    assert m is not None
    await reg.touch(m)  # used: it lives 300 s from now
    clock.now += 250
    assert await reg.get(A, warm.prefix) is not None
    clock.now += 51
    assert await reg.get(A, warm.prefix) is None
    assert len(reg._by_id) == 0  # nothing of it is kept: memory stays bounded by live warms
