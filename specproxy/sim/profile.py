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

from specproxy.sim.capabilities import DEFAULT_MODELS, CapabilityError, ModelSpec, load_models_file, merge_models

__all__ = ["DEFAULT_MODELS", "DIALECTS", "ModelSpec", "ProfileError", "SimProfile", "load_profile",
           "profile_from_mapping"]

class ProfileError(CapabilityError):
    """A profile value is invalid; the message names the key and what is accepted."""


DIALECTS: Final = ("anthropic", "vllm", "sglang", "llamacpp")


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
    # --- workspaces: credential digest -> workspace id (a credential not listed is its own workspace) ---
    workspaces: tuple[tuple[str, str], ...] = ()
    # --- the dialect: the Anthropic API, or an inference engine's /v1/messages (docs/simulator.md) ---
    dialect: str = "anthropic"
    cache_report: bool = False  # the engine's usage reporting flag (vLLM, SGLang)
    engine_block_tokens: int = 0  # prefix-cache granularity in tokens; 0: the engine's default
    engine_slots: int = 1  # llama.cpp slots (--parallel)
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
        if self.engine_block_tokens < 0:
            raise ProfileError(f"engine_block_tokens: must be >= 0, got {self.engine_block_tokens!r}")
        if self.engine_slots < 1:
            raise ProfileError(f"engine_slots: must be >= 1, got {self.engine_slots!r}")
        if self.dialect not in DIALECTS:
            raise ProfileError(f"dialect: must be one of {', '.join(DIALECTS)}, got {self.dialect!r}")
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

    @property
    def block_tokens(self) -> int:
        """The engine's prefix-cache granularity: ``engine_block_tokens``, else the engine's default
        (vLLM 16, SGLang 1, llama.cpp 1)."""
        if self.engine_block_tokens:
            return self.engine_block_tokens
        return 16 if self.dialect == "vllm" else 1

    def workspace_of(self, tenant: str) -> str | None:
        """The workspace a credential digest belongs to, if the profile assigns one."""
        for digest, workspace in self.workspaces:
            if digest == tenant:
                return workspace
        return None

    def model_index(self) -> dict[str, ModelSpec]:
        """Every accepted model name (ids and aliases) mapped to its spec."""
        index: dict[str, ModelSpec] = {}
        for spec in self.models:
            index[spec.id] = spec
            for alias in spec.aliases:
                index.setdefault(alias, spec)
        return index


_SPECIAL: Final = ("models", "volatile_system_prefixes", "workspaces", "dialect")
_SCALARS: Final = {f.name: f.type for f in dataclasses.fields(SimProfile) if f.name not in _SPECIAL}


def _number(key: str, value: Any, kind: str) -> float | int | bool:
    if kind == "bool":
        if not isinstance(value, bool):
            raise ProfileError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProfileError(f"{key}: expected a number, got {value!r}")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ProfileError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    return float(value)


def _models(raw: Any, base: tuple[ModelSpec, ...]) -> tuple[ModelSpec, ...]:
    """Merge a ``[models."<id or alias>"]`` table into the model table."""
    try:
        return merge_models(raw, base)
    except CapabilityError as exc:
        raise ProfileError(str(exc)) from exc


def _workspaces(raw: Any) -> tuple[tuple[str, str], ...]:
    """``[workspaces]`` maps a workspace id to the credentials that belong to it; only their digests
    are kept (the simulator never stores a credential)."""
    from specproxy.sim.state import tenant_digest

    if not isinstance(raw, Mapping):
        raise ProfileError("workspaces: expected a table of workspace id = [credentials]")
    out: list[tuple[str, str]] = []
    for workspace, keys in raw.items():
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise ProfileError(f"workspaces.{workspace}: expected a list of credentials")
        out.extend((tenant_digest(k), str(workspace)) for k in keys)
    return tuple(out)


def profile_from_mapping(raw: Mapping[str, Any], base: SimProfile | None = None) -> SimProfile:
    """A profile from a parsed TOML document (unknown keys are an error naming the key)."""
    base = base or SimProfile()
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "models":
            changes["models"] = _models(value, base.models)
        elif key == "workspaces":
            changes["workspaces"] = _workspaces(value)
        elif key == "dialect":
            if value not in DIALECTS:
                raise ProfileError(f"dialect: must be one of {', '.join(DIALECTS)}, got {value!r}")
            changes[key] = value
        elif key == "volatile_system_prefixes":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ProfileError("volatile_system_prefixes: expected a list of strings")
            changes[key] = tuple(value)
        elif key in _SCALARS:
            changes[key] = _number(key, value, str(_SCALARS[key]))
        else:
            raise ProfileError(f"{key}: unknown profile key")
    return dataclasses.replace(base, **changes)


def load_profile(
    path: str | Path | None = None,
    *,
    time_scale: float | None = None,
    dialect: str | None = None,
    cache_report: bool | None = None,
    models: str | Path | None = None,
) -> SimProfile:
    """The profile for ``specproxy sim``: defaults, then the TOML file at ``path``, then the flags
    (``--time-scale``, ``--dialect``, ``--cache-report``, ``--models FILE``)."""
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
    changes: dict[str, Any] = {}
    if models is not None:
        try:
            changes["models"] = load_models_file(models, profile.models)
        except CapabilityError as exc:
            raise ProfileError(str(exc)) from exc
    if time_scale is not None:
        changes["time_scale"] = float(time_scale)
    if dialect is not None:
        changes["dialect"] = dialect
    if cache_report is not None:
        changes["cache_report"] = cache_report
    return dataclasses.replace(profile, **changes)
