"""The SSE stream follows the Messages API's exact event sequence; replies are sized and cut."""

from __future__ import annotations

from typing import Any

import orjson

from .helpers import Api, cached, text

QUESTION: Any = [{"role": "user", "content": "Hello"}]


def parse_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs; every event must have both an ``event:`` and a ``data:`` line."""
    events = []
    for chunk in raw.decode().split("\n\n"):
        if not chunk.strip():
            continue
        lines = dict(line.split(": ", 1) for line in chunk.split("\n"))
        data = orjson.loads(lines["data"])
        assert data["type"] == lines["event"]
        events.append((lines["event"], data))
    return events


async def test_stream_events_come_in_the_api_order(api: Api) -> None:
    body = {"system": [cached(text(3000, "s"))], "messages": QUESTION, "stream": True}
    await api.messages(body)
    reply = await api.messages(body)
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = parse_sse(reply.raw)
    names = [name for name, _ in events]
    deltas = names.count("content_block_delta")
    assert deltas >= 2
    assert names == ["message_start", "content_block_start", "ping", *["content_block_delta"] * deltas,
                     "content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["id"].startswith("msg_")
    assert start["usage"]["cache_read_input_tokens"] == 3000 and start["usage"]["input_tokens"] == 2
    assert start["usage"]["output_tokens"] == 1
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {"input_tokens": 2, "cache_creation_input_tokens": 0,
                              "cache_read_input_tokens": 3000, "output_tokens": 12}
    streamed = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert len(streamed) == 4 * 12


async def test_the_reply_is_cut_at_max_tokens(api: Api) -> None:
    reply = await api.messages({"messages": QUESTION, "max_tokens": 5})
    assert reply.body["stop_reason"] == "max_tokens"
    assert reply.usage["output_tokens"] == 5 and len(reply.body["content"][0]["text"]) == 20


async def test_a_header_sets_the_reply_length_for_one_request(api: Api) -> None:
    reply = await api.messages({"messages": QUESTION, "max_tokens": 1000}, x_sim_reply_tokens="300")
    assert reply.body["stop_reason"] == "end_turn" and reply.usage["output_tokens"] == 300


async def test_a_pre_warm_answers_empty_content_and_zero_output(api: Api) -> None:
    reply = await api.messages({"messages": QUESTION, "max_tokens": 0})
    assert reply.status == 200
    assert reply.body["content"] == [] and reply.body["stop_reason"] == "max_tokens"
    assert reply.body["type"] == "message" and reply.body["role"] == "assistant"
    assert reply.usage["output_tokens"] == 0


async def test_the_model_name_is_echoed_as_sent(api: Api) -> None:
    reply = await api.messages({"messages": QUESTION, "model": "claude-haiku-4-5"})
    assert reply.body["model"] == "claude-haiku-4-5"
