"""The profile: defaults that reproduce the cookbook's figures, the TOML file, and its errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from specproxy.sim import DEFAULT_MODELS, ProfileError, SimProfile, load_profile

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "sim.example.toml"


def within(value: float, target: float, tolerance: float = 0.10) -> bool:
    return abs(value - target) <= tolerance * target


def test_default_latency_reproduces_the_cookbook_pair_within_ten_percent() -> None:
    profile = SimProfile()
    assert within(profile.ttft_seconds(uncached_tokens=150_000, cached_tokens=0), 20.87)
    assert within(profile.ttft_seconds(uncached_tokens=20, cached_tokens=150_000), 1.94)


def test_default_totals_stay_near_the_cookbook_pair() -> None:
    profile = SimProfile()
    decode = profile.reply_tokens / profile.output_tokens_per_s
    assert within(profile.ttft_seconds(150_000, 0) + decode, 28.32)
    assert within(profile.ttft_seconds(20, 150_000) + decode, 8.40)


def test_the_example_file_loads_to_the_defaults() -> None:
    assert load_profile(EXAMPLE) == SimProfile()


def test_a_file_overrides_fields_and_models(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(
        'time_scale = 0.5\nreply_tokens = 7\n'
        '[models."claude-sonnet-4-5"]\nmin_cache_tokens = 100\n'
        '[models."claude-new"]\nmin_cache_tokens = 10\naliases = ["new"]\n'
    )
    profile = load_profile(path)
    assert (profile.time_scale, profile.reply_tokens) == (0.5, 7)
    index = profile.model_index()
    assert index["claude-sonnet-4-5-20250929"].min_cache_tokens == 100
    assert index["new"].id == "claude-new" and index["new"].min_cache_tokens == 10
    assert len(profile.models) == len(DEFAULT_MODELS) + 1


def test_the_time_scale_flag_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text("time_scale = 0.5\n")
    assert load_profile(path, time_scale=0.0).time_scale == 0.0
    assert load_profile(None, time_scale=None).time_scale == 1.0


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ("prefil_tokens_per_s = 1\n", "prefil_tokens_per_s"),
        ('reply_tokens = "many"\n', "reply_tokens"),
        ("output_tokens_per_s = 0\n", "output_tokens_per_s"),
        ('[models."x"]\nspeed = 1\n', "models.x"),
    ],
)
def test_a_bad_profile_value_names_its_key(tmp_path: Path, content: str, key: str) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(content)
    with pytest.raises(ProfileError, match=key):
        load_profile(path)


def test_ttls_scale_with_time_except_at_zero() -> None:
    assert SimProfile(time_scale=0.1).ttl_scale == 0.1
    assert SimProfile(time_scale=0.0).ttl_scale == 1.0
    assert dataclasses.replace(SimProfile(), time_scale=2.0).delay(1.5) == 3.0


def test_a_file_sets_the_dialect_engine_options_and_workspaces(tmp_path: Path) -> None:
    from specproxy.sim import tenant_digest

    path = tmp_path / "sim.toml"
    path.write_text('dialect = "vllm"\ncache_report = true\nengine_block_tokens = 32\nengine_slots = 3\n'
                    '[workspaces]\nwrkspc_team = ["sk-one", "sk-two"]\n')
    profile = load_profile(path)
    assert (profile.dialect, profile.cache_report, profile.block_tokens, profile.engine_slots) == ("vllm", True, 32, 3)
    assert profile.workspace_of(tenant_digest("sk-two")) == "wrkspc_team"
    assert "sk-one" not in repr(profile)  # only digests are kept
    assert load_profile(path, dialect="sglang").dialect == "sglang"
    assert SimProfile(dialect="vllm").block_tokens == 16 and SimProfile(dialect="sglang").block_tokens == 1


@pytest.mark.parametrize(("content", "key"), [('dialect = "tgi"\n', "dialect"), ("cache_report = 1\n", "cache_report"),
                                              ("engine_slots = 0\n", "engine_slots")])
def test_a_bad_engine_option_names_its_key(tmp_path: Path, content: str, key: str) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(content)
    with pytest.raises(ProfileError, match=key):
        load_profile(path)
