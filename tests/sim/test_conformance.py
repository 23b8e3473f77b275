"""The simulator refuses what the Messages API refuses: one test per row of docs/simulator.md's
conformance table (the rows on prefill, conversations, fields, lookback, minimums, automatic caching
and workspaces; the older rows' tests are in test_validation.py and test_caching.py)."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from anthropic.types import message_create_params
from anthropic.types.beta import message_create_params as beta_create_params

from specproxy.sim import DEFAULT_MODELS, SimProfile
from specproxy.sim.profile import load_profile, profile_from_mapping
from specproxy.sim.validate import MESSAGES_FIELDS
from specproxy.testing import run_sim

from .helpers import KEY, MODEL, OTHER_KEY, Api, cached, plain, text
from .test_validation import assert_error

PREFILL = "This model does not support assistant message prefill. The conversation must end with a user message."
NO_PREFILL = [m.id for m in DEFAULT_MODELS if not m.prefill]
WITH_PREFILL = [m.id for m in DEFAULT_MODELS if m.prefill]
BIG = text(5000, "big")  # over every model's minimum


def counters(usage: dict[str, Any]) -> tuple[int, int, int]:
    return usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"], usage["input_tokens"]


def user(*blocks: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


def assistant(*blocks: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": list(blocks)}


def tool_use(tid: str) -> dict[str, Any]:
    return {"type": "tool_use", "id": tid, "name": "read", "input": {"path": tid}}


def tool_result(tid: str, content: str = "ok") -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tid, "content": content}


# --- prefill and the capability table -------------------------------------------------------------

def test_the_capability_table_refuses_prefill_from_claude_4_6_on() -> None:
    assert set(NO_PREFILL) == {"claude-opus-4-8", "claude-opus-4-7", "claude-opus-4-6", "claude-sonnet-4-6"}


@pytest.mark.parametrize("model", NO_PREFILL)
async def test_prefill_is_refused_by_models_without_it(api: Api, model: str) -> None:
    body = {"model": model, "messages": [user(plain("Say hi")), assistant(plain("Hi"))]}
    assert assert_error(await api.messages(body), 400, "invalid_request_error") == PREFILL


@pytest.mark.parametrize("model", WITH_PREFILL)
async def test_prefill_is_accepted_by_models_with_it(api: Api, model: str) -> None:
    body = {"model": model, "max_tokens": 8, "messages": [user(plain("Say hi")), assistant(plain("Hi"))]}
    assert (await api.messages(body)).status == 200


async def test_a_models_file_extends_the_capability_table(tmp_path: Path) -> None:
    toml = tmp_path / "models.toml"
    toml.write_text('[models."claude-sonnet-4-5"]\nprefill = false\n'
                    '[models."claude-next"]\nprefill = false\nmax_output_tokens = 10\nmin_cache_tokens = 50\n')
    jsonfile = tmp_path / "models.json"
    jsonfile.write_text(json.dumps({"models": {"claude-json": {"max_output_tokens": 7}}}))
    profile = load_profile(models=toml, time_scale=0)
    index = profile.model_index()
    assert not index["claude-sonnet-4-5-20250929"].prefill
    assert (index["claude-next"].prefill, index["claude-next"].max_output_tokens) == (False, 10)
    assert load_profile(models=jsonfile).model_index()["claude-json"].max_output_tokens == 7
    async with run_sim(profile) as sim, aiohttp.ClientSession() as session:
        api = Api(sim, session)
        body = {"model": "claude-sonnet-4-5", "messages": [user(plain("q")), assistant(plain("a"))]}
        assert assert_error(await api.messages(body), 400, "invalid_request_error") == PREFILL
        body = {"model": "claude-next", "max_tokens": 11, "messages": [user(plain("q"))]}
        assert "maximum allowed number of output tokens for claude-next" in assert_error(
            await api.messages(body), 400, "invalid_request_error")
        warm = {"model": "claude-next", "max_tokens": 0, "messages": [user(cached(text(60, "small")))]}
        assert counters((await api.messages(warm)).usage) == (0, 60, 0)


async def test_a_final_assistant_text_ending_in_whitespace_is_refused(api: Api) -> None:
    body = {"model": "claude-sonnet-4-5", "messages": [user(plain("Say hi")), assistant(plain("Hi, I am "))]}
    message = assert_error(await api.messages(body), 400, "invalid_request_error")
    assert message == "final assistant content cannot end with trailing whitespace"
    plain_string = {"model": "claude-sonnet-4-5",
                    "messages": [user(plain("q")), {"role": "assistant", "content": "a\n"}]}
    assert (await api.messages(plain_string)).status == 400
    body["messages"][1] = assistant(plain("Hi, I am"))
    assert (await api.messages(body)).status == 200


# --- conversation rules ----------------------------------------------------------------------------

async def test_a_tool_result_without_its_tool_use_is_refused(api: Api) -> None:
    messages = [user(plain("go")), assistant(tool_use("toolu_1")), user(tool_result("toolu_1"), tool_result("toolu_9"))]
    message = assert_error(await api.messages({"messages": messages}), 400, "invalid_request_error")
    assert message == ("messages.2.content.1: unexpected `tool_use_id` found in `tool_result` blocks: toolu_9. "
                       "Each `tool_result` block must have a corresponding `tool_use` block in the previous message.")


async def test_a_tool_use_without_its_tool_result_is_refused(api: Api) -> None:
    messages = [user(plain("go")), assistant(tool_use("toolu_1"), tool_use("toolu_2")), user(tool_result("toolu_1"))]
    message = assert_error(await api.messages({"messages": messages}), 400, "invalid_request_error")
    assert message == ("messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: "
                       "toolu_2. Each `tool_use` block must have a corresponding `tool_result` block in the next "
                       "message.")


async def test_paired_tool_calls_are_accepted(api: Api) -> None:
    messages = [user(plain("go")), assistant(plain("Reading."), tool_use("a"), tool_use("b")),
                user(tool_result("a"), tool_result("b"), plain("and?"))]
    assert (await api.messages({"messages": messages})).status == 200


async def test_an_empty_text_block_is_refused(api: Api) -> None:
    reply = await api.messages({"messages": [user(plain("q"), plain(""))]})
    assert assert_error(reply, 400, "invalid_request_error") == "messages: text content blocks must be non-empty"
    reply = await api.messages({"messages": [{"role": "user", "content": ""}]})
    assert assert_error(reply, 400, "invalid_request_error") == "messages: text content blocks must be non-empty"


async def test_a_whitespace_only_text_block_is_refused(api: Api) -> None:
    reply = await api.messages({"messages": [user(plain("q"), plain(" \n"))]})
    assert assert_error(reply, 400, "invalid_request_error") == (
        "messages: text content blocks must contain non-whitespace text")


async def test_max_tokens_above_the_models_maximum_is_refused(api: Api) -> None:
    reply = await api.messages({"model": "claude-sonnet-4-5", "max_tokens": 64_001, "messages": [user(plain("q"))]})
    assert assert_error(reply, 400, "invalid_request_error") == (
        "max_tokens: 64001 > 64000, which is the maximum allowed number of output tokens for "
        "claude-sonnet-4-5-20250929")
    ok = await api.messages({"model": "claude-sonnet-4-5", "max_tokens": 64_000, "messages": [user(plain("q"))]})
    assert ok.status == 200
    info = await api.get("/v1/models/claude-opus-4-6")
    assert info.body["max_tokens"] == 128_000


# --- top-level fields ------------------------------------------------------------------------------

def _sdk_fields() -> set[str]:
    fields: set[str] = set()
    for module in (message_create_params, beta_create_params):
        for cls in (module.MessageCreateParamsNonStreaming, module.MessageCreateParamsStreaming):
            fields |= set(typing.get_type_hints(cls))
    return fields - {"betas", "user_profile_id", "workspace_id"}  # the SDK sends these three as headers


def test_every_field_of_the_sdks_message_create_params_is_accepted() -> None:
    missing = _sdk_fields() - MESSAGES_FIELDS
    assert not missing, f"fields the SDK sends that the simulator refuses: {sorted(missing)}"


async def test_the_documented_optional_fields_are_accepted_together(api: Api) -> None:
    body = {
        "messages": [user(plain("q"))], "metadata": {"user_id": "u"}, "service_tier": "auto",
        "stop_sequences": ["\n\nHuman:"], "temperature": 0.5, "top_k": 5, "top_p": 0.9,
        "tool_choice": {"type": "auto"}, "tools": [{"name": "t", "input_schema": {"type": "object"}}],
        "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}, "speed": "standard",
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "container": None, "inference_geo": "us", "mcp_servers": [], "diagnostics": None,
        "system": "You are terse.", "stream": False,
    }
    assert (await api.messages(body)).status == 200


# --- lookback ----------------------------------------------------------------------------------------

def _tool_turns(n: int) -> list[dict[str, Any]]:
    """An assistant turn with ``n`` tool calls and the user turn with their results, the results
    followed by one small text block carrying the breakpoint."""
    ids = [f"toolu_{i:02d}" for i in range(n)]
    results = [tool_result(t, "r") for t in ids] + [cached(text(5, "next"))]
    return [assistant(*[tool_use(t) for t in ids]), user(*results)]


async def test_a_run_of_tool_use_blocks_counts_as_one_lookback_position(api: Api) -> None:
    # 25 tool_use and 25 tool_result blocks after the written entry: two lookback positions, not 50.
    first = [user(cached(BIG))]
    assert counters((await api.messages({"messages": first})).usage)[1] == 5000
    later = await api.messages({"messages": [user(plain(BIG)), *_tool_turns(25)]})
    assert later.usage["cache_read_input_tokens"] == 5000


async def test_twenty_positions_of_other_blocks_still_miss(api: Api) -> None:
    await api.messages({"messages": [user(cached(BIG))]})
    texts = [plain(text(5, f"t{i}")) for i in range(20)]
    texts[-1] = cached(texts[-1]["text"])
    later = await api.messages({"messages": [user(plain(BIG)), assistant(plain("ok")), user(*texts)]})
    assert later.usage["cache_read_input_tokens"] == 0


# --- minimum cacheable length -------------------------------------------------------------------------

@pytest.mark.parametrize("spec", DEFAULT_MODELS, ids=lambda s: s.id)
async def test_each_models_minimum_cacheable_length(api: Api, spec: Any) -> None:
    minimum = spec.min_cache_tokens
    below = {"model": spec.id, "max_tokens": 0, "messages": [user(cached(text(minimum - 1, "below")))]}
    assert counters((await api.messages(below)).usage) == (0, 0, minimum - 1)
    at = {"model": spec.id, "max_tokens": 0, "messages": [user(cached(text(minimum, "at")))]}
    assert counters((await api.messages(at)).usage) == (0, minimum, 0)


def test_the_minimums_are_todays_documented_table() -> None:
    minimum = {m.id: m.min_cache_tokens for m in DEFAULT_MODELS}
    assert {k for k, v in minimum.items() if v == 4096} == {
        "claude-opus-4-6", "claude-opus-4-5-20251101", "claude-haiku-4-5-20251001"}
    assert {k for k, v in minimum.items() if v == 2048} == {"claude-opus-4-7", "claude-3-5-haiku-20241022"}
    assert minimum["claude-sonnet-4-6"] == minimum["claude-opus-4-8"] == 1024


# --- automatic caching ----------------------------------------------------------------------------------

async def test_automatic_caching_with_four_explicit_breakpoints_is_refused(api: Api) -> None:
    body = {"cache_control": {"type": "ephemeral"}, "system": [cached(f"block {i}") for i in range(4)],
            "messages": [user(plain("q"))]}
    assert assert_error(await api.messages(body), 400, "invalid_request_error") == (
        "A maximum of 4 blocks with cache_control may be provided. Found 5.")


async def test_automatic_caching_refuses_a_different_ttl_on_the_last_block(api: Api) -> None:
    body = {"cache_control": {"type": "ephemeral", "ttl": "1h"}, "messages": [user(cached(BIG))]}
    message = assert_error(await api.messages(body), 400, "invalid_request_error")
    assert message.startswith("cache_control.ttl:") and "messages.0.content.0.cache_control" in message


async def test_automatic_caching_with_the_same_ttl_on_the_last_block_is_a_no_op(api: Api) -> None:
    body = {"cache_control": {"type": "ephemeral"}, "messages": [user(cached(BIG))]}
    usage = (await api.messages(body)).usage
    assert counters(usage) == (0, 5000, 0)
    assert usage["cache_creation"] == {"ephemeral_5m_input_tokens": 5000, "ephemeral_1h_input_tokens": 0}


# --- workspaces -------------------------------------------------------------------------------------------

async def test_two_credentials_of_one_workspace_share_entries() -> None:
    profile = profile_from_mapping({"workspaces": {"wrkspc_team": [KEY, OTHER_KEY]}}, SimProfile(time_scale=0))
    async with run_sim(profile) as sim, aiohttp.ClientSession() as session:
        api = Api(sim, session)
        body = {"messages": [user(cached(BIG))]}
        assert counters((await api.messages(body, key=KEY)).usage) == (0, 5000, 0)
        assert counters((await api.messages(body, key=OTHER_KEY)).usage) == (5000, 0, 0)
        stats = await sim.stats()
        assert stats["by_workspace"]["wrkspc_team"]["cache_reads"] == 1
        assert len(stats["by_tenant"]) == 2
        wrong = await api.messages(body, key=KEY, anthropic_workspace_id="wrkspc_other")
        assert_error(wrong, 403, "permission_error")


async def test_the_workspace_header_selects_the_cache(api: Api) -> None:
    body = {"messages": [user(cached(BIG))]}
    await api.messages(body, key=KEY, anthropic_workspace_id="wrkspc_a")
    assert counters((await api.messages(body, key=KEY, anthropic_workspace_id="wrkspc_b")).usage)[0] == 0
    assert counters((await api.messages(body, key=OTHER_KEY, anthropic_workspace_id="wrkspc_a")).usage)[0] == 5000
    assert counters((await api.messages(body, key=KEY)).usage)[0] == 0  # the key's own workspace


async def test_count_tokens_takes_the_same_body(api: Api) -> None:
    body = {"model": MODEL, "messages": [user(plain("q"))], "system": "s", "thinking": {"type": "adaptive"}}
    assert (await api.post("/v1/messages/count_tokens", body)).body == {"input_tokens": 2}
