"""Speculation without being asked: coalescing, next-turn warms, keep-warm, breakpoint injection."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from specproxy.keys import METRICS, REGISTRY, SPECULATOR
from specproxy.registry import Kind, State
from specproxy.testing import ProxyHandle, SimHandle, run_proxy, run_sim
from tests.conftest import CONTEXT, KEY_A, KEY_B, MODEL, eventually, headers, question_body, warm_body


async def ask(http: aiohttp.ClientSession, proxy: ProxyHandle, body: dict[str, Any], key: str = KEY_A,
              **extra: str) -> tuple[aiohttp.ClientResponse, dict[str, Any]]:
    async with http.post(proxy.url + "/v1/messages", data=orjson.dumps(body), headers=headers(key, **extra)) as r:
        if r.content_type == "text/event-stream":
            text = await r.text()
            start = next(line for line in text.splitlines() if line.startswith("data:") and "message_start" in line)
            return r, orjson.loads(start[5:])["message"]
        return r, await r.json()


def metric(proxy: ProxyHandle, name: str, **labels: str) -> float:
    value = proxy.app[METRICS].registry.get_sample_value(name, labels)
    return value or 0.0


# --- coalescing ------------------------------------------------------------------------------------

async def test_ten_parallel_cold_streaming_requests_write_the_cache_once(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    # The gate holds whichever request reaches the simulator first (the leader) until we open it.
    tasks = [asyncio.create_task(ask(http, proxy, question_body(f"q{i}?", stream=True), **{"x-sim-gate": "g"}))
             for i in range(10)]
    await proxy.until_held(9)
    await sim.state.gates.wait_for_waiters("g", 1)
    assert (await sim.stats())["requests"] == 1  # only the leader went, and it waits at the gate
    await sim.open_gate("g")
    answers = await asyncio.gather(*tasks)
    outcomes = sorted(r.headers["X-Cache-Warm"] for r, _ in answers)
    assert outcomes == ["held"] * 9 + ["miss"]
    stats = await sim.stats()
    assert stats["cache_writes"] == 1 and stats["cache_reads"] == 9
    assert metric(proxy, "specproxy_coalesced_total") == 9


async def test_followers_of_a_non_streaming_leader_hold_on_the_proxys_own_warm(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    tasks = [asyncio.create_task(ask(http, proxy, question_body(f"q{i}?"), **{"x-sim-gate": "g"}))
             for i in range(10)]
    await proxy.until_held(9)
    await sim.state.gates.wait_for_waiters("g", 2)  # the proxy's warm is sent in the background
    log = [e for e in await sim.requests() if e["path"] == "/v1/messages"]
    assert sorted(e["max_tokens"] for e in log) == [0, 64]  # the leader and one max_tokens 0 warm
    await sim.open_gate("g")
    answers = await asyncio.gather(*tasks)
    assert sorted(r.headers["X-Cache-Warm"] for r, _ in answers) == ["held"] * 9 + ["miss"]
    stats = await sim.stats()
    # Two writes (the leader's and the warm's) instead of ten; every follower reads.
    assert stats["cache_writes"] == 2 and stats["cache_reads"] == 9


async def test_coalescing_never_holds_another_tenant(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    leader = asyncio.create_task(ask(http, proxy, question_body(stream=True), **{"x-sim-gate": "a"}))
    await sim.state.gates.wait_for_waiters("a", 1)
    r, _ = await ask(http, proxy, question_body(stream=True), key=KEY_B)
    assert r.headers["X-Cache-Warm"] == "miss" and r.headers["X-Cache-Warm-Wait-Ms"] == "0"
    await sim.open_gate("a")
    await leader


async def test_coalescing_off_lets_every_cold_request_write(sim: SimHandle, http: aiohttp.ClientSession) -> None:
    async with run_proxy(sim.url, coalesce=False) as proxy:
        tasks = [asyncio.create_task(ask(http, proxy, question_body(f"q{i}?", stream=True),
                                         **{"x-sim-gate": "g"})) for i in range(3)]
        await sim.state.gates.wait_for_waiters("g", 3)  # all three reached the upstream: none was held
        await sim.open_gate("g")
        await asyncio.gather(*tasks)
        assert (await sim.stats())["cache_writes"] == 3


# --- next-turn warm ----------------------------------------------------------------------------------

async def _two_turns(http: aiohttp.ClientSession, proxy: ProxyHandle, sim: SimHandle, *, stream: bool) -> None:
    turn1 = question_body("Summarise function_7.", stream=stream)
    r1, msg1 = await ask(http, proxy, turn1, **{"x-cache-warm-next": "1"})
    assert r1.status == 200
    if stream:  # rebuild the reply as an SDK would, from the stream's text
        async with http.post(proxy.url + "/v1/messages", data=orjson.dumps({**turn1, "stream": False}),
                             headers=headers()) as r:
            reply = (await r.json())["content"]
    else:
        reply = msg1["content"]
    await eventually(lambda: metric(proxy, "specproxy_next_turn_warms_total", result="sent") == 1)
    await eventually(lambda: all(w["state"] != "warming" for w in proxy.app[REGISTRY].snapshot()))
    turn2 = {**turn1, "messages": [
        turn1["messages"][0],
        {"role": "assistant", "content": reply},
        {"role": "user", "content": [
            {"type": "text", "text": "And function_8?", "cache_control": {"type": "ephemeral"}}]},
    ]}
    turn2.pop("stream", None)
    r2, msg2 = await ask(http, proxy, turn2)
    assert r2.headers["X-Cache-Warm"] == "hit"
    usage = msg2["usage"]
    # Everything up to and including the reply was read; only the new question was written.
    assert usage["cache_read_input_tokens"] > msg1["usage"]["cache_creation_input_tokens"]
    assert 0 < usage["cache_creation_input_tokens"] <= 10
    assert metric(proxy, "specproxy_next_turn_warms_total", result="used") == 1


async def test_next_turn_warm_makes_turn_two_read_all_of_turn_one_with_its_reply(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    await _two_turns(http, proxy, sim, stream=False)


async def test_next_turn_warm_after_a_streamed_reply(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    await _two_turns(http, proxy, sim, stream=True)


async def test_next_turn_is_off_unless_asked(proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession) -> None:
    await ask(http, proxy, question_body())
    assert (await sim.stats())["requests"] == 1
    assert metric(proxy, "specproxy_next_turn_warms_total", result="sent") == 0


# --- keep-warm ---------------------------------------------------------------------------------------

async def test_an_idle_prefix_kept_warm_past_its_ttl_is_read_not_rewritten(http: aiohttp.ClientSession) -> None:
    scale = 0.004  # TTL 5 min -> 1.2 s, on both sides
    async with run_sim(time_scale=scale) as sim, run_proxy(
        sim.url, cache_ttl_scale=scale, keep_warm=True, keep_warm_margin=0.4
    ) as proxy:
        async with http.post(proxy.url + "/prewarm?wait=1", data=orjson.dumps(warm_body()), headers=headers()) as r:
            assert (await r.json())["state"] == "warm"
        r, _ = await ask(http, proxy, question_body())
        assert r.headers["X-Cache-Warm"] == "hit"
        await eventually(lambda: metric(proxy, "specproxy_keep_warm_refreshes_total", result="read") >= 2)
        # Now well past the first TTL: the question still reads, and nothing was ever rewritten.
        r, body = await ask(http, proxy, question_body("later?"))
        assert r.headers["X-Cache-Warm"] == "hit"
        assert body["usage"]["cache_read_input_tokens"] > 0
        assert (await sim.stats())["cache_writes"] == 1  # the warm's; every later call read it
        assert metric(proxy, "specproxy_keep_warm_refreshes_total", result="write") == 0


async def test_keep_warm_is_off_by_default_and_keeps_no_bodies(proxy: ProxyHandle, http: aiohttp.ClientSession) -> None:
    async with http.post(proxy.url + "/prewarm?wait=1", data=orjson.dumps(warm_body()), headers=headers()) as r:
        assert r.status == 200
    await ask(http, proxy, question_body())
    bodies = proxy.app[SPECULATOR].bodies
    assert bodies.bytes == 0


# --- breakpoint injection ------------------------------------------------------------------------------

def _no_breakpoint_question(context: str = CONTEXT) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": [
        {"type": "text", "text": context}, {"type": "text", "text": "What does function_3 return?"}]}]}


async def test_a_request_without_breakpoint_reads_the_warm_when_injection_is_on(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    async with run_proxy(sim.url, inject_breakpoints=True) as proxy:
        async with http.post(proxy.url + "/prewarm?wait=1", data=orjson.dumps(warm_body()), headers=headers()):
            pass
        r, body = await ask(http, proxy, _no_breakpoint_question())
        assert r.headers["X-Cache-Warm"] == "hit" and r.headers["X-Cache-Warm-Injected"] == "1"
        assert body["usage"]["cache_read_input_tokens"] > 0
        # Another tenant's identical request is never injected from my warm.
        r, body = await ask(http, proxy, _no_breakpoint_question(), key=KEY_B)
        assert r.headers["X-Cache-Warm"] == "bypass" and "X-Cache-Warm-Injected" not in r.headers
        assert body["usage"]["cache_read_input_tokens"] == 0


async def test_injection_is_off_by_default(proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession) -> None:
    async with http.post(proxy.url + "/prewarm?wait=1", data=orjson.dumps(warm_body()), headers=headers()):
        pass
    raw = orjson.dumps(_no_breakpoint_question())
    async with http.post(proxy.url + "/v1/messages", data=raw, headers=headers()) as r:
        assert r.headers["X-Cache-Warm"] == "bypass"
        assert (await r.json())["usage"]["cache_read_input_tokens"] == 0


async def test_registry_kinds_are_recorded(proxy: ProxyHandle, http: aiohttp.ClientSession) -> None:
    await ask(http, proxy, question_body(stream=True))
    kinds = {w.kind for w, _ in proxy.app[REGISTRY]._by_id.values()}
    states = {w.state for w, _ in proxy.app[REGISTRY]._by_id.values()}
    assert kinds == {Kind.LEADER} and states == {State.WARM}
