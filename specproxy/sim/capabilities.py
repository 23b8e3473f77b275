"""The ONE per-model capability table: ids, aliases, minimum cacheable length, prefill, output limit.

Every model fact the simulator enforces lives here, each from the public documentation (sources in
``docs/simulator.md``):

- ``min_cache_tokens``: the prompt-caching page's minimum cacheable prompt length. It is not monotonic
  across generations: 1024 for Opus 4.8, Sonnet 4.6/4.5, Opus 4.1/4, Sonnet 4 and Sonnet 3.7; 2048 for
  Opus 4.7 and Haiku 3.5; 4096 for Opus 4.6, Opus 4.5 and Haiku 4.5.
- ``prefill``: whether a conversation may end on an assistant turn. Claude 4.6 models and later
  refuse it ("Prefill removal" in What's new in Claude 4.6; the errors page's "Prefill not
  supported").
- ``max_output_tokens``: the models overview's "Max output", the largest ``max_tokens`` accepted.

A profile extends or changes the table with ``[models."<id or alias>"]`` tables (TOML), or
``specproxy sim --models FILE`` (TOML or JSON, the same table): see :func:`merge_models`.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final


class CapabilityError(ValueError):
    """A model table entry is invalid; the message names the key (a ``ProfileError`` subclass uses it)."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model the simulator serves, with what the API enforces for it."""

    id: str
    display_name: str
    created_at: str
    min_cache_tokens: int
    aliases: tuple[str, ...] = ()
    prefill: bool = True
    max_output_tokens: int = 64_000
    max_input_tokens: int = 200_000


_K = 1024
_M = 1_000_000

# id, display name, release date, minimum cacheable tokens, aliases, prefill, max output, context window
DEFAULT_MODELS: Final[tuple[ModelSpec, ...]] = (
    ModelSpec("claude-opus-4-8", "Claude Opus 4.8", "2026-05-28T00:00:00Z", 1024, (), False, 128_000, _M),
    ModelSpec("claude-opus-4-7", "Claude Opus 4.7", "2026-04-16T00:00:00Z", 2048, (), False, 128_000, _M),
    ModelSpec("claude-opus-4-6", "Claude Opus 4.6", "2026-02-05T00:00:00Z", 4096, (), False, 128_000, _M),
    ModelSpec("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-02-17T00:00:00Z", 1024, (), False, 128_000, _M),
    ModelSpec("claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-24T00:00:00Z", 4096, ("claude-opus-4-5",),
              True, 64_000),
    ModelSpec("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z", 4096, ("claude-haiku-4-5",),
              True, 64_000),
    ModelSpec("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z", 1024,
              ("claude-sonnet-4-5",), True, 64_000),
    ModelSpec("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z", 1024, ("claude-opus-4-1",),
              True, 32_000),
    ModelSpec("claude-opus-4-20250514", "Claude Opus 4", "2025-05-22T00:00:00Z", 1024, ("claude-opus-4-0",),
              True, 32_000),
    ModelSpec("claude-sonnet-4-20250514", "Claude Sonnet 4", "2025-05-22T00:00:00Z", 1024, ("claude-sonnet-4-0",),
              True, 64_000),
    ModelSpec("claude-3-7-sonnet-20250219", "Claude Sonnet 3.7", "2025-02-24T00:00:00Z", 1024,
              ("claude-3-7-sonnet-latest",), True, 64_000),
    ModelSpec("claude-3-5-haiku-20241022", "Claude Haiku 3.5", "2024-10-22T00:00:00Z", 2048,
              ("claude-3-5-haiku-latest",), True, 8 * _K),
)

_KEYS: Final = frozenset({"display_name", "created_at", "min_cache_tokens", "aliases", "prefill",
                          "max_output_tokens", "max_input_tokens"})
_INT_KEYS: Final = ("min_cache_tokens", "max_output_tokens", "max_input_tokens")


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise CapabilityError(f"{key}: expected an integer, got {value!r}")
    if int(value) < 1:
        raise CapabilityError(f"{key}: must be >= 1, got {value!r}")
    return int(value)


def _changes(name: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(fields) - _KEYS
    if unknown:
        raise CapabilityError(f"models.{name}: unknown key(s) {', '.join(sorted(unknown))}")
    changes: dict[str, Any] = {}
    for key in _INT_KEYS:
        if key in fields:
            changes[key] = _int(f"models.{name}.{key}", fields[key])
    for key in ("display_name", "created_at"):
        if key in fields:
            if not isinstance(fields[key], str):
                raise CapabilityError(f"models.{name}.{key}: expected a string")
            changes[key] = fields[key]
    if "prefill" in fields:
        if not isinstance(fields["prefill"], bool):
            raise CapabilityError(f"models.{name}.prefill: expected true or false")
        changes["prefill"] = fields["prefill"]
    if "aliases" in fields:
        aliases = fields["aliases"]
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise CapabilityError(f"models.{name}.aliases: expected a list of strings")
        changes["aliases"] = tuple(aliases)
    return changes


def merge_models(raw: Any, base: tuple[ModelSpec, ...] = DEFAULT_MODELS) -> tuple[ModelSpec, ...]:
    """Merge a ``{"<id or alias>": {key: value}}`` table into ``base``: a known name changes that
    model, a new name adds one (prefill allowed, 64k output, 1024-token minimum unless given)."""
    if not isinstance(raw, Mapping):
        raise CapabilityError("models: expected a table of tables keyed by model id")
    specs = list(base)
    for name, fields in raw.items():
        if not isinstance(fields, Mapping):
            raise CapabilityError(f"models.{name}: expected a table")
        pos = next((i for i, s in enumerate(specs) if name == s.id or name in s.aliases), None)
        spec = specs[pos] if pos is not None else ModelSpec(name, name, "2025-01-01T00:00:00Z", 1024)
        spec = dataclasses.replace(spec, **_changes(str(name), fields))
        if pos is None:
            specs.append(spec)
        else:
            specs[pos] = spec
    return tuple(specs)


def load_models_file(path: str | Path, base: tuple[ModelSpec, ...] = DEFAULT_MODELS) -> tuple[ModelSpec, ...]:
    """The table extended by a TOML or JSON file (``.json`` is JSON; anything else TOML). The file
    holds the model tables at its top level, or under a ``models`` key."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CapabilityError(f"cannot read models file {path}: {exc.strerror}") from exc
    try:
        raw: Any = json.loads(data) if str(path).endswith(".json") else tomllib.loads(data.decode())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise CapabilityError(f"models file {path} is not valid: {exc}") from exc
    if isinstance(raw, Mapping) and set(raw) == {"models"}:
        raw = raw["models"]
    return merge_models(raw, base)
