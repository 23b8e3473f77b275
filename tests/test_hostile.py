"""Defects found by hostile testing of the request path: real proxy, real simulator, no timings."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from specproxy.testing import run_proxy, run_sim
from tests.conftest import KEY_A, eventually, headers, question_body


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str = KEY_A,
               **extra: str) -> tuple[int, dict[str, str], bytes]:
    async with http.post(url + "/v1/messages", data=orjson.dumps(body), headers=headers(key, **extra)) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


async def test_a_client_400_as_leader_does_not_poison_the_prefix() -> None:
    """A leader whose own body the upstream refuses (400) wrote nothing and is no warm failure:
    the next valid request on the same prefix must lead it again (miss), not go as ``failed``,
    and the one after must read what that wrote (``hit``)."""
    async with run_sim(time_scale=0.0) as sim, run_proxy(sim.url, max_hold=10.0) as proxy, \
            aiohttp.ClientSession() as http:
        bad = {**question_body("q0"), "max_tokens": 10_000_000}
        status, _, _ = await post(http, proxy.url, bad)
        assert status == 400
        status, h1, _ = await post(http, proxy.url, question_body("q1"))
        assert status == 200
        status, h2, _ = await post(http, proxy.url, question_body("q2"))
        assert status == 200
        assert (h1["x-cache-warm"], h2["x-cache-warm"]) == ("miss", "hit")


async def test_concurrent_fanout_after_a_client_400_is_coalesced() -> None:
    """After one bad request, four concurrent valid ones on its prefix cost one cache write, not four."""
    async with run_sim(time_scale=0.0) as sim, run_proxy(sim.url, max_hold=10.0) as proxy, \
            aiohttp.ClientSession() as http:
        bad = {**question_body("q0", stream=True), "bogus_field": 1}
        assert (await post(http, proxy.url, bad))[0] == 400
        gated = asyncio.create_task(post(http, proxy.url, question_body("lead", stream=True), **{"x-sim-gate": "g"}))
        async def leader_gated() -> bool:
            return (await sim.gates()).get("g", 0) == 1

        await eventually(leader_gated)
        followers = [asyncio.create_task(post(http, proxy.url, question_body(f"q{i}", stream=True)))
                     for i in range(3)]
        # Held behind the gated leader, or (the defect) gone upstream on their own.
        await eventually(lambda: proxy.held == 3 or all(f.done() for f in followers))
        await sim.open_gate("g")
        results = await asyncio.gather(gated, *followers)
        assert all(r[0] == 200 for r in results)
        assert (await sim.stats())["cache_writes"] == 1


def automatic_caching_body(document: str, question: str) -> dict[str, Any]:
    """Top-level ``cache_control`` (automatic caching): the last cacheable block is the breakpoint."""
    return {"model": "claude-sonnet-4-6", "max_tokens": 32, "cache_control": {"type": "ephemeral"},
            "system": document, "messages": [{"role": "user", "content": question}]}


async def test_helper_warm_behind_non_streaming_leader_keeps_automatic_caching_breakpoint() -> None:
    """Behind a non-streaming leader of an automatic-caching body, the helper warm is sent with no
    breakpoint at all (the cut drops top-level ``cache_control`` and adds none): it writes nothing,
    the follower is told ``uncacheable`` and the prefix stays ``uncacheable`` though it is cached.
    (Identical bodies: automatic caching puts the breakpoint on the last block, the question.)"""
    from tests.conftest import CONTEXT

    async with run_sim(time_scale=0.0) as sim, run_proxy(sim.url, max_hold=10.0) as proxy, \
            aiohttp.ClientSession() as http:
        leader = asyncio.create_task(post(http, proxy.url, automatic_caching_body(CONTEXT, "q"),
                                          **{"x-sim-gate": "lead"}))

        async def leader_gated() -> bool:
            return (await sim.gates()).get("lead", 0) == 1

        await eventually(leader_gated)
        status, follower, _ = await post(http, proxy.url, automatic_caching_body(CONTEXT, "q"))
        assert status == 200
        await sim.open_gate("lead")
        assert (await leader)[0] == 200
        helper = [r for r in await sim.requests() if r.get("max_tokens") == 0]
        assert len(helper) == 1
        assert helper[0]["usage"]["cache_creation_input_tokens"] > 0, "the helper warm wrote nothing"
        assert follower["x-cache-warm"] == "held"
        status, later, body = await post(http, proxy.url, automatic_caching_body(CONTEXT, "q"))
        assert orjson.loads(body)["usage"]["cache_read_input_tokens"] > 0
        assert later["x-cache-warm"] == "hit"


async def test_leader_client_leaving_before_its_response_does_not_release_followers_as_failed() -> None:
    """The leader's client hangs up while its request is still in prefill: no warm failed upstream,
    so its held followers must not all go at once as ``failed`` (three cache writes): one of them
    should take the lead and the others read what it writes."""
    async with run_sim(time_scale=0.0) as sim, run_proxy(sim.url, max_hold=10.0) as proxy, \
            aiohttp.ClientSession() as http:
        leader = asyncio.create_task(post(http, proxy.url, question_body("lead", stream=True),
                                          **{"x-sim-gate": "lead"}))

        async def leader_gated() -> bool:
            return (await sim.gates()).get("lead", 0) == 1

        await eventually(leader_gated)
        followers = [asyncio.create_task(post(http, proxy.url, question_body(f"q{i}", stream=True)))
                     for i in range(3)]
        await proxy.until_held(3)
        leader.cancel()  # the leader's client disconnects
        results = await asyncio.gather(*followers)
        assert all(r[0] == 200 for r in results)
        outcomes = sorted(r[1]["x-cache-warm"] for r in results)
        await sim.open_gate("lead")
        assert "failed" not in outcomes, outcomes
        writes = [r for r in await sim.requests() if r.get("usage") and r["usage"]["cache_creation_input_tokens"]
                  and r.get("gate") is None]
        assert len(writes) == 1, f"{len(writes)} follower cache writes"
