"""Validation of Messages and count_tokens bodies, with the API's field-naming error messages.

The shape of a body: types of the fields, the messages list, ``max_tokens`` and what it cannot be
combined with, and, in the Anthropic dialect (``strict``), the top-level fields the API accepts.
A field outside :data:`MESSAGES_FIELDS` is refused the way the API refuses it
(``<field>: Extra inputs are not permitted``); every field the API reference documents and the SDKs
or Claude Code send is in the list. The conversation rules (prefill, tool pairing, empty blocks,
the model's output limit) are in ``specproxy.sim.conversation``. Errors are raised as
``InvalidRequest`` (400) and rendered by the app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from specproxy.errors import InvalidRequest

Role = Literal["user", "assistant"]
Block = dict[str, Any]

THINKING_TYPES: Final = frozenset({"enabled", "disabled", "adaptive"})

# Top-level fields of POST /v1/messages: the API reference's MessageCreateParams (GA and beta) in the
# official SDK, plus the sampling fields older SDKs and Claude Code send (temperature, top_k, top_p)
# and the beta structured-output ``output_format``.
MESSAGES_FIELDS: Final = frozenset({
    "model", "max_tokens", "messages", "system", "tools", "tool_choice", "thinking", "stream",
    "stop_sequences", "temperature", "top_k", "top_p", "metadata", "service_tier", "cache_control",
    "container", "diagnostics", "inference_geo", "output_config", "output_format", "speed",
    "context_management", "mcp_servers", "billing_policy", "compaction", "fallback_credit_token",
    "fallbacks", "thread",
})
MESSAGE_FIELDS: Final = frozenset({"role", "content"})
MIN_THINKING_BUDGET: Final = 1024


@dataclass(frozen=True, slots=True)
class Message:
    """One message with its content normalised to a list of blocks."""

    role: Role
    blocks: tuple[Block, ...]
    plain: bool  # content was a plain string (its one block cannot carry cache_control)


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    """A validated Messages (or count_tokens) body, normalised for the cache engine."""

    raw: dict[str, Any]
    model: str
    max_tokens: int | None
    stream: bool
    tools: tuple[Block, ...]
    system: tuple[Block, ...]
    system_plain: bool
    messages: tuple[Message, ...]


def _fail(message: str) -> InvalidRequest:
    return InvalidRequest(message)


def _check_block(block: Any, path: str) -> Block:
    if not isinstance(block, dict):
        raise _fail(f"{path}: Input should be a valid dictionary")
    kind = block.get("type")
    if kind is None:
        raise _fail(f"{path}.type: Field required")
    if not isinstance(kind, str):
        raise _fail(f"{path}.type: Input should be a valid string")
    if kind == "text" and not isinstance(block.get("text"), str):
        raise _fail(f"{path}.text: Input should be a valid string")
    if kind == "thinking" and not isinstance(block.get("thinking"), str):
        raise _fail(f"{path}.thinking: Input should be a valid string")
    return block


def _content(value: Any, path: str) -> tuple[tuple[Block, ...], bool]:
    if isinstance(value, str):
        return ({"type": "text", "text": value},), True
    if not isinstance(value, list):
        raise _fail(f"{path}: Input should be a valid string or a list of content blocks")
    return tuple(_check_block(b, f"{path}.{i}") for i, b in enumerate(value)), False


def _system(value: Any) -> tuple[tuple[Block, ...], bool]:
    if value is None:
        return (), False
    if isinstance(value, str):
        return ({"type": "text", "text": value},), True
    if not isinstance(value, list):
        raise _fail("system: Input should be a valid string or a list of text blocks")
    blocks: list[Block] = []
    for i, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _fail(f"system.{i}: Input should be a text block")
        if not isinstance(block.get("text"), str):
            raise _fail(f"system.{i}.text: Input should be a valid string")
        blocks.append(block)
    return tuple(blocks), False


def extra_input(path: str) -> InvalidRequest:
    """The API's refusal of a field it does not know."""
    return _fail(f"{path}: Extra inputs are not permitted")


