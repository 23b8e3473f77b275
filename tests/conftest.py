"""Shared fixtures: a simulator and a proxy in front of it, both real servers on loopback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from specproxy.logs import JSONFormatter
from specproxy.testing import ProxyHandle, SimHandle, run_proxy, run_sim

KEY_A = "sk-ant-test-tenant-a-0001"
KEY_B = "sk-ant-test-tenant-b-0002"
MODEL = "claude-sonnet-4-6"
# ~13k characters: ~3.3k tokens by the simulator's approximation, above Sonnet 4.6's 2048 minimum.
CONTEXT = "".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(300))


def headers(key: str = KEY_A, **extra: str) -> dict[str, str]:
    return {"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json", **extra}


def question_body(
    question: str = "What does function_7 return?",
    *,
    context: str = CONTEXT,
    max_tokens: int = 64,
    stream: bool = False,
    extra_blocks: int = 0,
    breakpoint_on_last: bool = False,
) -> dict[str, Any]:
    """The cookbook's shape: a context block with a breakpoint, then the question."""
    blocks: list[dict[str, Any]] = [{"type": "text", "text": context, "cache_control": {"type": "ephemeral"}}]
    blocks += [{"type": "text", "text": f"note {i}"} for i in range(extra_blocks)]
    blocks.append({"type": "text", "text": question})
    if breakpoint_on_last:
        blocks[-1]["cache_control"] = {"type": "ephemeral"}
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": blocks}]}
    if stream:
        body["stream"] = True
    return body


def warm_body(context: str = CONTEXT) -> dict[str, Any]:
    """What an app sends to /prewarm: the shared context, breakpoint on its last block."""
    return {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": context, "cache_control": {"type": "ephemeral"}}]}
        ],
    }


async def eventually(check: Callable[[], Awaitable[bool] | bool], *, timeout: float = 10.0) -> None:
    """Wait until ``check()`` is true: for states reached by another task (never for timings)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


@pytest.fixture
async def sim() -> AsyncIterator[SimHandle]:
    async with run_sim(time_scale=0.0) as s:
        yield s


@pytest.fixture
async def proxy(sim: SimHandle) -> AsyncIterator[ProxyHandle]:
    async with run_proxy(sim.url, max_hold=10.0) as p:
        yield p


@pytest.fixture
async def client(proxy: ProxyHandle) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The official SDK pointed at the proxy: nothing changed but ``base_url``."""
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=KEY_A, max_retries=0) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Every record of the ``specproxy`` logger tree at INFO and above, for the duration of a test."""
    handler = _Records()
    root = logging.getLogger("specproxy")
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def access_lines(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    """The access lines so far, as the JSON formatter writes them (parsed back)."""
    fmt = JSONFormatter()
    return [orjson.loads(fmt.format(r)) for r in records if r.name == "specproxy.access"]
