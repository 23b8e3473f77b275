"""The simulator's profile: latency model, reply size, limits, and the one table of models.

A profile is a frozen dataclass built once, from defaults, optionally overridden by a TOML file
(``specproxy sim --config FILE``, documented in ``config/sim.example.toml``) and by
``--time-scale``. The defaults reproduce the prompt-caching cookbook's measured pair: a
~150k-token prompt takes ~20.87 s to the first token uncached and ~1.94 s when it is read from
the cache.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final


class ProfileError(ValueError):
    """A profile value is invalid; the message names the key and what is accepted."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model the simulator serves: its id, aliases, listing fields and cache minimum."""

    id: str
    display_name: str
    created_at: str
    min_cache_tokens: int
    aliases: tuple[str, ...] = ()


# The ONE table of models and their minimum cacheable prompt length (tokens). The minimums follow
# the facts page: 1024 for Sonnet 4.5/4, Opus 4/4.1, Sonnet 3.7; 2048 for Sonnet 4.6 and Haiku 3.5;
# 4096 for Opus 4.5+ and Haiku 4.5. A profile file may change or extend it under [models."<id>"].
DEFAULT_MODELS: Final[tuple[ModelSpec, ...]] = (
    ModelSpec("claude-opus-4-6", "Claude Opus 4.6", "2026-02-05T00:00:00Z", 4096),
    ModelSpec("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-02-17T00:00:00Z", 2048),
    ModelSpec("claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-24T00:00:00Z", 4096, ("claude-opus-4-5",)),
    ModelSpec(
        "claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z", 4096, ("claude-haiku-4-5",)
    ),
    ModelSpec(
        "claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z", 1024, ("claude-sonnet-4-5",)
    ),
    ModelSpec("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z", 1024, ("claude-opus-4-1",)),
    ModelSpec("claude-opus-4-20250514", "Claude Opus 4", "2025-05-22T00:00:00Z", 1024, ("claude-opus-4-0",)),
    ModelSpec(
        "claude-sonnet-4-20250514", "Claude Sonnet 4", "2025-05-22T00:00:00Z", 1024, ("claude-sonnet-4-0",)
    ),
    ModelSpec(
        "claude-3-7-sonnet-20250219", "Claude Sonnet 3.7", "2025-02-24T00:00:00Z", 1024,
        ("claude-3-7-sonnet-latest",),
    ),
    ModelSpec(
        "claude-3-5-haiku-20241022", "Claude Haiku 3.5", "2024-10-22T00:00:00Z", 2048,
        ("claude-3-5-haiku-latest",),
    ),
)


