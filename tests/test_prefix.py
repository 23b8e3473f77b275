"""Prefix identity: the hash chain, breakpoints and lookback candidates."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from specproxy.prefix import LOOKBACK, PrefixError, compute, prefix_id, tenant_digest

T = tenant_digest("sk-ant-tenant-a")


def body(n_blocks: int = 3, *, bp: int | None = None, **extra: Any) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = [{"type": "text", "text": f"block {i}"} for i in range(n_blocks)]
    if bp is not None:
        blocks[bp]["cache_control"] = {"type": "ephemeral"}
    return {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": blocks}], **extra}


def test_chain_has_one_value_per_item_and_breakpoints_are_positions() -> None:
    p = compute({**body(3, bp=1), "system": "sys", "tools": [{"name": "t", "input_schema": {}}]}, T)
    assert p.item_count == 5  # 1 tool + 1 system + 3 blocks
    assert [b.position for b in p.breakpoints] == [3]


def test_appending_blocks_never_changes_earlier_chain_values() -> None:
    short = compute(body(3), T)
    longer = compute(body(6), T)
    assert longer.chain[:3] == short.chain


def test_cache_control_and_key_order_do_not_change_identity() -> None:
    a = body(3, bp=2)
    b = body(3)
    b["messages"][0]["content"][2] = {"text": "block 2", "type": "text"}
    assert compute(a, T).chain == compute(b, T).chain


def test_changing_an_earlier_block_changes_every_later_value() -> None:
    a = body(4)
    b = copy.deepcopy(a)
    b["messages"][0]["content"][1]["text"] = "changed"
    ca, cb = compute(a, T).chain, compute(b, T).chain
    assert ca[0] == cb[0]
    assert all(x != y for x, y in zip(ca[1:], cb[1:], strict=True))


def test_tenants_and_models_never_share_a_chain_value() -> None:
    a = compute(body(2), T)
    other_tenant = compute(body(2), tenant_digest("sk-ant-tenant-b"))
    other_model = compute({**body(2), "model": "claude-opus-4-5"}, T)
    assert not set(a.chain) & set(other_tenant.chain)
    assert not set(a.chain) & set(other_model.chain)


def test_message_level_invalidators_keep_tools_and_system_values() -> None:
    base = {**body(2), "system": "s", "tools": [{"name": "t", "input_schema": {}}]}
    with_choice = {**base, "tool_choice": {"type": "auto"}}
    a, b = compute(base, T).chain, compute(with_choice, T).chain
    assert a[:2] == b[:2]  # tool and system untouched
    assert a[2] != b[2]  # messages level invalidated


def test_plain_string_system_and_content_equal_one_text_block() -> None:
    a = {"model": "m", "system": "hello", "messages": [{"role": "user", "content": "hi"}]}
    b = {
        "model": "m",
        "system": [{"type": "text", "text": "hello"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    }
    assert compute(a, T).chain == compute(b, T).chain


def test_volatile_billing_header_block_is_left_out_of_identity() -> None:
    def with_billing(tag: str) -> dict[str, Any]:
        return {
            **body(1),
            "system": [
                {"type": "text", "text": f"x-anthropic-billing-header: cc_version=1.0; cch={tag};"},
                {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
            ],
        }

    vol = ("x-anthropic-billing-header",)
    a, b = compute(with_billing("a"), T, vol), compute(with_billing("b"), T, vol)
    assert a.chain == b.chain
    assert a.breakpoints[0].position == 1  # the billing block keeps position 0: lookback counts it
    assert compute(with_billing("a"), T).chain != compute(with_billing("b"), T).chain


def test_role_and_message_index_are_part_of_identity() -> None:
    blocks = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    one = {"model": "m", "messages": [{"role": "user", "content": blocks}]}
    two = {"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    assert compute(one, T).chain[1] != compute(two, T).chain[1]


def test_automatic_cache_control_lands_on_last_cacheable_block() -> None:
    b = body(3, cache_control={"type": "ephemeral", "ttl": "1h"})
    b["messages"].append({"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": "s"}]})
    p = compute(b, T)
    assert [(bp.position, bp.ttl) for bp in p.breakpoints] == [(2, "1h")]


def test_more_than_four_breakpoints_is_refused_with_the_api_message() -> None:
    b = body(5)
    for blk in b["messages"][0]["content"]:
        blk["cache_control"] = {"type": "ephemeral"}
    with pytest.raises(PrefixError, match=r"A maximum of 4 blocks with cache_control may be provided. Found 5."):
        compute(b, T)


def test_candidates_cover_twenty_positions_per_breakpoint_longest_first() -> None:
    p = compute(body(30, bp=25), T)
    positions = [pos for pos, _ in p.candidates()]
    assert positions == list(range(25, 25 - LOOKBACK, -1))
    assert 5 not in positions and 6 in positions


def test_prefix_id_is_sixteen_hex_characters() -> None:
    pid = prefix_id(compute(body(1, bp=0), T).chain[0])
    assert len(pid) == 16 and int(pid, 16) >= 0


@pytest.mark.parametrize(
    "bad",
    [
        {"messages": []},
        {"model": "m", "messages": "nope"},
        {"model": "m", "messages": [], "system": 3},
        {"model": "m", "messages": [{"role": "user", "content": 5}]},
        {"model": "m", "messages": [], "tools": {}},
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": 7}]}]},
    ],
)
def test_unusable_shapes_raise_prefix_error(bad: dict[str, Any]) -> None:
    with pytest.raises(PrefixError):
        compute(bad, T)


def test_cut_and_added_breakpoint_equal_recomputing_the_changed_body() -> None:
    from specproxy.bodies import cut, with_breakpoint_at

    full = {**body(6, bp=1), "system": [{"type": "text", "text": "s"}], "tools": [{"name": "t", "input_schema": {}}]}
    p = compute(full, T)
    for pos in range(p.item_count):
        made = cut(full, p, pos)
        assert made is not None
        cut_body, cut_identity = made
        recomputed = compute(cut_body, T)
        # (a cut body ends on a user turn: a placeholder after the cut changes nothing before it)
        assert recomputed.chain[: pos + 1] == cut_identity.chain
        assert recomputed.breakpoints == cut_identity.breakpoints
        if pos in p.cacheable:
            marked = with_breakpoint_at(full, p, pos)
            assert compute(marked, T).breakpoints == p.with_breakpoint(pos).breakpoints
            assert compute(marked, T).chain == p.chain
