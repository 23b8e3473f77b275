"""The in-memory registry's own promises, its table, and two registry behaviours seen through the proxy.

Every behaviour both backends share (single flight, states, match, expiry, eviction, isolation, the
warm_timeout) is in tests/test_registry_conformance.py, run against each backend.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from specproxy.keys import REGISTRY
from specproxy.prefix import compute, tenant_digest
from specproxy.registry import Kind, MemoryRegistry, State
from specproxy.registry.table import Table
from specproxy.testing import ManualClock, SimHandle, run_proxy
from tests.conftest import CONTEXT, KEY_A, KEY_B, headers, question_body, warm_body

A = tenant_digest("key-a")
B = tenant_digest("key-b")


def req(n: int = 3, bp: int = 2, ttl: str = "5m", tenant: str = A, text: str = "b") -> Any:
    blocks: list[dict[str, Any]] = [{"type": "text", "text": f"{text}{i}"} for i in range(n)]
    blocks[bp]["cache_control"] = {"type": "ephemeral", "ttl": ttl}
    return compute({"model": "m", "messages": [{"role": "user", "content": blocks}]}, tenant)


def registry(clock: ManualClock, **kw: Any) -> MemoryRegistry:
    opts: dict[str, Any] = {"max_entries": 100, "warm_timeout": 60.0, "failed_ttl": 10.0, "rewarm_margin": 30.0}
    opts.update(kw)
    return MemoryRegistry(clock=clock, **opts)


async def test_wait_returns_false_at_timeout() -> None:
    reg = registry(ManualClock())
    warm, _ = await reg.begin(A, req())
    assert await warm.wait(0.01) is False


async def test_nothing_of_a_warm_is_kept_once_its_entries_expire() -> None:
    clock = ManualClock()
    reg = registry(clock)
    warm, _ = await reg.begin(A, req())
    await reg.settle(warm, State.WARM)
    clock.advance(200)
    m = await reg.match(req())
    assert m is not None
    await reg.touch(m)  # used: it lives 300 s from now
    clock.advance(250)
    assert reg.stats() == {"entries": 1, "ids": 1}
    clock.advance(51)
    assert await reg.get(A, warm.prefix) is None
    assert reg.stats() == {"entries": 0, "ids": 0}  # memory stays bounded by live warms


async def test_a_timed_out_warm_is_dropped_after_its_grace() -> None:
    clock = ManualClock()
    reg = registry(clock)
    await reg.begin(A, req())
    clock.advance(61)
    assert reg.snapshot()[0]["state"] == "failed" and reg.snapshot()[0]["error"] == "timeout"
    clock.advance(10)
    assert reg.stats() == {"entries": 0, "ids": 0} and reg.snapshot() == []


async def test_the_per_tenant_cap_counts_each_tenants_entries() -> None:
    reg = registry(ManualClock(), max_entries=50, max_entries_per_tenant=4)
    for i in range(10):
        await reg.begin(B, req(tenant=B, text=f"f{i}"), kind=Kind.LEADER)
    await reg.begin(A, req())
    assert (reg.count(A), reg.count(B), len(reg)) == (1, 4, 5)


# --- the table -----------------------------------------------------------------------------------


def table(clock: ManualClock, maxsize: int = 10, per_tenant: int | None = 3) -> Table[str, list[Any]]:
    # values: [tenant, expires_at], mutable so that an expiry can move after insertion
    return Table(maxsize=maxsize, per_tenant=per_tenant, clock=clock, tenant=lambda v: v[0], expires=lambda v: v[1])


def test_a_tenant_over_its_cap_evicts_its_own_least_recently_written_key() -> None:
    clock = ManualClock()
    t = table(clock)
    t.put("a1", ["a", 2000.0])
    for i in range(3):
        t.put(f"b{i}", ["b", 2000.0])
    t.put("b0", ["b", 2000.0])  # written again: now b1 is b's oldest
    t.put("b3", ["b", 2000.0])
    assert sorted(k for k in ("a1", "b0", "b1", "b2", "b3") if t.get(k) is not None) == ["a1", "b0", "b2", "b3"]
    assert (t.count("a"), t.count("b"), len(t)) == (1, 3, 4)


def test_the_table_is_bounded_in_total_oldest_first() -> None:
    t = table(ManualClock(), maxsize=3, per_tenant=None)
    for i in range(5):
        t.put(f"k{i}", [f"t{i}", 2000.0])
    assert [t.get(f"k{i}") is not None for i in range(5)] == [False, False, True, True, True]


def test_expired_values_are_never_returned_and_a_moved_expiry_is_read_when_asked() -> None:
    clock = ManualClock()
    t = table(clock)
    later = ["a", 1010.0]
    t.put("later", later)
    t.put("soon", ["a", 1001.0])
    later[1] = 1100.0  # moved on after insertion, without writing it again
    clock.advance(50)
    assert t.get("soon") is None and t.get("later") is later
    assert t.values() == [later] and len(t) == 1
    clock.advance(60)
    assert t.get("later") is None and len(t) == 0 and t.count("a") == 0


def test_an_expiry_moved_earlier_and_written_again_is_dropped_at_its_new_time() -> None:
    clock = ManualClock()
    t = table(clock)
    value = ["a", 1300.0]  # a warming entry...
    t.put("k", value)
    value[1] = 1010.0  # ...settled as failed: kept 10 s
    t.put("k", value)
    for _ in range(200):  # rewrites of a live key queue no new heap item each
        t.put("other", ["b", clock.now + 500.0])
    clock.advance(11)
    assert len(t) == 1 and t.count("a") == 0 and t.get("other") is not None

def test_expired_keys_are_dropped_before_a_live_one_is_evicted() -> None:
    clock = ManualClock()
    t = table(clock, per_tenant=2)
    t.put("old", ["a", 1001.0])
    t.put("live", ["a", 2000.0])
    clock.advance(5)
    t.put("new", ["a", 2000.0])
    assert t.get("live") is not None and t.get("new") is not None


# --- through the proxy ---------------------------------------------------------------------------


async def test_a_tenant_flooding_the_proxy_with_failing_requests_cannot_evict_another_tenants_warm(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    async with run_proxy(sim.url, registry_max_entries=8, max_entries_per_tenant=4) as proxy:
        warm = orjson.dumps(warm_body())
        async with http.post(proxy.url + "/prewarm?wait=1", data=warm, headers=headers(KEY_A)) as r:
            assert (r.status, (await r.json())["state"]) == (200, "warm")
        for i in range(12):  # cold requests of another credential, each leading its own prefix, each failing
            body = question_body(context=CONTEXT + f"# flood {i}\n")
            async with http.post(proxy.url + "/v1/messages", data=orjson.dumps(body),
                                 headers=headers(KEY_B, **{"x-sim-fault": "overloaded"})) as r:
                assert (r.status, r.headers["X-Cache-Warm"]) == (529, "miss")
        registry = proxy.app[REGISTRY]
        assert isinstance(registry, MemoryRegistry)
        assert (registry.count(tenant_digest(KEY_A)), registry.count(tenant_digest(KEY_B))) == (1, 4)
        question = orjson.dumps(question_body())
        async with http.post(proxy.url + "/v1/messages", data=question, headers=headers(KEY_A)) as r:
            assert (r.status, r.headers["X-Cache-Warm"]) == (200, "hit")
            assert (await r.json())["usage"]["cache_read_input_tokens"] > 0


async def test_a_prewarm_still_warming_at_warm_timeout_answers_failed_not_404(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    async with run_proxy(sim.url, warm_timeout=0.3, failed_ttl=30.0) as proxy:
        gate = {"x-sim-gate": "never"}
        async with http.post(proxy.url + "/prewarm", data=orjson.dumps(warm_body()), headers=headers(**gate)) as r:
            warm = await r.json()
        await sim.state.gates.wait_for_waiters("never", 1)  # the warm reached the upstream, which sits on it
        async with http.post(proxy.url + "/prewarm?wait=1", data=orjson.dumps(warm_body()), headers=headers()) as r:
            assert (await r.json())["sent"] is False  # waited for the warm in flight, at most warm_timeout
        async with http.get(f"{proxy.url}/prewarm/{warm['prefix']}", headers=headers()) as r:
            assert r.status == 200
            state = await r.json()
        assert state["state"] == "failed" and state["error"] in ("timeout", "TimeoutError")
        assert state["expires_in_s"] > 0  # remembered failed_ttl, then forgotten
        async with http.get(f"{proxy.url}/prewarm/{warm['prefix']}", headers=headers(KEY_B)) as r:
            assert r.status == 404  # still its own tenant's only
        await sim.open_gate("never")
        assert (await sim.stats())["requests"] == 1  # the timed-out warm was not sent again
