"""Requests the Messages API refuses, refused the same way; requests real clients send, accepted."""

from __future__ import annotations

from typing import Any

import pytest

from .helpers import MODEL, Api, Reply, cached, plain, text

TTL_ORDER_TAIL = (
    "a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block. "
    "Note that blocks are processed in the following order: `tools`, `system`, `messages`."
)
USER_HI = [{"role": "user", "content": "hi"}]


def assert_error(reply: Reply, status: int, error_type: str) -> str:
    """The reply is an Anthropic error of that status and type; returns its message."""
    assert reply.status == status
    assert reply.body["type"] == "error"
    assert reply.body["error"]["type"] == error_type
    assert reply.body["request_id"].startswith("req_")
    assert reply.headers["request-id"] == reply.body["request_id"]
    message: str = reply.body["error"]["message"]
    return message


async def test_five_breakpoints_are_refused_with_the_api_message(api: Api) -> None:
    system = [cached(f"block {i}") for i in range(5)]
    reply = await api.messages({"system": system, "messages": USER_HI})
    assert assert_error(reply, 400, "invalid_request_error") == (
        "A maximum of 4 blocks with cache_control may be provided. Found 5.")


async def test_top_level_cache_control_counts_as_one_breakpoint(api: Api) -> None:
    body = {"system": [cached(f"block {i}") for i in range(4)], "messages": USER_HI,
            "cache_control": {"type": "ephemeral"}}
    message = assert_error(await api.messages(body), 400, "invalid_request_error")
    assert message == "A maximum of 4 blocks with cache_control may be provided. Found 5."
    body["system"] = body["system"][:3]
    assert (await api.messages(body)).status == 200


async def test_a_one_hour_breakpoint_after_a_five_minute_one_is_refused(api: Api) -> None:
    body = {"system": [cached("first", "5m")], "messages": [{"role": "user", "content": [cached("x", "1h")]}]}
    message = assert_error(await api.messages(body), 400, "invalid_request_error")
    assert message.endswith(": " + TTL_ORDER_TAIL)
    assert message.startswith("messages.0.content.0.cache_control")


async def test_ttl_order_follows_tools_then_system_then_messages(api: Api) -> None:
    tool = {"name": "t", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    ok = {"tools": [tool], "system": [cached("s")], "messages": USER_HI}
    assert (await api.messages(ok)).status == 200
    bad = {"tools": [{**tool, "cache_control": {"type": "ephemeral"}}], "system": [cached("s", "1h")],
           "messages": USER_HI}
    assert assert_error(await api.messages(bad), 400, "invalid_request_error").endswith(TTL_ORDER_TAIL)


async def test_a_missing_credential_is_401(api: Api) -> None:
    reply = await api.post("/v1/messages", {"model": MODEL, "max_tokens": 1, "messages": USER_HI},
                           api.headers(key=None))
    assert_error(reply, 401, "authentication_error")


async def test_a_missing_anthropic_version_is_400(api: Api) -> None:
    reply = await api.post("/v1/messages", {"model": MODEL, "max_tokens": 1, "messages": USER_HI},
                           api.headers(version=None))
    assert "anthropic-version" in assert_error(reply, 400, "invalid_request_error")


async def test_an_unknown_model_is_404_naming_it(api: Api) -> None:
    reply = await api.messages({"model": "claude-nonexistent", "messages": USER_HI})
    assert assert_error(reply, 404, "not_found_error") == "model: claude-nonexistent"


async def test_a_body_over_32_mb_is_413_in_the_api_error_shape(api: Api) -> None:
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "a" * (32 * 1024 * 1024)}]}
    assert_error(await api.post("/v1/messages", body), 413, "request_too_large")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "JSON"),
        (b"[1, 2]", "object"),
        ({"max_tokens": 1, "messages": USER_HI}, "model"),
        ({"model": 7, "max_tokens": 1, "messages": USER_HI}, "model"),
        ({"model": MODEL, "messages": USER_HI}, "max_tokens"),
        ({"model": MODEL, "max_tokens": -1, "messages": USER_HI}, "max_tokens"),
        ({"model": MODEL, "max_tokens": "9", "messages": USER_HI}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 1}, "messages"),
        ({"model": MODEL, "max_tokens": 1, "messages": []}, "messages"),
        ({"model": MODEL, "max_tokens": 1, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"model": MODEL, "max_tokens": 1, "messages": USER_HI, "system": 5}, "system"),
        ({"model": MODEL, "max_tokens": 1, "messages": USER_HI, "system": [{"type": "image"}]}, "system.0"),
        ({"model": MODEL, "max_tokens": 1, "messages": USER_HI, "tools": {"name": "t"}}, "tools"),
    ],
)
async def test_a_malformed_body_is_400_naming_the_field(api: Api, body: Any, field: str) -> None:
    assert field in assert_error(await api.post("/v1/messages", body), 400, "invalid_request_error")


