"""The bodies the proxy builds (cut, next turn, warm requests) are bodies today's models accept."""

from __future__ import annotations

from typing import Any

from specproxy.bodies import cut, next_turn, warm_request
from specproxy.prefix import compute
from tests.strict_upstream import refusal

T = "t" * 64
MODEL = "claude-sonnet-4-6"


def _tool_conversation() -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 64,
        "tools": [{"name": "search", "input_schema": {"type": "object"}},
                  {"name": "fetch", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "fetch"},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "find it"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Looking. "},
                {"type": "tool_use", "id": "tu_1", "name": "search", "input": {"q": "a"}},
                {"type": "tool_use", "id": "tu_2", "name": "fetch", "input": {"u": "b"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "tu_1", "content": "r1"},
                {"type": "tool_result", "tool_use_id": "tu_2", "content": "r2"},
                {"type": "text", "text": "and now?"},
            ]},
        ],
    }


def _pairs_ok(messages: list[dict[str, Any]]) -> bool:
    """Every tool_result answers a tool_use of the previous assistant turn, and every tool_use is answered."""
    for i, m in enumerate(messages):
        content = m["content"] if isinstance(m["content"], list) else []
        if m["role"] == "assistant":
            uses = {b["id"] for b in content if b.get("type") == "tool_use"}
            nxt = messages[i + 1]["content"] if i + 1 < len(messages) else []
            results = {b["tool_use_id"] for b in nxt if isinstance(b, dict) and b.get("type") == "tool_result"} if \
                isinstance(nxt, list) else set()
            if uses != results:
                return False
    return True


def test_every_cut_of_a_tool_conversation_ends_on_a_user_turn_and_keeps_tool_pairs() -> None:
    body = _tool_conversation()
    p = compute(body, T)
    for pos in range(p.item_count):
        made = cut(body, p, pos)
        assert made is not None
        out, identity = made
        msgs = out["messages"]
        assert msgs and msgs[-1]["role"] == "user", pos
        assert refusal(out) is None
        assert _pairs_ok(msgs), (pos, msgs)
        assert identity.last_breakpoint is not None and identity.last_breakpoint.position == pos
        assert compute(out, T).chain[: pos + 1] == identity.chain


def test_a_cut_in_tools_drops_a_tool_choice_naming_a_removed_tool() -> None:
    body = _tool_conversation()
    p = compute(body, T)
    out, _ = cut(body, p, 0) or ({}, None)  # cut after the first tool: "fetch" is gone
    assert [t["name"] for t in out["tools"]] == ["search"]
    assert "tool_choice" not in out
    assert out["messages"][-1]["role"] == "user"


def test_a_cut_in_messages_keeps_every_tool_so_tool_choice_still_names_one() -> None:
    body = _tool_conversation()
    p = compute(body, T)
    last = p.item_count - 1
    out, _ = cut(body, p, last) or ({}, None)
    named = out["tool_choice"]["name"]
    assert named in {t["name"] for t in out["tools"]}


def test_next_turn_ends_on_a_placeholder_user_turn_with_the_breakpoint_on_the_reply() -> None:
    body = {"model": MODEL, "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "question", "cache_control": {"type": "ephemeral"}}]}]}
    p = compute(body, T)
    reply = [{"type": "text", "text": "An answer that ends in a space "}]
    made = next_turn(body, p, reply)
    assert made is not None
    out, identity = made
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert out["messages"][1]["content"][-1]["text"] == reply[0]["text"]  # the reply exactly as it came
    assert refusal(out) is None and "stream" not in out
    # The identity was extended, not recomputed, and equals recomputing the body.
    recomputed = compute(out, T)
    assert recomputed.chain[: identity.item_count] == identity.chain
    assert recomputed.breakpoints == identity.breakpoints


def test_next_turn_after_tool_calls_closes_with_their_results() -> None:
    body = {"model": MODEL, "max_tokens": 64, "tools": [{"name": "search", "input_schema": {}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "q",
                                                        "cache_control": {"type": "ephemeral"}}]}]}
    p = compute(body, T)
    reply = [{"type": "text", "text": "Let me look."}, {"type": "tool_use", "id": "tu_9", "name": "search",
                                                        "input": {}}]
    out, _ = next_turn(body, p, reply) or ({}, None)
    assert out["messages"][-1] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "tu_9", "content": "."}]}
    assert _pairs_ok(out["messages"])


def test_a_warm_with_breakpoints_only_in_system_drops_thinking_and_tool_choice() -> None:
    body = {"model": MODEL, "max_tokens": 64, "thinking": {"type": "enabled", "budget_tokens": 1024},
            "tool_choice": {"type": "any"}, "tools": [{"name": "x", "input_schema": {}}],
            "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "hi"}]}
    sent = warm_request(body, compute(body, T))
    assert "thinking" not in sent and "tool_choice" not in sent and "max_tokens" not in sent
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "hi",
                                                       "cache_control": {"type": "ephemeral"}}]}]
    sent = warm_request(body, compute(body, T))  # a breakpoint in messages: they change that prefix
    assert "thinking" in sent and "tool_choice" in sent
