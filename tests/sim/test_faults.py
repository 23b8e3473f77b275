"""Faults injected with ``x-sim-fault``, gates, and shutdown with requests still held."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import anthropic
import httpx2
import pytest

from specproxy.testing import SimHandle, run_sim

from .helpers import KEY, MODEL, Api, cached, text

SYSTEM: Any = [{"type": "text", "text": text(3000, "faults"), "cache_control": {"type": "ephemeral"}}]
MESSAGES: Any = [{"role": "user", "content": "Hello"}]


def client(sim: SimHandle, **kwargs: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=sim.url, api_key=KEY, max_retries=0, **kwargs)


async def create(sim: SimHandle, fault: str, **kwargs: Any) -> Any:
    async with client(sim, **kwargs) as c:
        return await c.messages.create(model=MODEL, max_tokens=50, system=SYSTEM, messages=MESSAGES,
                                       extra_headers={"x-sim-fault": fault})


async def test_overloaded_fault_is_a_529(sim: SimHandle) -> None:
    with pytest.raises(anthropic.OverloadedError) as info:
        await create(sim, "overloaded")
    assert info.value.status_code == 529
    assert info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


async def test_rate_limit_fault_is_a_429_with_retry_after(sim: SimHandle) -> None:
    with pytest.raises(anthropic.RateLimitError) as info:
        await create(sim, "rate_limit")
    headers = info.value.response.headers
    assert headers["retry-after"] == "1"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert headers["request-id"].startswith("req_")


async def test_api_error_fault_is_a_500(sim: SimHandle) -> None:
    with pytest.raises(anthropic.InternalServerError) as info:
        await create(sim, "api_error")
    assert info.value.status_code == 500


async def test_error_faults_write_nothing(sim: SimHandle) -> None:
    for fault in ("overloaded", "rate_limit", "api_error"):
        with pytest.raises(anthropic.APIStatusError):
            await create(sim, fault)
    assert (await sim.stats())["cache_writes"] == 0


async def test_disconnect_mid_stream_is_an_error_for_the_sdk(sim: SimHandle) -> None:
    received: list[str] = []
    async with client(sim) as c:
        with pytest.raises((anthropic.APIConnectionError, httpx2.TransportError)):
            async with c.messages.stream(model=MODEL, max_tokens=50, system=SYSTEM, messages=MESSAGES,
                                         extra_headers={"x-sim-fault": "disconnect_mid_stream"}) as stream:
                async for piece in stream.text_stream:
                    received.append(piece)
    assert len(received) == 2  # message_start and two deltas arrived, then the connection dropped
    assert (await sim.stats())["cache_writes"] == 1  # the response had begun: its write counts


async def test_disconnect_without_stream_closes_before_any_response(sim: SimHandle) -> None:
    with pytest.raises(anthropic.APIConnectionError):
        await create(sim, "disconnect_mid_stream")
    assert (await sim.stats())["cache_writes"] == 0  # no response began, so nothing became readable
    log = await sim.requests()
    assert log[-1]["response_started_at"] is None


async def test_stall_never_answers_until_the_client_gives_up(sim: SimHandle) -> None:
    with pytest.raises(anthropic.APITimeoutError):
        await create(sim, "stall", timeout=0.3)
    await asyncio.wait_for(sim.state.gates.wait_for_stalled(0), 10)  # the handler ended with the connection
    assert (await sim.stats())["cache_writes"] == 0


async def test_shutdown_releases_stalled_and_gated_requests() -> None:
    async with run_sim() as sim, aiohttp.ClientSession() as session:
        api = Api(sim, session)
        body = {"system": [cached(text(3000, "x"))], "messages": MESSAGES}
        stalled = asyncio.create_task(api.messages(body, x_sim_fault="stall"))
        gated = asyncio.create_task(api.messages(body, x_sim_gate="never"))
        await asyncio.wait_for(sim.state.gates.wait_for_stalled(1), 10)
        await asyncio.wait_for(sim.state.gates.wait_for_waiters("never", 1), 10)
    for task in (stalled, gated):
        with pytest.raises(aiohttp.ClientError):
            await task


async def test_a_gated_fault_fails_only_when_its_gate_opens(api: Api, sim: SimHandle) -> None:
    failing = asyncio.create_task(api.messages({"messages": MESSAGES}, x_sim_fault="overloaded", x_sim_gate="f"))
    await asyncio.wait_for(sim.state.gates.wait_for_waiters("f", 1), 10)
    assert not failing.done()
    await sim.open_gate("f")
    assert (await failing).status == 529


async def test_an_unknown_fault_is_refused(api: Api) -> None:
    reply = await api.messages({"messages": MESSAGES}, x_sim_fault="meteor")
    assert reply.status == 400 and "x-sim-fault" in reply.body["error"]["message"]


async def test_an_open_gate_lets_later_requests_through_until_reset(api: Api, sim: SimHandle) -> None:
    await sim.open_gate("g")
    assert (await api.messages({"messages": MESSAGES}, x_sim_gate="g")).status == 200
    await sim.reset()
    held = asyncio.create_task(api.messages({"messages": MESSAGES}, x_sim_gate="g"))
    await asyncio.wait_for(sim.state.gates.wait_for_waiters("g", 1), 10)
    assert await sim.gates() == {"g": 1}
    await sim.open_gate("g")
    assert (await held).status == 200
    assert await sim.gates() == {}


async def test_a_delay_header_is_accepted(api: Api) -> None:
    assert (await api.messages({"messages": MESSAGES}, x_sim_delay_ms="1")).status == 200