def _messages(value: Any, strict: bool = False) -> tuple[Message, ...]:
    if value is None:
        raise _fail("messages: Field required")
    if not isinstance(value, list):
        raise _fail("messages: Input should be a valid list")
    if not value:
        raise _fail("messages: at least one message is required")
    out: list[Message] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise _fail(f"messages.{i}: Input should be a valid dictionary")
        if strict:
            for key in msg:
                if key not in MESSAGE_FIELDS:
                    raise extra_input(f"messages.{i}.{key}")
        role = msg.get("role")
        if role not in ("user", "assistant"):
            raise _fail(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if "content" not in msg:
            raise _fail(f"messages.{i}.content: Field required")
        blocks, plain = _content(msg["content"], f"messages.{i}.content")
        out.append(Message(role=role, blocks=blocks, plain=plain))
    return tuple(out)


def _tools(value: Any) -> tuple[Block, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail("tools: Input should be a valid list")
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise _fail(f"tools.{i}: Input should be a valid dictionary")
    return tuple(value)


def _thinking(value: Any, max_tokens: int | None) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or value.get("type") not in THINKING_TYPES:
        raise _fail("thinking: Input should be an object with type 'enabled', 'disabled' or 'adaptive'")
    if value["type"] != "enabled":
        return
    budget = value.get("budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise _fail("thinking.enabled.budget_tokens: Input should be a valid integer")
    if budget < MIN_THINKING_BUDGET:
        raise _fail(
            f"thinking.enabled.budget_tokens: Input should be greater than or equal to {MIN_THINKING_BUDGET}"
        )
    if max_tokens is not None and 0 < max_tokens <= budget:
        raise _fail("`max_tokens` must be greater than `thinking.budget_tokens`.")


def _prewarm_conflicts(raw: dict[str, Any], stream: bool) -> None:
    """``max_tokens: 0`` (pre-warming) is refused together with these parameters."""
    thinking = raw.get("thinking")
    tool_choice = raw.get("tool_choice")
    output_config = raw.get("output_config")
    if stream:
        conflict = "`stream: true`"
    elif isinstance(thinking, dict) and thinking.get("type") == "enabled":
        conflict = "`thinking.type: enabled`"
    elif isinstance(tool_choice, dict) and tool_choice.get("type") in ("any", "tool"):
        conflict = f"`tool_choice.type: {tool_choice['type']}`"
    elif isinstance(output_config, dict) and output_config.get("format") is not None:
        conflict = "`output_config.format`"
    else:
        return
    raise _fail(f"max_tokens: 0 cannot be combined with {conflict}")


def loads_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or the API's 400."""
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _fail(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise _fail("The request body must be a JSON object")
    return raw


def parse_body(body: bytes, *, count_only: bool = False, strict: bool = True) -> MessagesRequest:
    """Validate a Messages body (``count_only``: a count_tokens body, without ``max_tokens``).

    ``strict`` (the Anthropic dialect) refuses fields the API does not document; the engine
    dialects pass ``False`` (their servers ignore unknown fields)."""
    raw = loads_object(body)
    if strict:
        for key in raw:
            if key not in MESSAGES_FIELDS:
                raise extra_input(key)
    model = raw.get("model")
    if model is None:
        raise _fail("model: Field required")
    if not isinstance(model, str) or not model:
        raise _fail("model: Input should be a valid string")
    max_tokens: int | None = None
    if not count_only:
        value = raw.get("max_tokens")
        if value is None:
            raise _fail("max_tokens: Field required")
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail("max_tokens: Input should be a valid integer")
        if value < 0:
            raise _fail("max_tokens: Input should be greater than or equal to 0")
        max_tokens = value
    stream = raw.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _fail("stream: Input should be a valid boolean")
    messages = _messages(raw.get("messages"), strict)
    system, system_plain = _system(raw.get("system"))
    tools = _tools(raw.get("tools"))
    _thinking(raw.get("thinking"), max_tokens)
    if max_tokens == 0 and strict:
        _prewarm_conflicts(raw, stream)
    return MessagesRequest(
        raw=raw,
        model=model,
        max_tokens=max_tokens,
        stream=stream and not count_only,
        tools=tools,
        system=system,
        system_plain=system_plain,
        messages=messages,
    )
