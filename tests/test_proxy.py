"""The proxy end to end: the real anthropic SDK → specproxy → the simulator, all on loopback."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from specproxy.testing import ProxyHandle, SimHandle, run_proxy
from tests.conftest import (
    CONTEXT,
    KEY_A,
    KEY_B,
    MODEL,
    headers,
    question_body,
    warm_body,
)


async def prewarm(http: aiohttp.ClientSession, proxy: ProxyHandle, *, key: str = KEY_A, wait: bool = False,
                  body: dict[str, Any] | None = None, **extra: str) -> dict[str, Any]:
    url = proxy.url + "/prewarm" + ("?wait=1" if wait else "")
    async with http.post(url, data=orjson.dumps(body or warm_body()), headers=headers(key, **extra)) as r:
        assert r.status == (200 if wait else 202), await r.text()
        data: dict[str, Any] = await r.json()
        return data


async def ask(http: aiohttp.ClientSession, proxy: ProxyHandle, body: dict[str, Any] | None = None,
              key: str = KEY_A) -> tuple[aiohttp.ClientResponse, dict[str, Any]]:
    async with http.post(proxy.url + "/v1/messages", data=orjson.dumps(body or question_body()),
                         headers=headers(key)) as r:
        return r, await r.json()


# --- pass-through -------------------------------------------------------------------------------


async def test_every_sdk_call_shape_passes_through(client: anthropic.AsyncAnthropic) -> None:
    msg = await client.messages.create(model=MODEL, max_tokens=32, messages=[{"role": "user", "content": "hi"}])
    assert isinstance(msg, anthropic.types.Message) and msg.usage.input_tokens > 0

    async with client.messages.stream(model=MODEL, max_tokens=32, messages=[{"role": "user", "content": "hi"}]) as s:
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert text and final.stop_reason in ("end_turn", "max_tokens")

    count = await client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hello"}])
    assert count.input_tokens > 0

    models = await client.models.list()
    assert any(m.id == MODEL for m in models.data)

    raw = await client.messages.with_raw_response.create(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["x-cache-warm"] == "bypass"
    assert (await raw.parse()).type == "message"


async def test_forwarded_bytes_equal_the_bytes_the_client_sent(proxy: ProxyHandle, sim: SimHandle,
                                                               http: aiohttp.ClientSession) -> None:
    # Odd spacing, key order and escapes that any re-serialisation would change.
    raw = (
        b'{ "messages" : [ {"content": [{"type":"text","text":"caf\\u00e9 \xe2\x98\x95",'
        b' "cache_control": {"type": "ephemeral"}}], "role":"user"} ],\n "max_tokens": 5, "model": "'
        + MODEL.encode() + b'", "metadata": {  "user_id" :"z\\u00e9-a"} }'
    )
    async with http.post(proxy.url + "/v1/messages?beta=true", data=raw, headers=headers()) as r:
        assert r.status == 200
        assert r.headers["X-Cache-Warm"] == "miss"
    log = await sim.requests()
    seen = [e for e in log if e["path"] == "/v1/messages"]
    assert seen[-1]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert "beta=true" in seen[-1]["query"]


async def test_head_and_unknown_paths_pass_through(proxy: ProxyHandle, http: aiohttp.ClientSession) -> None:
    async with http.head(proxy.url + "/") as r:
        assert r.status == 200
    async with http.get(proxy.url + "/v1/models/no-such-model", headers=headers()) as r:
        assert r.status == 404
        assert (await r.json())["error"]["type"] == "not_found_error"


async def test_unparseable_messages_body_is_forwarded_for_the_upstream_to_answer(
    proxy: ProxyHandle, http: aiohttp.ClientSession
) -> None:
    async with http.post(proxy.url + "/v1/messages", data=b'{"cache_control": oops', headers=headers()) as r:
        assert r.status == 400
        assert r.headers["X-Cache-Warm"] == "bypass"
        assert (await r.json())["error"]["type"] == "invalid_request_error"


# --- the cookbook flow --------------------------------------------------------------------------


async def test_prewarm_then_question_reads_the_warm_cache(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession, client: anthropic.AsyncAnthropic
) -> None:
    warm = await prewarm(http, proxy, wait=True)
    assert warm["state"] == "warm" and warm["breakpoints"] == 1 and len(warm["prefix"]) == 16
    raw = await client.messages.with_raw_response.create(**question_body())
    msg = await raw.parse()
    assert raw.headers["x-cache-warm"] == "hit"
    assert raw.headers["x-cache-warm-wait-ms"] == "0"
    assert raw.headers["x-cache-warm-prefix"] == warm["prefix"]
    stats = await sim.stats()
    assert stats["cache_writes"] == 1
    assert msg.usage.cache_read_input_tokens == stats["tokens_written"] > 0
    assert msg.usage.cache_creation_input_tokens == 0


async def test_prewarm_is_single_flight(proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession) -> None:
    first = await prewarm(http, proxy, **{"x-sim-gate": "g"})
    second = await prewarm(http, proxy)
    assert first["sent"] is True and second["sent"] is False and first["prefix"] == second["prefix"]
    await sim.open_gate("g")
    await prewarm(http, proxy, wait=True)
    assert (await sim.stats())["requests"] == 1


async def test_question_sent_while_its_warm_is_in_flight_is_held_then_reads_the_cache(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    warm = await prewarm(http, proxy, **{"x-sim-gate": "warm"})
    question = asyncio.create_task(ask(http, proxy))
    await proxy.until_held(1)
    await sim.state.gates.wait_for_waiters("warm", 1)
    assert (await sim.stats())["requests"] == 1  # only the warm has reached the upstream
    await sim.open_gate("warm")
    r, body = await question
    assert r.headers["X-Cache-Warm"] == "held"
    assert r.headers["X-Cache-Warm-Prefix"] == warm["prefix"]
    assert body["usage"]["cache_read_input_tokens"] > 0
    assert body["usage"]["cache_creation_input_tokens"] == 0
    assert (await sim.stats())["cache_writes"] == 1


async def test_a_streaming_question_is_held_and_carries_the_headers(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession, client: anthropic.AsyncAnthropic
) -> None:
    await prewarm(http, proxy, **{"x-sim-gate": "warm"})

    async def stream() -> tuple[str, Any]:
        async with client.messages.with_streaming_response.create(**question_body(stream=True)) as resp:
            outcome = resp.headers["x-cache-warm"]
            lines = [line async for line in resp.iter_lines()]
        return outcome, lines

    task = asyncio.create_task(stream())
    await proxy.until_held(1)
    await sim.open_gate("warm")
    outcome, lines = await task
    assert outcome == "held"
    starts = [orjson.loads(line[5:]) for line in lines if line.startswith("data:") and "message_start" in line]
    assert starts[0]["message"]["usage"]["cache_read_input_tokens"] > 0


async def test_fan_out_of_twenty_questions_after_a_prewarm_writes_once_reads_twenty(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    await prewarm(http, proxy, **{"x-sim-gate": "warm"})
    questions = [asyncio.create_task(ask(http, proxy, question_body(f"question {i}?"))) for i in range(20)]
    await proxy.until_held(20)
    await sim.open_gate("warm")
    answers = await asyncio.gather(*questions)
    assert [r.headers["X-Cache-Warm"] for r, _ in answers] == ["held"] * 20
    stats = await sim.stats()
    assert stats["cache_writes"] == 1
    assert stats["cache_reads"] == 20


async def test_other_tenants_identical_question_never_waits_on_my_warm(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    await prewarm(http, proxy, key=KEY_A, **{"x-sim-gate": "a"})
    r, body = await ask(http, proxy, key=KEY_B)  # completes while A's warm is still gated
    assert r.headers["X-Cache-Warm"] == "miss"
    assert r.headers["X-Cache-Warm-Wait-Ms"] == "0"
    assert body["usage"]["cache_read_input_tokens"] == 0
    assert proxy.held == 0
    await sim.open_gate("a")


async def test_prewarm_state_is_visible_to_its_tenant_only(proxy: ProxyHandle, http: aiohttp.ClientSession) -> None:
    warm = await prewarm(http, proxy, wait=True)
    async with http.get(f"{proxy.url}/prewarm/{warm['prefix']}", headers=headers(KEY_A)) as r:
        assert r.status == 200
        assert (await r.json())["state"] == "warm"
    async with http.get(f"{proxy.url}/prewarm/{warm['prefix']}", headers=headers(KEY_B)) as r:
        assert r.status == 404
        assert (await r.json())["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(("extra", "outcome"), [(19, "hit"), (20, "miss")])
async def test_lookback_reaches_nineteen_positions_back_not_twenty(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession, extra: int, outcome: str
) -> None:
    await prewarm(http, proxy, wait=True)
    # Only breakpoint: on the question, `extra` items after the warm's last block.
    body = question_body(extra_blocks=extra - 1, breakpoint_on_last=True)
    del body["messages"][0]["content"][0]["cache_control"]
    r, usage = await ask(http, proxy, body)
    assert r.headers["X-Cache-Warm"] == outcome
    assert (usage["usage"]["cache_read_input_tokens"] > 0) is (outcome == "hit")


# --- faults -------------------------------------------------------------------------------------


async def test_warm_answered_529_releases_held_questions_with_failed(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    await prewarm(http, proxy, **{"x-sim-fault": "overloaded", "x-sim-gate": "w"})
    question = asyncio.create_task(ask(http, proxy))
    await proxy.until_held(1)
    await sim.open_gate("w")
    r, body = await question
    assert r.status == 200
    assert r.headers["X-Cache-Warm"] == "failed"
    assert body["usage"]["cache_creation_input_tokens"] > 0  # the question wrote the cache itself


async def test_stalled_warm_releases_the_question_at_max_hold(sim: SimHandle, http: aiohttp.ClientSession) -> None:
    async with run_proxy(sim.url, max_hold=0.3) as proxy:
        await prewarm(http, proxy, **{"x-sim-fault": "stall"})
        r, _ = await ask(http, proxy)
        assert r.headers["X-Cache-Warm"] == "timeout"
        assert int(r.headers["X-Cache-Warm-Wait-Ms"]) >= 300


async def test_client_that_disconnects_while_held_never_reaches_the_upstream(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    await prewarm(http, proxy, **{"x-sim-gate": "w"})
    question = asyncio.create_task(ask(http, proxy))
    await proxy.until_held(1)
    question.cancel()  # the client gives up: its connection closes
    await proxy.until_held(0)
    await sim.open_gate("w")
    await prewarm(http, proxy, wait=True)
    log = await sim.requests()
    assert [e["max_tokens"] for e in log if e["path"] == "/v1/messages"] == [0]


async def test_prefix_under_the_minimum_is_uncacheable_and_never_held(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    warm = await prewarm(http, proxy, wait=True, body=warm_body("too short to cache"))
    assert warm["state"] == "uncacheable"
    r, body = await ask(http, proxy, question_body(context="too short to cache"))
    assert r.headers["X-Cache-Warm"] == "uncacheable"
    assert r.headers["X-Cache-Warm-Wait-Ms"] == "0"
    assert body["usage"]["cache_creation_input_tokens"] == 0


async def test_cacheable_question_with_no_warm_is_a_miss_and_never_waits(
    proxy: ProxyHandle, http: aiohttp.ClientSession
) -> None:
    r, body = await ask(http, proxy)
    assert r.headers["X-Cache-Warm"] == "miss"
    assert r.headers["X-Cache-Warm-Wait-Ms"] == "0"
    assert "X-Cache-Warm-Prefix" not in r.headers
    assert body["usage"]["cache_creation_input_tokens"] > 0


async def test_upstream_unreachable_is_502_api_error(http: aiohttp.ClientSession) -> None:
    async with run_proxy("http://127.0.0.1:9", max_hold=1.0) as proxy:
        r, body = await ask(http, proxy)
        assert r.status == 502
        assert body["type"] == "error" and body["error"]["type"] == "api_error"
        assert r.headers["X-Cache-Warm"] == "miss"


async def test_upstream_silence_is_504_timeout_error(sim: SimHandle, http: aiohttp.ClientSession) -> None:
    async with (
        run_proxy(sim.url, upstream_read_timeout=0.3) as proxy,
        http.post(proxy.url + "/v1/messages", data=orjson.dumps(question_body()),
                  headers=headers(**{"x-sim-fault": "stall"})) as r,
    ):
        assert r.status == 504
        assert (await r.json())["error"]["type"] == "timeout_error"


# --- /prewarm input errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "status", "error_type"),
    [
        (b"{not json", 400, "invalid_request_error"),
        (b"[1, 2]", 400, "invalid_request_error"),
        (orjson.dumps({"messages": [{"role": "user", "content": "x"}]}), 400, "invalid_request_error"),
        (orjson.dumps({"model": MODEL, "messages": "x"}), 400, "invalid_request_error"),
        (
            orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": [
                {"type": "text", "text": str(i), "cache_control": {"type": "ephemeral"}} for i in range(5)]}]}),
            400,
            "invalid_request_error",
        ),
    ],
)
async def test_prewarm_rejects_bad_bodies_in_anthropic_shape(
    proxy: ProxyHandle, http: aiohttp.ClientSession, payload: bytes, status: int, error_type: str
) -> None:
    async with http.post(proxy.url + "/prewarm", data=payload, headers=headers()) as r:
        assert r.status == status
        body = await r.json()
        assert body["type"] == "error" and body["error"]["type"] == error_type
        assert body["request_id"].startswith("req_") and r.headers["request-id"] == body["request_id"]


async def test_prewarm_without_credential_is_401(proxy: ProxyHandle, http: aiohttp.ClientSession) -> None:
    async with http.post(proxy.url + "/prewarm", data=orjson.dumps(warm_body())) as r:
        assert r.status == 401
        assert (await r.json())["error"]["type"] == "authentication_error"


async def test_body_over_the_limit_is_413(sim: SimHandle, http: aiohttp.ClientSession) -> None:
    async with run_proxy(sim.url, max_body_bytes=1000) as proxy:
        for path in ("/prewarm", "/v1/messages"):
            async with http.post(proxy.url + path, data=orjson.dumps(warm_body(CONTEXT)), headers=headers()) as r:
                assert r.status == 413
                assert (await r.json())["error"]["type"] == "request_too_large"


async def test_prewarm_without_breakpoint_gets_an_implicit_one_on_the_last_block(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    body = warm_body()
    del body["messages"][0]["content"][0]["cache_control"]
    warm = await prewarm(http, proxy, wait=True, body=body)
    assert warm["state"] == "warm" and warm["breakpoints"] == 1
    r, _ = await ask(http, proxy)
    assert r.headers["X-Cache-Warm"] == "hit"


async def test_warm_with_enabled_thinking_falls_back_to_one_token_streamed(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    body = {**warm_body(), "thinking": {"type": "enabled", "budget_tokens": 1024}}
    warm = await prewarm(http, proxy, wait=True, body=body)
    assert warm["state"] == "warm"
    log = [e for e in await sim.requests() if e["path"] == "/v1/messages"]
    assert log[-1]["stream"] is True and log[-1]["max_tokens"] == 1025
    async with http.get(f"{proxy.url}/prewarm/{warm['prefix']}", headers=headers()) as r:
        assert (await r.json())["mode"] == "max_tokens 1"
