"""vLLM and SGLang behind specproxy, shown with the simulator's engine dialects
(``specproxy sim --dialect vllm|sglang|llamacpp``): what no real engine on this machine can show.

Each dialect answers ``/v1/messages`` as the engine's own server does: vLLM and SGLang refuse
``max_tokens: 0`` in their own error shapes, cache every prefix automatically and engine-wide,
report cache reads only with their reporting flag (``cache_report``), and SGLang counts the cached
tokens inside ``input_tokens``. The simulator's ``/_sim/stats`` says what the engine computed
(``tokens_written``) and read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from specproxy.testing import run_proxy, run_sim
from tests.conftest import CONTEXT, KEY_A, MODEL, headers

pytest.importorskip("specproxy.sim.engines", reason="the simulator has no engine dialects yet")

ENGINES = ("vllm", "sglang")


def body(question: str | None = None, *, cache_control: bool = False, max_tokens: int = 16) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": CONTEXT}
    if cache_control:
        block["cache_control"] = {"type": "ephemeral"}
    blocks = [block] + ([{"type": "text", "text": question}] if question else [])
    return {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": blocks}]}


async def post(http: aiohttp.ClientSession, url: str, data: dict[str, Any], **extra: str) -> tuple[int, Any, Any]:
    async with http.post(url, data=orjson.dumps(data), headers=headers(KEY_A, **extra)) as r:
        return r.status, r.headers, await r.json()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def messages_sent(log: list[dict[str, Any]]) -> list[tuple[Any, Any, Any]]:
    """(status, max_tokens, stream) of each Messages request the engine received (a refused one
    is logged before its fields are read)."""
    return [(e["status"], e["max_tokens"], e["stream"]) for e in log if e["path"] == "/v1/messages"]


def uncached(dialect: str, usage: dict[str, int]) -> int:
    """The prompt tokens a response did not read from the cache (SGLang counts both in input_tokens)."""
    read = usage.get("cache_read_input_tokens", 0)
    return usage["input_tokens"] - read if dialect == "sglang" else usage["input_tokens"]


@pytest.mark.parametrize("dialect", ENGINES)
async def test_the_warm_is_one_token_sent_whole_and_a_question_without_cache_control_reads_it(
    dialect: str, http: aiohttp.ClientSession
) -> None:
    async with run_sim(dialect=dialect, cache_report=True) as sim, run_proxy(sim.url, upstream_profile=dialect) as p:
        code, _, warm = await post(http, p.url + "/prewarm?wait=1", body())
        assert code == 200 and warm["state"] == "warm"  # no creation counter: a completed warm wrote it
        computed = (await sim.stats())["tokens_written"]
        assert computed > 1000
        code, hdrs, answer = await post(http, p.url + "/v1/messages", body("What does function_7 return?"))
        assert code == 200
        assert (hdrs["X-Cache-Warm"], hdrs["X-Cache-Warm-Prefix"]) == ("hit", warm["prefix"])
        assert answer["usage"]["cache_read_input_tokens"] >= computed - 16  # the engine's block granularity
        assert uncached(dialect, answer["usage"]) < 64  # the question computed only its own tokens
        # max_tokens 0 is refused by these engines: the warm went as max_tokens 1, not streamed.
        log = [e for e in await sim.requests() if e["path"] == "/v1/messages"]
        assert messages_sent(log) == [(200, 1, False), (200, 16, False)]
        async with http.get(p.url + "/status.json") as r:
            status = await r.json()
    # Usage read as Anthropic means it: input is what was not read (SGLang counts both in input_tokens).
    assert status["tokens"]["cache_read"] == answer["usage"]["cache_read_input_tokens"]
    assert status["tokens"]["input"] == sum(uncached(dialect, e["usage"]) for e in log)
    assert status["upstream"] == {**status["upstream"], "profile": dialect, "shared_cache": True,
                                  "warm": "max_tokens 1"}


@pytest.mark.parametrize("dialect", ENGINES)
async def test_a_question_during_the_warm_is_held_and_the_engine_computes_the_prefix_once(
    dialect: str, http: aiohttp.ClientSession
) -> None:
    async with run_sim(dialect=dialect, cache_report=True) as sim, run_proxy(
        sim.url, upstream_profile=dialect, max_hold=30.0
    ) as p:
        code, _, warm = await post(http, p.url + "/prewarm", body(), **{"x-sim-gate": "w"})
        assert code == 202 and warm["state"] == "warming"
        question = asyncio.create_task(post(http, p.url + "/v1/messages", body("What does function_3 return?")))
        await p.until_held(1)
        assert [e[1:] for e in messages_sent(await sim.requests())] == [(1, False)]  # only the warm
        await sim.open_gate("w")
        code, hdrs, answer = await question
        assert code == 200 and hdrs["X-Cache-Warm"] == "held"
        stats = await sim.stats()
        assert answer["usage"]["cache_read_input_tokens"] > 1000
        read = answer["usage"]["cache_read_input_tokens"]
        assert stats["tokens_read"] == read and stats["tokens_written"] < read + 64  # the prefix once


@pytest.mark.parametrize("dialect", ENGINES)
async def test_straight_to_the_engine_a_question_during_the_warm_computes_the_prefix_again(
    dialect: str, http: aiohttp.ClientSession
) -> None:
    """The contrast: what the engine does without specproxy holding the question."""
    async with run_sim(dialect=dialect, cache_report=True) as sim:
        warm = asyncio.create_task(post(http, sim.url + "/v1/messages", body(max_tokens=1), **{"x-sim-gate": "w"}))
        await sim.state.gates.wait_for_waiters("w", 1)
        code, _, answer = await post(http, sim.url + "/v1/messages", body("What does function_3 return?"))
        await sim.open_gate("w")
        await warm
        stats = await sim.stats()
    assert code == 200 and answer["usage"]["cache_read_input_tokens"] == 0
    assert stats["tokens_read"] == 0 and stats["tokens_written"] > 2000  # the prefix, twice


@pytest.mark.parametrize("dialect", ENGINES)
async def test_the_anthropic_profile_recognises_each_engines_refusal_of_max_tokens_0(
    dialect: str, http: aiohttp.ClientSession
) -> None:
    async with run_sim(dialect=dialect, cache_report=True) as engine, run_proxy(engine.url) as p:
        code, _, warm = await post(http, p.url + "/prewarm?wait=1", body(cache_control=True))
        sent = messages_sent(await engine.requests())
    assert code == 200 and warm["state"] != "failed"
    assert sent == [(400, None, None), (200, 1, True)]  # max_tokens 0 refused, then the one-token form


@pytest.mark.parametrize("dialect", [*ENGINES, "llamacpp", "anthropic"])
async def test_auto_names_the_engine_from_its_discovery_endpoints(dialect: str, http: aiohttp.ClientSession) -> None:
    async with run_sim(dialect=dialect, engine_slots=3) as sim, run_proxy(sim.url, upstream_profile="auto") as p, \
            http.get(p.url + "/status.json") as r:
        upstream = (await r.json())["upstream"]
    assert upstream["profile"] == dialect
    assert upstream["shared_cache"] is (dialect != "anthropic")
    if dialect == "llamacpp":
        assert upstream["slots"] == 3


async def test_without_its_reporting_flag_vllm_reports_no_cache_read_and_the_question_still_matches(
    http: aiohttp.ClientSession,
) -> None:
    async with run_sim(dialect="vllm", cache_report=False) as sim, run_proxy(sim.url, upstream_profile="vllm") as p:
        await post(http, p.url + "/prewarm?wait=1", body())
        code, hdrs, answer = await post(http, p.url + "/v1/messages", body("What does function_7 return?"))
        stats = await sim.stats()
    assert code == 200 and hdrs["X-Cache-Warm"] == "hit"
    assert "cache_read_input_tokens" not in answer["usage"]  # the engine read it, but does not say
    assert stats["tokens_read"] > 1000


async def test_llamacpp_closing_after_each_stream_costs_no_request_and_no_warm(http: aiohttp.ClientSession) -> None:
    """llama-server drops its connection after every streamed response while advertising keep-alive.
    Behind the ``llamacpp`` profile the proxy does not pool such a connection: a streamed question
    followed at once by a warm and a question, round after round, never meets a dead socket."""
    async with run_sim(dialect="llamacpp", reply_tokens=4) as sim, run_proxy(sim.url, upstream_profile="llamacpp") as p:
        warms, statuses = [], []
        for i in range(12):
            streamed = {**body(f"Question {i}?"), "stream": True}
            async with http.post(p.url + "/v1/messages", data=orjson.dumps(streamed), headers=headers(KEY_A)) as r:
                statuses.append(r.status)
                assert b"message_stop" in await r.read()
            doc = {**body(), "messages": [{"role": "user", "content": f"Document {i}. " + CONTEXT}]}
            code, _, warm = await post(http, p.url + "/prewarm?wait=1", doc)
            warms.append((code, warm["state"], warm.get("error")))
            code, _, _ = await post(http, p.url + "/v1/messages", body(f"Another {i}?"))
            statuses.append(code)
        log = messages_sent(await sim.requests())
    assert statuses == [200] * 24
    assert warms == [(200, "warm", None)] * 12
    assert len(log) == 36 and {e[0] for e in log} == {200}  # every request and warm reached it once
