"""specproxy in front of a real llama-server (``upstream_profile = llamacpp``), through the official SDK.

What is asserted: the ``X-Cache-Warm`` outcomes, the engine's own usage counters
(``cache_read_input_tokens``, ``input_tokens``), the prompt tokens the engine computed
(``llamacpp:prompt_tokens_total``), and the order in which requests reached the engine and
finished (the gate's log). Never a time.

Any two prompts share the chat template's opening in the engine's slots, so a "cold" request
still reads a few tokens: ``SLACK`` bounds that, and the tail of the template a warm has after
its context.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from specproxy.testing import ProxyHandle, run_proxy
from tests.engine import llama
from tests.engine.conftest import SLOTS, context, messages

KEY = "sk-local-engine-test-0001"
MODEL = "tiny"
SLACK = 64  # tokens of chat template any two prompts share, or a warm has after its context


def hdrs(**extra: str) -> dict[str, str]:
    return {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json", **extra}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def client(engine_proxy: ProxyHandle) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=engine_proxy.url, api_key=KEY, max_retries=0, timeout=300) as c:
        yield c


async def prewarm(http: aiohttp.ClientSession, url: str, ctx: str, *, wait: bool, cache_control: bool = True,
                  **extra: str) -> dict[str, Any]:
    body = {"model": MODEL, "messages": messages(ctx, cache_control=cache_control)}
    async with http.post(url + "/prewarm" + ("?wait=1" if wait else ""), data=orjson.dumps(body),
                         headers=hdrs(**extra)) as r:
        assert r.status == (200 if wait else 202), await r.text()
        result: dict[str, Any] = await r.json()
        return result


async def ask(client: anthropic.AsyncAnthropic, ctx: str, question: str, label: str, *,
              cache_control: bool = True, stream: bool = False) -> tuple[str, str | None, anthropic.types.Usage]:
    """The question through the SDK: (X-Cache-Warm, X-Cache-Warm-Prefix, usage)."""
    kwargs: dict[str, Any] = {"model": MODEL, "max_tokens": 4, "messages": messages(ctx, question,
                                                                                 cache_control=cache_control),
                              "extra_headers": {"x-test-label": label}}
    if stream:
        async with client.messages.stream(**kwargs) as s:
            final = await s.get_final_message()
            headers = s.response.headers
        return headers["x-cache-warm"], headers.get("x-cache-warm-prefix"), final.usage
    raw = await client.messages.with_raw_response.create(**kwargs)
    return raw.headers["x-cache-warm"], raw.headers.get("x-cache-warm-prefix"), (await raw.parse()).usage


def read(usage: anthropic.types.Usage) -> int:
    return usage.cache_read_input_tokens or 0


async def test_cookbook_flow_the_question_after_a_prewarm_reads_what_the_warm_computed(
    engine_proxy: ProxyHandle, gate: llama.Gate, llama_server: llama.LlamaServer,
    client: anthropic.AsyncAnthropic, http: aiohttp.ClientSession,
) -> None:
    ctx = context("cookbook")
    before = llama_server.computed()
    warm = await prewarm(http, engine_proxy.url, ctx, wait=True, **{"x-test-label": "warm"})
    assert warm["state"] == "warm" and warm["sent"] is True
    warm_computed = llama_server.computed() - before
    assert warm_computed > 1000  # the whole context was prefilled by the warm
    async with http.get(engine_proxy.url + f"/prewarm/{warm['prefix']}", headers=hdrs()) as r:
        state = await r.json()
    assert state["mode"] == "max_tokens 0"  # llama.cpp's n_predict 0: prefill only

    outcome, prefix, usage = await ask(client, ctx, "What does function_7 return?", "question")
    assert (outcome, prefix) == ("hit", warm["prefix"])
    assert read(usage) >= warm_computed - SLACK
    assert usage.input_tokens <= SLACK
    # The engine computed the context once (the warm) and the question's own few tokens.
    assert llama_server.computed() - before == warm_computed + usage.input_tokens
    assert gate.order("warm", "question") == [("start", "warm"), ("end", "warm"), ("start", "question"),
                                              ("end", "question")]

    # The same question on a document nobody warmed: it leads its prefix (miss) and computes it all.
    cold_ctx = context("cold")
    outcome, _, cold = await ask(client, cold_ctx, "What does function_7 return?", "cold")
    assert outcome == "miss"
    assert read(cold) <= SLACK and cold.input_tokens >= warm_computed - SLACK


async def test_a_question_during_the_warm_is_held_then_reads_the_warm_from_its_slot(
    engine_proxy: ProxyHandle, gate: llama.Gate, llama_server: llama.LlamaServer,
    client: anthropic.AsyncAnthropic, http: aiohttp.ClientSession,
) -> None:
    ctx = context("held")
    before = llama_server.computed()
    warm = await prewarm(http, engine_proxy.url, ctx, wait=False, **{"x-test-gate": "w", "x-test-label": "warm"})
    assert warm["state"] == "warming"
    await gate.until_waiting("w")
    question = asyncio.create_task(ask(client, ctx, "What does function_3 return?", "question"))
    await engine_proxy.until_held(1)
    assert gate.order("warm", "question") == []  # nothing has reached the engine yet
    gate.open("w")
    outcome, prefix, usage = await question
    assert (outcome, prefix) == ("held", warm["prefix"])
    warm_computed = llama_server.computed() - before - usage.input_tokens
    assert warm_computed > 1000
    # The question went once the warm had finished, to the slot that holds it, and read it.
    assert gate.order("warm", "question") == [("start", "warm"), ("end", "warm"), ("start", "question"),
                                              ("end", "question")]
    assert read(usage) >= warm_computed - SLACK and usage.input_tokens <= SLACK


async def test_a_question_without_cache_control_is_matched_held_and_reads_the_warm(
    engine_proxy: ProxyHandle, gate: llama.Gate, llama_server: llama.LlamaServer,
    client: anthropic.AsyncAnthropic, http: aiohttp.ClientSession,
) -> None:
    ctx = context("plain")
    before = llama_server.computed()
    warm = await prewarm(http, engine_proxy.url, ctx, wait=False, cache_control=False,
                         **{"x-test-gate": "p", "x-test-label": "warm"})
    await gate.until_waiting("p")
    question = asyncio.create_task(
        ask(client, ctx, "What does function_5 return?", "question", cache_control=False, stream=True))
    await engine_proxy.until_held(1)
    gate.open("p")
    outcome, prefix, usage = await question
    # No breakpoint anywhere: the engine caches every prefix, so the llamacpp profile matches it.
    assert (outcome, prefix) == ("held", warm["prefix"])
    warm_computed = llama_server.computed() - before - usage.input_tokens
    assert read(usage) >= warm_computed - SLACK and usage.input_tokens <= SLACK

    # The anthropic profile in front of the same engine sees no breakpoint: bypass, never matched
    # (the engine still reads its own cache; the proxy just does not know to hold).
    async with run_proxy(gate.url, upstream_profile="anthropic") as plain, anthropic.AsyncAnthropic(
        base_url=plain.url, api_key=KEY, max_retries=0, timeout=300
    ) as other:
        outcome, prefix, _ = await ask(other, ctx, "What does function_6 return?", "bypass", cache_control=False)
    assert (outcome, prefix) == ("bypass", None)


async def test_a_fan_out_is_held_on_one_warm_and_the_engine_computes_the_prefix_at_most_once_per_slot(
    engine_proxy: ProxyHandle, gate: llama.Gate, llama_server: llama.LlamaServer,
    client: anthropic.AsyncAnthropic, http: aiohttp.ClientSession,
) -> None:
    n = 3
    ctx = context("fan-out")
    before = llama_server.computed()
    warm = await prewarm(http, engine_proxy.url, ctx, wait=False, **{"x-test-gate": "f", "x-test-label": "warm"})
    await gate.until_waiting("f")
    questions = [asyncio.create_task(ask(client, ctx, f"What does function_{i} return?", f"q{i}", stream=i % 2 == 0))
                 for i in range(n)]
    await engine_proxy.until_held(n)
    gate.open("f")
    answers = await asyncio.gather(*questions)
    assert [(outcome, prefix) for outcome, prefix, _ in answers] == [("held", warm["prefix"])] * n
    usages = [usage for _, _, usage in answers]
    computed = llama_server.computed() - before
    warm_computed = computed - sum(u.input_tokens for u in usages)
    assert warm_computed > 1000
    # Every question reached the engine after the warm had finished.
    starts = [label for event, label in gate.events if event == "start" and label in {"warm", *(f"q{i}" for i in
                                                                                         range(n))}]
    assert starts[0] == "warm" and gate.events.index(("end", "warm")) < min(
        gate.events.index(("start", f"q{i}")) for i in range(n))
    # A slot holds one prompt: the question given the warm's slot reads it, and so does every one
    # that waits for a slot; only those that start at once in another slot compute the prefix.
    full_reads = [u for u in usages if read(u) >= warm_computed - SLACK]
    recomputed = [u for u in usages if u.input_tokens > SLACK]
    assert len(full_reads) >= n - (SLOTS - 1)
    assert len(recomputed) <= SLOTS - 1
    assert len(full_reads) + len(recomputed) == n


async def test_auto_detects_llama_server_and_the_status_shows_its_slots_and_shared_cache(
    llama_server: llama.LlamaServer, http: aiohttp.ClientSession,
) -> None:
    async with run_proxy(llama_server.url, upstream_profile="auto") as p:
        async with http.get(p.url + "/status.json") as r:
            upstream = (await r.json())["upstream"]
        async with http.get(p.url + "/status") as r:
            page = await r.text()
    assert upstream["profile"] == "llamacpp" and upstream["slots"] == SLOTS
    assert upstream["shared_cache"] is True and upstream["automatic_prefix_caching"] is True
    assert upstream["warm"] == "max_tokens 0"
    assert "one engine cache for every credential" in page