@pytest.mark.parametrize(
    "extra",
    [
        {"stream": True},
        {"thinking": {"type": "enabled", "budget_tokens": 1024}},
        {"tool_choice": {"type": "any"}},
        {"tool_choice": {"type": "tool", "name": "t"}},
        {"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
    ],
)
async def test_max_tokens_zero_is_refused_with_these_parameters(api: Api, extra: dict[str, Any]) -> None:
    reply = await api.messages({"max_tokens": 0, "messages": USER_HI, **extra})
    assert "max_tokens" in assert_error(reply, 400, "invalid_request_error")


async def test_cache_control_on_a_thinking_block_is_refused(api: Api) -> None:
    thinking = {"type": "thinking", "thinking": "hm", "signature": "s", "cache_control": {"type": "ephemeral"}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [thinking, plain("ok")]},
                {"role": "user", "content": "go on"}]
    assert assert_error(await api.messages({"messages": messages}), 400, "invalid_request_error") == (
        "messages.1.content.0.thinking.cache_control: Extra inputs are not permitted")


async def test_cache_control_on_an_empty_text_block_is_refused(api: Api) -> None:
    reply = await api.messages({"messages": [{"role": "user", "content": [plain("hi"), cached("")]}]})
    assert assert_error(reply, 400, "invalid_request_error") == (
        "messages.0.content.1.text: cache_control cannot be set for empty text blocks")


async def test_an_unknown_top_level_field_is_refused_naming_it(api: Api) -> None:
    reply = await api.messages({"messages": USER_HI, "some_future_field": {"x": 1}, "metadata": {"user_id": "u"}})
    assert assert_error(reply, 400, "invalid_request_error") == "some_future_field: Extra inputs are not permitted"


async def test_an_unknown_message_field_is_refused_naming_it(api: Api) -> None:
    reply = await api.messages({"messages": [{"role": "user", "content": "hi", "name": "Init"}]})
    assert assert_error(reply, 400, "invalid_request_error") == "messages.0.name: Extra inputs are not permitted"


def claude_code_body() -> dict[str, Any]:
    """A request shaped like Claude Code's: billing header, many tools, thinking, beta features."""
    tools = [{"name": f"Tool{i}", "description": text(100, f"tool {i}"),
              "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}} for i in range(40)]
    tools[-1]["cache_control"] = {"type": "ephemeral"}
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}
    return {
        "model": MODEL,
        "max_tokens": 32000,
        "system": [plain("x-anthropic-billing-header: cc_version=2.0.0; cc_entrypoint=cli; cch=12345;"),
                   cached("You are Claude Code.")],
        "tools": tools,
        "tool_choice": {"type": "auto"},
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "metadata": {"user_id": "user_abc"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "temperature": 1,
        "top_p": 0.99,
        "stop_sequences": ["\n\nHuman:"],
        "output_config": {"effort": "high"},
        "service_tier": "auto",
        "stream": True,
        "messages": [
            {"role": "user", "content": [image, pdf, plain("Look at these.")]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Let me read.", "signature": "c2ln"},
                {"type": "tool_use", "id": "toolu_01", "name": "Tool0", "input": {"path": "a.py"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "print(1)"},
                {"type": "text", "text": "Now fix it.", "cache_control": {"type": "ephemeral"}},
            ]},
        ],
    }


async def test_a_claude_code_shaped_request_is_accepted(api: Api) -> None:
    beta = "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,oauth-2025-04-20"
    reply = await api.post("/v1/messages?beta=true", claude_code_body(), api.headers(anthropic_beta=beta))
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert b"event: message_stop" in reply.raw