@dataclass(frozen=True, slots=True)
class SimProfile:
    """Everything that shapes the simulator's answers. Build with :func:`load_profile` or directly.

    Delays are ``seconds x time_scale`` (0 sleeps never). TTLs are multiplied by ``time_scale``
    too, except when it is 0: then they keep their real length, so caching still works in tests
    that run without delays (move the injectable clock to expire entries).
    """

    time_scale: float = 1.0
    # --- latency: TTFT = base + uncached / prefill rate + cached / cached rate ---
    base_latency_s: float = 0.45
    prefill_tokens_per_s: float = 7350.0
    cached_tokens_per_s: float = 100_000.0
    output_tokens_per_s: float = 60.0
    # --- the reply ---
    reply_tokens: int = 420
    stream_chunk_tokens: int = 10
    # --- caching ---
    ttl_5m_s: float = 300.0
    ttl_1h_s: float = 3600.0
    lookback: int = 20
    max_breakpoints: int = 4
    volatile_system_prefixes: tuple[str, ...] = ("x-anthropic-billing-header:",)
    # --- limits ---
    max_body_bytes: int = 32 * 1024 * 1024
    max_cache_entries: int = 100_000
    max_logged_requests: int = 10_000
    models: tuple[ModelSpec, ...] = field(default=DEFAULT_MODELS)

    def __post_init__(self) -> None:
        for name in ("time_scale", "base_latency_s", "ttl_5m_s", "ttl_1h_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ProfileError(f"{name}: must be a finite number >= 0, got {value!r}")
        for name in ("prefill_tokens_per_s", "cached_tokens_per_s", "output_tokens_per_s"):
            if not getattr(self, name) > 0:
                raise ProfileError(f"{name}: must be > 0, got {getattr(self, name)!r}")
        for name in ("stream_chunk_tokens", "lookback", "max_breakpoints", "max_body_bytes",
                     "max_cache_entries", "max_logged_requests"):
            if getattr(self, name) < 1:
                raise ProfileError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        if self.reply_tokens < 0:
            raise ProfileError(f"reply_tokens: must be >= 0, got {self.reply_tokens!r}")
        if not self.models:
            raise ProfileError("models: at least one model is required")

    @property
    def ttl_scale(self) -> float:
        """The factor applied to TTLs: ``time_scale``, or 1 when ``time_scale`` is 0."""
        return self.time_scale if self.time_scale > 0 else 1.0

    def delay(self, seconds: float) -> float:
        """A simulated duration in real seconds."""
        return seconds * self.time_scale

    def ttft_seconds(self, uncached_tokens: int, cached_tokens: int) -> float:
        """Unscaled time to first token for a prompt of that many uncached and cached tokens."""
        return (
            self.base_latency_s
            + uncached_tokens / self.prefill_tokens_per_s
            + cached_tokens / self.cached_tokens_per_s
        )

    def model_index(self) -> dict[str, ModelSpec]:
        """Every accepted model name (ids and aliases) mapped to its spec."""
        index: dict[str, ModelSpec] = {}
        for spec in self.models:
            index[spec.id] = spec
            for alias in spec.aliases:
                index.setdefault(alias, spec)
        return index


_SCALARS: Final = {
    f.name: f.type for f in dataclasses.fields(SimProfile) if f.name not in ("models", "volatile_system_prefixes")
}


def _number(key: str, value: Any, kind: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProfileError(f"{key}: expected a number, got {value!r}")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ProfileError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    return float(value)


def _models(raw: Any, base: tuple[ModelSpec, ...]) -> tuple[ModelSpec, ...]:
    """Merge a ``[models."<id or alias>"]`` table into the model table."""
    if not isinstance(raw, Mapping):
        raise ProfileError("models: expected a table of tables keyed by model id")
    specs = list(base)
    for name, fields in raw.items():
        if not isinstance(fields, Mapping):
            raise ProfileError(f"models.{name}: expected a table")
        unknown = set(fields) - {"display_name", "created_at", "min_cache_tokens", "aliases"}
        if unknown:
            raise ProfileError(f"models.{name}: unknown key(s) {', '.join(sorted(unknown))}")
        pos = next((i for i, s in enumerate(specs) if name == s.id or name in s.aliases), None)
        spec = specs[pos] if pos is not None else ModelSpec(name, name, "2025-01-01T00:00:00Z", 1024)
        changes: dict[str, Any] = {}
        if "min_cache_tokens" in fields:
            changes["min_cache_tokens"] = int(_number(f"models.{name}.min_cache_tokens",
                                                      fields["min_cache_tokens"], "int"))
        for key in ("display_name", "created_at"):
            if key in fields:
                if not isinstance(fields[key], str):
                    raise ProfileError(f"models.{name}.{key}: expected a string")
                changes[key] = fields[key]
        if "aliases" in fields:
            aliases = fields["aliases"]
            if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                raise ProfileError(f"models.{name}.aliases: expected a list of strings")
            changes["aliases"] = tuple(aliases)
        spec = dataclasses.replace(spec, **changes)
        if pos is None:
            specs.append(spec)
        else:
            specs[pos] = spec
    return tuple(specs)


def profile_from_mapping(raw: Mapping[str, Any], base: SimProfile | None = None) -> SimProfile:
    """A profile from a parsed TOML document (unknown keys are an error naming the key)."""
    base = base or SimProfile()
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "models":
            changes["models"] = _models(value, base.models)
        elif key == "volatile_system_prefixes":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ProfileError("volatile_system_prefixes: expected a list of strings")
            changes[key] = tuple(value)
        elif key in _SCALARS:
            changes[key] = _number(key, value, "int" if _SCALARS[key] == "int" else "float")
        else:
            raise ProfileError(f"{key}: unknown profile key")
    return dataclasses.replace(base, **changes)


def load_profile(path: str | Path | None = None, *, time_scale: float | None = None) -> SimProfile:
    """The profile for ``specproxy sim``: defaults, then the TOML file at ``path``, then ``time_scale``."""
    profile = SimProfile()
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise ProfileError(f"cannot read profile {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ProfileError(f"profile {path} is not valid TOML: {exc}") from exc
        profile = profile_from_mapping(raw, profile)
    if time_scale is not None:
        profile = dataclasses.replace(profile, time_scale=float(time_scale))
    return profile
