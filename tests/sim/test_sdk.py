"""The official anthropic SDK, unchanged but for base_url and api_key, works against the simulator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest
from anthropic.types import Message, MessageTokensCount, ModelInfo, TextBlock, Usage

from specproxy.testing import SimHandle

from .helpers import KEY, MODEL, text

SYSTEM: Any = [{"type": "text", "text": text(3000, "sdk"), "cache_control": {"type": "ephemeral"}}]
MESSAGES: Any = [{"role": "user", "content": "Hello"}]


@pytest.fixture
async def client(sim: SimHandle) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=sim.url, api_key=KEY, max_retries=0) as c:
        yield c


async def test_async_create_returns_a_typed_message_with_cache_usage(client: anthropic.AsyncAnthropic) -> None:
    first = await client.messages.create(model=MODEL, max_tokens=100, system=SYSTEM, messages=MESSAGES)
    second = await client.messages.create(model=MODEL, max_tokens=100, system=SYSTEM, messages=MESSAGES)
    assert isinstance(first, Message) and isinstance(first.usage, Usage)
    assert first.id.startswith("msg_") and first.role == "assistant" and first.model == MODEL
    assert isinstance(first.content[0], TextBlock) and first.stop_reason == "end_turn"
    assert first.usage.cache_creation_input_tokens == 3000 and first.usage.cache_read_input_tokens == 0
    assert first.usage.cache_creation is not None and first.usage.cache_creation.ephemeral_5m_input_tokens == 3000
    assert second.usage.cache_read_input_tokens == 3000 and second.usage.input_tokens == 2
    assert second.usage.output_tokens == 12 and second.usage.service_tier == "standard"


async def test_sync_client_works_from_a_thread(sim: SimHandle) -> None:
    def call() -> Message:
        with anthropic.Anthropic(base_url=sim.url, api_key=KEY, max_retries=0) as sync:
            return sync.messages.create(model=MODEL, max_tokens=100, system=SYSTEM, messages=MESSAGES)

    message = await asyncio.to_thread(call)
    assert isinstance(message, Message)
    assert message.usage.cache_creation_input_tokens == 3000


async def test_stream_yields_text_and_a_final_message_with_usage(client: anthropic.AsyncAnthropic) -> None:
    await client.messages.create(model=MODEL, max_tokens=0, system=SYSTEM, messages=MESSAGES)
    async with client.messages.stream(model=MODEL, max_tokens=100, system=SYSTEM, messages=MESSAGES) as stream:
        pieces = [piece async for piece in stream.text_stream]
        final = await stream.get_final_message()
    assert len(pieces) >= 2
    assert isinstance(final, Message) and final.stop_reason == "end_turn"
    assert isinstance(final.content[0], TextBlock) and final.content[0].text == "".join(pieces)
    assert final.usage.cache_read_input_tokens == 3000 and final.usage.output_tokens == 12


async def test_count_tokens_counts_the_prompt(client: anthropic.AsyncAnthropic) -> None:
    count = await client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=MESSAGES)
    assert isinstance(count, MessageTokensCount) and count.input_tokens == 3002


async def test_models_list_and_retrieve(client: anthropic.AsyncAnthropic) -> None:
    page = await client.models.list(limit=3)
    assert len(page.data) == 3 and all(isinstance(m, ModelInfo) for m in page.data)
    assert page.has_more
    every = [m.id async for m in client.models.list(limit=4)]  # the SDK pages through after_id
    assert MODEL in every and len(every) == len(set(every))
    model = await client.models.retrieve(MODEL)
    assert model.id == MODEL and model.display_name == "Claude Sonnet 4.6"
    with pytest.raises(anthropic.NotFoundError):
        await client.models.retrieve("claude-nonexistent")


async def test_raw_response_headers_carry_a_request_id(client: anthropic.AsyncAnthropic) -> None:
    raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=5, messages=MESSAGES)
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["anthropic-ratelimit-requests-limit"].isdigit()
    assert isinstance(await raw.parse(), Message)


async def test_sdk_errors_carry_the_request_id(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        await client.messages.create(model="claude-nonexistent", max_tokens=5, messages=MESSAGES)
    assert info.value.request_id is not None and info.value.request_id.startswith("req_")
