"""The upstream profiles as data, the setting in every source, and the helpers the request path uses."""

from __future__ import annotations

import pytest

from specproxy import cli
from specproxy.config import ConfigError, load_settings
from specproxy.prefix import LOOKBACK, compute
from specproxy.upstream_profile import PROFILES, match_positions, refuses_max_tokens_0


def test_each_profile_says_how_it_warms_reads_usage_and_shares_its_cache() -> None:
    assert {name: (p.warm_max_tokens, p.warm_stream) for name, p in PROFILES.items()} == {
        "anthropic": (0, False), "llamacpp": (0, False), "vllm": (1, False), "sglang": (1, False)}
    assert [n for n, p in PROFILES.items() if p.creation_counter] == ["anthropic"]
    assert [n for n, p in PROFILES.items() if not p.automatic_prefix_caching] == ["anthropic"]
    assert all(p.shared_cache for n, p in PROFILES.items() if n != "anthropic")
    assert [n for n, p in PROFILES.items() if p.input_includes_cache_read] == ["sglang"]


def test_an_engine_warm_that_completed_wrote_the_cache_and_an_anthropic_one_needs_its_counters() -> None:
    assert PROFILES["llamacpp"].warm_wrote_cache({"input_tokens": 900, "cache_read_input_tokens": 0})
    assert PROFILES["vllm"].warm_wrote_cache(None)
    assert not PROFILES["anthropic"].warm_wrote_cache({"input_tokens": 900, "cache_read_input_tokens": 0})
    assert PROFILES["anthropic"].warm_wrote_cache({"input_tokens": 3, "cache_creation_input_tokens": 900})


def test_sglang_usage_is_read_with_the_cached_tokens_out_of_input() -> None:
    usage = {"input_tokens": 1000, "cache_read_input_tokens": 960, "output_tokens": 4}
    assert PROFILES["sglang"].usage(usage).as_dict() == {
        "input": 40, "cache_read": 960, "cache_write_5m": 0, "cache_write_1h": 0, "output": 4}
    assert PROFILES["vllm"].usage({"input_tokens": 40, "cache_read_input_tokens": 960}).input == 40


def test_match_positions_covers_every_block_position_within_the_lookback() -> None:
    blocks = [{"type": "text", "text": f"block {i}"} for i in range(57)]
    prefix = compute({"model": "m", "messages": [{"role": "user", "content": blocks}]}, "tenant")
    assert prefix.breakpoints == ()
    engine = match_positions(prefix)
    assert [bp.position for bp in engine.breakpoints] == [16, 36, 56]
    assert sorted(pos for pos, _ in engine.candidates()) == list(range(57))
    assert engine.chain == prefix.chain  # the identity is the same; only where it is looked up changes
    assert LOOKBACK == 20


@pytest.mark.parametrize(("status", "error", "refused"), [
    (400, {"type": "invalid_request_error", "message": "max_tokens: Input should be greater than 0"}, True),
    (400, {"message": "1 validation error:\n  Value error, max_tokens must be positive", "type": "Bad Request",
           "code": 400}, True),  # vLLM
    (400, {"object": "error", "message": "max_tokens must be positive", "type": "Bad Request"}, True),  # SGLang
    (422, {"detail": [{"loc": ["body", "max_tokens"], "msg": "must be positive"}]}, True),
    (400, {"type": "invalid_request_error", "message": "messages: Field required"}, False),
    (500, {"type": "api_error", "message": "max_tokens"}, False),
])
def test_a_refusal_of_max_tokens_0_is_recognised_in_each_shape(status: int, error: dict[str, object],
                                                                refused: bool) -> None:
    assert refuses_max_tokens_0(status, error) is refused


def test_the_setting_comes_from_env_and_flag_and_refuses_anything_else() -> None:
    assert load_settings(None, env={}, read_default_file=False).upstream_profile == "anthropic"
    env = {"SPECPROXY_UPSTREAM_PROFILE": "vllm"}
    assert load_settings(None, env=env, read_default_file=False).upstream_profile == "vllm"
    args = cli.build_parser().parse_args(["serve", "--upstream-profile", "llamacpp"])
    assert args.upstream_profile == "llamacpp"
    with pytest.raises(ConfigError, match="upstream_profile"):
        load_settings(None, env={"SPECPROXY_UPSTREAM_PROFILE": "ollama"}, read_default_file=False)
