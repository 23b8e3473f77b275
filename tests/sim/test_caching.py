"""Prompt caching rules, one test each, asserted on the usage counters the simulator returns."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import orjson

from specproxy.sim import SimProfile
from specproxy.sim.profile import profile_from_mapping
from specproxy.testing import ManualClock, SimHandle, run_sim

from .helpers import KEY, MODEL, OTHER_KEY, Api, cached, plain, text

BIG = text(3000, "big")  # over Sonnet 4.6's 1024-token minimum
QUESTION = "What does it do?"  # 4 tokens


def counters(usage: dict[str, Any]) -> tuple[int, int, int]:
    """(cache_read, cache_creation, input) of a usage object."""
    return usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"], usage["input_tokens"]


def system_prompt(ttl: str | None = None) -> dict[str, Any]:
    return {"system": [cached(BIG, ttl)], "messages": [{"role": "user", "content": QUESTION}]}


async def test_a_breakpoint_writes_its_prefix_and_the_next_request_reads_it(api: Api, sim: SimHandle) -> None:
    first = await api.messages(system_prompt())
    second = await api.messages(system_prompt())
    assert counters(first.usage) == (0, 3000, 4)
    assert first.usage["cache_creation"] == {"ephemeral_5m_input_tokens": 3000, "ephemeral_1h_input_tokens": 0}
    assert counters(second.usage) == (3000, 0, 4)
    stats = await sim.stats()
    assert (stats["cache_writes"], stats["cache_reads"], stats["tokens_written"], stats["tokens_read"]) == (
        1, 1, 3000, 3000)


async def test_usage_adds_up_to_count_tokens(api: Api) -> None:
    body = {"system": [plain("intro"), cached(BIG)], "messages": [{"role": "user", "content": QUESTION}]}
    usage = (await api.messages(body)).usage
    count = await api.post("/v1/messages/count_tokens", {"model": MODEL, **body})
    assert sum(counters(usage)) == count.body["input_tokens"] == 2 + 3000 + 4


def tail_blocks(n: int) -> list[dict[str, Any]]:
    """``n`` small blocks (10 tokens each), the last one carrying a breakpoint."""
    blocks = [plain(text(10, f"tail{i}")) for i in range(n)]
    blocks[-1] = cached(blocks[-1]["text"])
    return blocks


async def test_read_through_lookback_at_19_positions(api: Api) -> None:
    await api.messages({"messages": [{"role": "user", "content": [cached(BIG)]}]})
    later = await api.messages({"messages": [{"role": "user", "content": [plain(BIG), *tail_blocks(19)]}]})
    assert counters(later.usage) == (3000, 190, 0)


async def test_miss_when_the_entry_is_20_positions_back(api: Api) -> None:
    await api.messages({"messages": [{"role": "user", "content": [cached(BIG)]}]})
    later = await api.messages({"messages": [{"role": "user", "content": [plain(BIG), *tail_blocks(20)]}]})
    assert counters(later.usage) == (0, 3200, 0)


async def test_an_earlier_breakpoint_finds_what_the_last_one_cannot(api: Api) -> None:
    await api.messages({"messages": [{"role": "user", "content": [cached(BIG)]}]})
    blocks = [cached(BIG), *tail_blocks(30)]
    later = await api.messages({"messages": [{"role": "user", "content": blocks}]})
    assert counters(later.usage) == (3000, 300, 0)


async def test_a_prefix_below_the_minimum_writes_nothing_and_raises_no_error(api: Api, sim: SimHandle) -> None:
    body = {"system": [cached(text(1000, "short"))], "messages": [{"role": "user", "content": QUESTION}]}
    first = await api.messages(body)
    second = await api.messages(body)
    assert first.status == second.status == 200
    assert counters(first.usage) == counters(second.usage) == (0, 0, 1004)
    assert (await sim.stats())["cache_writes"] == 0


async def test_the_minimum_comes_from_the_profile_and_can_be_overridden() -> None:
    profile = profile_from_mapping({"models": {MODEL: {"min_cache_tokens": 100}}}, SimProfile(time_scale=0))
    async with run_sim(profile) as sim, aiohttp.ClientSession() as session:
        api = Api(sim, session)
        body = {"system": [cached(text(200, "small"))], "messages": [{"role": "user", "content": QUESTION}]}
        assert counters((await api.messages(body)).usage) == (0, 200, 4)


async def test_an_entry_expires_after_five_minutes_unless_a_read_refreshes_it(api: Api, clock: ManualClock) -> None:
    assert counters((await api.messages(system_prompt())).usage) == (0, 3000, 4)
    clock.advance(299)
    assert counters((await api.messages(system_prompt())).usage) == (3000, 0, 4)  # refreshed: expires +300
    clock.advance(299)
    assert counters((await api.messages(system_prompt())).usage) == (3000, 0, 4)
    clock.advance(301)
    assert counters((await api.messages(system_prompt())).usage) == (0, 3000, 4)


async def test_a_one_hour_entry_outlives_five_minutes(api: Api, clock: ManualClock) -> None:
    await api.messages(system_prompt("1h"))
    clock.advance(3599)
    assert counters((await api.messages(system_prompt("1h"))).usage) == (3000, 0, 4)
    clock.advance(3601)
    assert counters((await api.messages(system_prompt("1h"))).usage) == (0, 3000, 4)


async def test_two_credentials_never_share_an_entry(api: Api, sim: SimHandle) -> None:
    await api.messages(system_prompt(), key=KEY)
    other = await api.messages(system_prompt(), key=OTHER_KEY)
    assert counters(other.usage) == (0, 3000, 4)
    by_tenant = (await sim.stats())["by_tenant"]
    assert sorted(t["cache_writes"] for t in by_tenant.values()) == [1, 1]


async def test_a_bearer_token_is_a_credential_like_an_api_key(api: Api) -> None:
    await api.messages(system_prompt(), key=KEY)
    headers = api.headers(key=None, authorization=f"Bearer {KEY}")
    same = await api.post("/v1/messages", {"model": MODEL, "max_tokens": 5, **system_prompt()}, headers)
    assert counters(same.usage) == (3000, 0, 4)


async def test_two_parallel_cold_requests_both_write(api: Api, sim: SimHandle) -> None:
    first = asyncio.create_task(api.messages(system_prompt(), x_sim_gate="cold"))
    second = asyncio.create_task(api.messages(system_prompt(), x_sim_gate="cold"))
    await asyncio.wait_for(sim.state.gates.wait_for_waiters("cold", 2), 10)
    assert await sim.gates() == {"cold": 2}
    await sim.open_gate("cold")
    replies = await asyncio.gather(first, second)
    assert [counters(r.usage) for r in replies] == [(0, 3000, 4), (0, 3000, 4)]
    assert (await sim.stats())["cache_writes"] == 2
    assert counters((await api.messages(system_prompt())).usage) == (3000, 0, 4)


async def test_an_entry_is_not_readable_before_its_writer_responds(api: Api, sim: SimHandle) -> None:
    writer = asyncio.create_task(api.messages(system_prompt(), x_sim_gate="held"))
    await asyncio.wait_for(sim.state.gates.wait_for_waiters("held", 1), 10)
    late = await api.messages(system_prompt())  # arrives after the writer, answered before it
    await sim.open_gate("held")
    assert counters(late.usage) == (0, 3000, 4)
    assert counters((await writer).usage) == (0, 3000, 4)


async def test_max_tokens_zero_warms_the_prefix_for_the_next_request(api: Api) -> None:
    warm = await api.messages({**system_prompt(), "max_tokens": 0})
    assert warm.body["content"] == [] and warm.body["stop_reason"] == "max_tokens"
    assert warm.usage["output_tokens"] == 0
    assert counters(warm.usage) == (0, 3000, 4)
    follow = await api.messages({"system": [cached(BIG)], "messages": [{"role": "user", "content": "Other?"}]})
    assert counters(follow.usage) == (3000, 0, 2)


async def test_written_tokens_split_by_the_ttl_of_the_breakpoint_closing_each_segment(api: Api) -> None:
    body = {
        "system": [cached(text(3000, "one-hour"), "1h"), cached(text(1000, "five-min"))],
        "messages": [{"role": "user", "content": [cached(text(500, "turn")), plain(QUESTION)]}],
    }
    first = await api.messages(body)
    assert counters(first.usage) == (0, 4500, 4)
    assert first.usage["cache_creation"] == {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 3000}
    body["messages"] = [{"role": "user", "content": [cached(text(700, "new turn"))]}]
    second = await api.messages(body)
    assert counters(second.usage) == (4000, 700, 0)
    assert second.usage["cache_creation"] == {"ephemeral_5m_input_tokens": 700, "ephemeral_1h_input_tokens": 0}


async def test_a_breakpoint_under_the_minimum_leaves_its_tokens_to_the_next_segment(api: Api) -> None:
    body = {
        "system": [cached(text(1000, "small"), "1h"), cached(text(3000, "large"))],
        "messages": [{"role": "user", "content": QUESTION}],
    }
    usage = (await api.messages(body)).usage
    assert counters(usage) == (0, 4000, 4)
    assert usage["cache_creation"] == {"ephemeral_5m_input_tokens": 4000, "ephemeral_1h_input_tokens": 0}


async def test_top_level_cache_control_caches_automatically_up_to_the_last_block(api: Api) -> None:
    turn1: list[dict[str, Any]] = [{"role": "user", "content": BIG}]
    first = await api.messages({"cache_control": {"type": "ephemeral"}, "messages": turn1})
    assert counters(first.usage) == (0, 3000, 0)
    turn2 = [*turn1, {"role": "assistant", "content": "Sure."}, {"role": "user", "content": QUESTION}]
    second = await api.messages({"cache_control": {"type": "ephemeral"}, "messages": turn2})
    assert counters(second.usage) == (3000, 6, 0)


async def test_automatic_caching_walks_back_past_ineligible_blocks(api: Api) -> None:
    # A prefill (allowed on Sonnet 4.5) ending in a thinking block: the automatic breakpoint cannot sit
    # on it and walks back to the user's block.
    messages = [
        {"role": "user", "content": [plain(BIG)]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "sig"}]},
    ]
    body = {"model": "claude-sonnet-4-5", "cache_control": {"type": "ephemeral"}, "messages": messages}
    usage = (await api.messages(body)).usage
    assert counters(usage) == (0, 3000, 1)


async def test_the_billing_header_block_is_left_out_of_cache_identity(api: Api) -> None:
    def body(billing: str) -> dict[str, Any]:
        return {"system": [plain(f"x-anthropic-billing-header: cc_version=2.0; cch={billing};"), cached(BIG)],
                "messages": [{"role": "user", "content": QUESTION}]}

    first = await api.messages(body("aaaaa"))
    second = await api.messages(body("bbbbb"))
    assert counters(second.usage) == (first.usage["cache_creation_input_tokens"], 0, 4)


async def test_another_leading_system_block_changes_identity(api: Api) -> None:
    await api.messages({"system": [plain("You are A."), cached(BIG)], "messages": [{"role": "user", "content": "q"}]})
    other = await api.messages({"system": [plain("You are B."), cached(BIG)],
                                "messages": [{"role": "user", "content": "q"}]})
    assert counters(other.usage)[0] == 0


def layered(tool_choice: str, tool_name: str = "read") -> dict[str, Any]:
    return {
        "tools": [{"name": tool_name, "description": "read a file", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": tool_choice},
        "system": [cached(BIG)],
        "messages": [{"role": "user", "content": [cached(text(1000, "msg"))]}],
    }


async def test_changing_tool_choice_invalidates_messages_but_not_system(api: Api) -> None:
    first = await api.messages(layered("auto"))
    through_system = first.usage["cache_creation_input_tokens"] - 1000
    changed = await api.messages(layered("none"))
    assert counters(changed.usage) == (through_system, 1000, 0)


async def test_changing_a_tool_definition_invalidates_everything(api: Api) -> None:
    await api.messages(layered("auto"))
    assert counters((await api.messages(layered("auto", tool_name="write"))).usage)[0] == 0


async def test_changing_thinking_or_adding_an_image_invalidates_the_messages_level(api: Api) -> None:
    base = {"system": [cached(BIG)], "messages": [{"role": "user", "content": [cached(text(1000, "m"))]}]}
    await api.messages({**base, "max_tokens": 4000})
    thinking = await api.messages({**base, "max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 2000}})
    assert counters(thinking.usage) == (3000, 1000, 0)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    pictured = {**base, "messages": [{"role": "user", "content": [image]}, base["messages"][0]]}
    assert counters((await api.messages(pictured)).usage)[0] == 3000


async def test_changing_speed_invalidates_system_but_not_tools(api: Api) -> None:
    tools = [{"name": f"t{i}", "description": text(200, f"tool{i}"), "input_schema": {"type": "object"}}
             for i in range(12)]
    tools[-1]["cache_control"] = {"type": "ephemeral"}
    body = {"tools": tools, "system": [cached(BIG)], "messages": [{"role": "user", "content": "q"}]}
    first = await api.messages(body)
    tool_tokens = first.usage["cache_creation_input_tokens"] - 3000
    fast = await api.messages({**body, "speed": "fast"})
    assert counters(fast.usage) == (tool_tokens, 3000, 1)


async def test_cache_control_is_not_part_of_identity(api: Api) -> None:
    await api.messages({"system": [cached(BIG, "1h")], "messages": [{"role": "user", "content": QUESTION}]})
    moved = await api.messages({"system": [plain(BIG)], "messages": [{"role": "user", "content": [cached(QUESTION)]}]})
    assert counters(moved.usage) == (3000, 4, 0)


async def test_model_aliases_share_entries_and_other_models_do_not(api: Api) -> None:
    await api.messages({**system_prompt(), "model": "claude-sonnet-4-20250514"})
    alias = await api.messages({**system_prompt(), "model": "claude-sonnet-4-0"})
    other = await api.messages({**system_prompt(), "model": "claude-opus-4-1"})
    assert counters(alias.usage)[0] == 3000
    assert counters(other.usage)[0] == 0


SLOW_DECODE = SimProfile(time_scale=1.0, base_latency_s=0.0, prefill_tokens_per_s=1e12, cached_tokens_per_s=1e12,
                         output_tokens_per_s=0.1, reply_tokens=100)  # decoding would take 1,000 s


async def test_a_streamed_entry_is_readable_from_message_start_on() -> None:
    async with run_sim(SLOW_DECODE) as sim, aiohttp.ClientSession() as session:
        api = Api(sim, session)
        stream_body = orjson.dumps({"model": MODEL, "max_tokens": 500, "stream": True, **system_prompt()})
        async with session.post(sim.url + "/v1/messages", data=stream_body, headers=api.headers()) as resp:
            assert await resp.content.readline() == b"event: message_start\n"
            start = orjson.loads((await resp.content.readline()).removeprefix(b"data: "))
            assert counters(start["message"]["usage"]) == (0, 3000, 4)
            reader = await api.messages(system_prompt(), x_sim_reply_tokens="0")  # the stream is still decoding
            assert counters(reader.usage) == (3000, 0, 4)


async def test_a_non_streamed_entry_is_not_readable_while_its_reply_is_generated() -> None:
    async with run_sim(SLOW_DECODE) as sim, aiohttp.ClientSession() as session:
        api = Api(sim, session)
        writer = asyncio.create_task(api.messages(system_prompt(), x_sim_gate="go"))
        await asyncio.wait_for(sim.state.gates.wait_for_waiters("go", 1), 10)
        await sim.open_gate("go")  # the writer now decodes for 1,000 s before it responds
        other = await api.messages(system_prompt(), x_sim_reply_tokens="0")
        assert counters(other.usage) == (0, 3000, 4)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
