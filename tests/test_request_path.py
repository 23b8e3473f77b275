"""The request path's defects, one test each, through the real SDK or raw HTTP, the proxy and the simulator.

Each test here failed on the request path before the pipeline redesign (hold.py, a closure in the
handler and speculate.py deciding together) and asserts the upstream's own counters or wire bytes,
not only our headers. Orderings come from simulator gates, never from timings.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp
import anthropic
import orjson

from specproxy.keys import METRICS
from specproxy.registry import Kind, State
from specproxy.testing import ProxyHandle, SimHandle, run_proxy, run_sim
from tests.conftest import CONTEXT, KEY_A, MODEL, eventually, headers
from tests.strict_upstream import strict_upstream

SYSTEM = "".join(f"Rule {i}: answer about class Widget{i} only with facts from the document.\n" for i in range(450))
DOCUMENT = "".join(f"class Widget{i}:\n    size = {i * 3}\n    colour = 'c{i % 11}'\n\n" for i in range(320))
PIXEL = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)).decode()


def metric(proxy: ProxyHandle, name: str, **labels: str) -> float:
    return proxy.app[METRICS].registry.get_sample_value(name, labels) or 0.0


def system_blocks(ttl: str | None = None) -> list[dict[str, Any]]:
    cc: dict[str, Any] = {"type": "ephemeral"}
    if ttl:
        cc["ttl"] = ttl
    return [{"type": "text", "text": SYSTEM, "cache_control": cc}]


def doc_question(question: str, *, stream: bool = False, image: bool = False) -> dict[str, Any]:
    """A warm system prompt, then a new document (its own breakpoint), then the question."""
    content: list[dict[str, Any]] = []
    if image:
        content.append({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}})
    content += [{"type": "text", "text": DOCUMENT, "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": question}]
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 32, "system": system_blocks(),
                            "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
    return body


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any], **extra: str) -> tuple[
        dict[str, str], dict[str, Any]]:
    async with http.post(url, data=orjson.dumps(body), headers=headers(KEY_A, **extra)) as r:
        if r.content_type == "text/event-stream":
            text = await r.text()
            line = next(x for x in text.splitlines() if x.startswith("data:") and "message_start" in x)
            return dict(r.headers), orjson.loads(line[5:])["message"]
        return dict(r.headers), await r.json()


async def prewarm_system(http: aiohttp.ClientSession, proxy: ProxyHandle, ttl: str | None = None) -> None:
    body = {"model": MODEL, "system": system_blocks(ttl), "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(proxy.url + "/prewarm?wait=1", data=orjson.dumps(body), headers=headers()) as r:
        assert (await r.json())["state"] == "warm"


# --- coalescing behind a warm prefix ----------------------------------------------------------------

async def test_a_fan_out_behind_a_warm_system_prompt_writes_the_new_document_once(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    await prewarm_system(http, proxy)
    assert (await sim.stats())["cache_writes"] == 1
    # The first question leads the new document (gated at the simulator); four more follow it.
    url = proxy.url + "/v1/messages"
    lead = asyncio.create_task(post(http, url, doc_question("q0?", stream=True), **{"x-sim-gate": "g"}))
    await sim.state.gates.wait_for_waiters("g", 1)
    followers = [asyncio.create_task(post(http, url, doc_question(f"q{i}?", stream=True))) for i in range(1, 5)]
    await proxy.until_held(4)
    await sim.open_gate("g")
    lead_h, lead_msg = await lead
    answers = await asyncio.gather(*followers)
    assert lead_h["X-Cache-Warm"] == "hit"  # it read the system prompt and wrote the document
    assert lead_msg["usage"]["cache_read_input_tokens"] > 0 and lead_msg["usage"]["cache_creation_input_tokens"] > 0
    assert [h["X-Cache-Warm"] for h, _ in answers] == ["held"] * 4
    assert all(m["usage"]["cache_creation_input_tokens"] == 0 for _, m in answers)
    assert all(m["usage"]["cache_read_input_tokens"] > lead_msg["usage"]["cache_read_input_tokens"] for _, m in answers)
    assert (await sim.stats())["cache_writes"] == 2  # the system prompt once, the document once: not 6


async def test_followers_of_a_non_streaming_leader_with_an_image_hold_on_a_warm_of_their_own_body(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    url = proxy.url + "/v1/messages"
    lead = asyncio.create_task(post(http, url, doc_question("q0?", image=True), **{"x-sim-gate": "g"}))
    await sim.state.gates.wait_for_waiters("g", 1)
    followers = [asyncio.create_task(post(http, url, doc_question(f"q{i}?", image=True))) for i in range(1, 4)]
    answers = await asyncio.gather(*followers)  # done while the leader's generation is still gated
    assert not lead.done()
    assert [h["X-Cache-Warm"] for h, _ in answers] == ["held"] * 3
    assert all(m["usage"]["cache_read_input_tokens"] > 0 for _, m in answers)
    log = [e for e in await sim.requests() if e["path"] == "/v1/messages"]
    assert sorted(e["max_tokens"] for e in log) == [0, 32, 32, 32, 32]  # one max_tokens 0 warm for all three
    await sim.open_gate("g")
    lead_h, _ = await lead
    assert lead_h["X-Cache-Warm"] == "miss"


async def test_a_follower_of_a_non_streaming_leader_goes_at_once_when_no_warm_can_be_sent(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    async with run_proxy(sim.url, max_hold=30.0, max_warms_in_flight_per_tenant=1) as proxy:
        # The tenant's one warm slot is taken by a prewarm stuck at the simulator.
        body = {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "text", "text": CONTEXT, "cache_control": {"type": "ephemeral"}}]}]}
        async with http.post(proxy.url + "/prewarm", data=orjson.dumps(body),
                             headers=headers(**{"x-sim-gate": "w"})) as r:
            assert r.status == 202
        url = proxy.url + "/v1/messages"
        lead = asyncio.create_task(post(http, url, doc_question("q0?"), **{"x-sim-gate": "g"}))
        await sim.state.gates.wait_for_waiters("g", 1)
        follower_h, follower = await post(http, url, doc_question("q1?"))
        assert not lead.done()  # it did not wait out the leader's generation
        assert follower_h["X-Cache-Warm"] == "unheld" and follower_h["X-Cache-Warm-Wait-Ms"] == "0"
        assert follower["usage"]["cache_creation_input_tokens"] > 0
        await sim.open_gate("g")
        await sim.open_gate("w")
        await lead


async def test_a_helper_warm_every_follower_read_is_not_counted_as_wasted(http: aiohttp.ClientSession) -> None:
    scale = 0.004  # TTLs: 5 min -> 1.2 s, on both sides
    async with run_sim(time_scale=scale) as sim, run_proxy(sim.url, cache_ttl_scale=scale) as proxy:
        url = proxy.url + "/v1/messages"
        lead = asyncio.create_task(post(http, url, doc_question("q0?"), **{"x-sim-gate": "g"}))
        await sim.state.gates.wait_for_waiters("g", 1)
        settled = asyncio.create_task(proxy.settled())
        answers = await asyncio.gather(*(post(http, url, doc_question(f"q{i}?")) for i in range(1, 4)))
        assert [h["X-Cache-Warm"] for h, _ in answers] == ["held"] * 3
        helper, result = await settled
        assert helper.kind is Kind.COALESCE and result.state is State.WARM and helper.uses == 3
        await sim.open_gate("g")
        await lead
        await asyncio.sleep(helper.ttl + 0.3)  # past the helper's TTL: the wasted-warm check has run
        assert metric(proxy, "specproxy_warms_total", result="warm", mode="0") == 1
        assert metric(proxy, "specproxy_warms_wasted_total") == 0


# --- bodies the proxy builds are bodies today's models accept ---------------------------------------------

async def test_a_next_turn_warm_is_accepted_by_a_model_without_prefill(http: aiohttp.ClientSession) -> None:
    async with run_sim(time_scale=0.0) as sim, strict_upstream(sim.url) as strict, run_proxy(
        strict.url, next_turn=True
    ) as proxy:
        first = {"model": MODEL, "max_tokens": 40, "messages": [{"role": "user", "content": [
            {"type": "text", "text": CONTEXT}, {"type": "text", "text": "Summarise.",
                                                  "cache_control": {"type": "ephemeral"}}]}]}
        settled = asyncio.create_task(proxy.settled())
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=KEY_A, max_retries=0) as client:
            reply = await client.messages.create(**first)
            warm, result = await settled
            assert warm.kind is Kind.NEXT_TURN and result.state is State.WARM and result.mode == "0"
            assert strict.refused == []
            sent = strict.warms()
            assert len(sent) == 1  # accepted at once: no max_tokens 1 retry
            turns = sent[0]["messages"]
            assert [t["role"] for t in turns] == ["user", "assistant", "user"]
            assert turns[1]["content"][-1]["cache_control"] == {"type": "ephemeral"}  # on the reply's last block
            assert all("cache_control" not in b for b in turns[0]["content"])  # four-breakpoint budget kept
            # Turn two, as the app sends it: the reply as it came, then the next question.
            second = {**first, "messages": [*first["messages"],
                                             {"role": "assistant", "content": [b.model_dump() for b in reply.content]},
                                             {"role": "user", "content": [{"type": "text", "text": "And then?",
                                                                           "cache_control": {"type": "ephemeral"}}]}]}
            raw = await client.messages.with_raw_response.create(**second)
            assert raw.headers["X-Cache-Warm"] == "hit"
            usage = (await raw.parse()).usage
            assert usage.cache_read_input_tokens >= reply.usage.input_tokens + reply.usage.cache_creation_input_tokens


async def test_a_helper_warm_cut_on_an_assistant_turn_ends_on_a_user_turn(http: aiohttp.ClientSession) -> None:
    convo = [{"role": "user", "content": CONTEXT},
             {"role": "assistant", "content": [{"type": "text", "text": "It defines 300 functions. ",
                                                "cache_control": {"type": "ephemeral"}}]}]

    def body(q: str) -> dict[str, Any]:
        return {"model": MODEL, "max_tokens": 16, "messages": [*convo, {"role": "user", "content": q}]}

    async with run_sim(time_scale=0.0) as sim, strict_upstream(sim.url) as strict, run_proxy(strict.url) as proxy:
        url = proxy.url + "/v1/messages"
        lead = asyncio.create_task(post(http, url, body("q0?"), **{"x-sim-gate": "g"}))
        await sim.state.gates.wait_for_waiters("g", 1)
        answers = await asyncio.gather(*(post(http, url, body(f"q{i}?")) for i in range(1, 3)))
        assert [h["X-Cache-Warm"] for h, _ in answers] == ["held"] * 2
        assert strict.refused == []
        (helper,) = strict.warms()
        assert helper["messages"][-1] == {"role": "user", "content": "."}
        assert helper["messages"][1] == convo[1]  # the reply as it came, breakpoint and trailing space kept
        await sim.open_gate("g")
        await lead


async def test_the_max_tokens_1_fallback_is_sent_only_when_max_tokens_0_is_refused(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    # Refused for another reason (a thinking type the API does not know): one call, no retry.
    body = {"model": MODEL, "thinking": {"type": "sometimes"}, "messages": [{"role": "user", "content": [
        {"type": "text", "text": CONTEXT, "cache_control": {"type": "ephemeral"}}]}]}
    async with http.post(proxy.url + "/prewarm?wait=1", data=orjson.dumps(body), headers=headers()) as r:
        assert (await r.json())["state"] == "failed"
    log = [e for e in await sim.requests() if e["path"] == "/v1/messages"]
    assert len(log) == 1 and log[0]["status"] == 400


async def test_a_tools_only_warm_drops_thinking_and_tool_choice_and_generates_nothing(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    tools = [{"name": f"tool_{i}", "description": CONTEXT[i * 40:(i + 1) * 40] * 8,
              "input_schema": {"type": "object", "properties": {}}} for i in range(60)]
    tools[-1] = {**tools[-1], "cache_control": {"type": "ephemeral"}}
    body = {"model": MODEL, "tools": tools, "tool_choice": {"type": "any"},
            "thinking": {"type": "enabled", "budget_tokens": 2048},
            "messages": [{"role": "user", "content": "go"}]}
    async with strict_upstream(sim.url) as strict, run_proxy(strict.url) as proxy:
        async with http.post(proxy.url + "/prewarm?wait=1", data=orjson.dumps(body), headers=headers()) as r:
            assert (await r.json())["state"] == "warm"
        (sent,) = strict.warms()
        assert sent["max_tokens"] == 0 and "stream" not in sent
        assert "thinking" not in sent and "tool_choice" not in sent


# --- keep-warm follows each entry's own expiry ------------------------------------------------------------

async def test_keep_warm_refreshes_from_the_warms_start_so_a_slow_prefill_still_reads(
    http: aiohttp.ClientSession
) -> None:
    scale = 0.004  # TTL 5 min -> 1.2 s; the warm takes 0.6 s upstream (x-sim-delay-ms is not scaled)
    async with run_sim(time_scale=scale) as sim, run_proxy(
        sim.url, cache_ttl_scale=scale, keep_warm=True, keep_warm_margin=0.3
    ) as proxy:
        body = {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "text", "text": CONTEXT, "cache_control": {"type": "ephemeral"}}]}]}
        async with http.post(proxy.url + "/prewarm?wait=1", data=orjson.dumps(body),
                             headers=headers(**{"x-sim-delay-ms": "600"})) as r:
            assert (await r.json())["state"] == "warm"
        await eventually(lambda: metric(proxy, "specproxy_keep_warm_refreshes_total", result="read")
                         + metric(proxy, "specproxy_keep_warm_refreshes_total", result="write") >= 1)
        # Timed from settle, the first refresh would come after the entry (timed from the warm's
        # start upstream) had lapsed, and pay a rewrite.
        assert metric(proxy, "specproxy_keep_warm_refreshes_total", result="write") == 0
        assert (await sim.stats())["cache_writes"] == 1


async def test_keep_warm_refreshes_a_1h_plus_5m_warm_on_the_5m_schedule(http: aiohttp.ClientSession) -> None:
    scale = 0.004  # 5m -> 1.2 s, 1h -> 14.4 s
    async with run_sim(time_scale=scale) as sim, run_proxy(
        sim.url, cache_ttl_scale=scale, keep_warm=True, keep_warm_margin=0.3
    ) as proxy:
        body = {"model": MODEL, "system": system_blocks("1h"), "messages": [{"role": "user", "content": [
            {"type": "text", "text": DOCUMENT, "cache_control": {"type": "ephemeral"}}]}]}
        async with http.post(proxy.url + "/prewarm?wait=1", data=orjson.dumps(body), headers=headers()) as r:
            assert (await r.json())["state"] == "warm"
        writes = (await sim.stats())["cache_writes"]
        await eventually(lambda: metric(proxy, "specproxy_keep_warm_refreshes_total", result="read") >= 2)
        # Past two 5-minute TTLs: the document's 5m entry is still there, so the question reads it all.
        question = {**body, "max_tokens": 16, "messages": [{"role": "user", "content": [
            {"type": "text", "text": DOCUMENT, "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Which widget is largest?"}]}]}
        h, answer = await post(http, proxy.url + "/v1/messages", question)
        assert h["X-Cache-Warm"] == "hit"
        assert answer["usage"]["cache_creation_input_tokens"] == 0
        assert (await sim.stats())["cache_writes"] == writes


# --- breakpoint injection changes nothing but the breakpoint ---------------------------------------------

async def test_an_injected_body_keeps_integers_beyond_64_bits_exactly(http: aiohttp.ClientSession) -> None:
    async with run_sim(time_scale=0.0) as sim, strict_upstream(sim.url) as strict, run_proxy(
        strict.url, inject_breakpoints=True
    ) as proxy:
        async with http.post(proxy.url + "/prewarm?wait=1", data=orjson.dumps({"model": MODEL, "messages": [
                {"role": "user", "content": [{"type": "text", "text": CONTEXT,
                                              "cache_control": {"type": "ephemeral"}}]}]}), headers=headers()) as r:
            assert (await r.json())["state"] == "warm"
        big = "123456789012345678901234567890"
        text = orjson.dumps(CONTEXT).decode()
        raw = (f'{{"model":"{MODEL}","max_tokens":16,"messages":[{{"role":"user","content":'
               f'[{{"type":"text","text":{text}}},{{"type":"text","text":"q?"}}]}}],"top_k":{big}}}').encode()
        async with http.post(proxy.url + "/v1/messages", data=raw, headers=headers()) as r:
            assert r.headers["X-Cache-Warm-Injected"] == "1" and r.headers["X-Cache-Warm"] == "hit"
        sent = strict.raw[-1]
        assert b'"top_k":' + big.encode() in sent  # not 1.2345678901234568e+29
        assert sent.count(b'"cache_control"') == 1
