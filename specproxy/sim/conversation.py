"""The conversation rules of POST /v1/messages that depend on the whole conversation or the model.

Checked in this order, after the body's shape and the breakpoints (``validate``, ``prompt``):

1. ``max_tokens`` above the model's maximum output;
2. empty (or whitespace-only) text blocks in ``messages``;
3. ``tool_result`` blocks whose ``tool_use_id`` is not a ``tool_use`` of the previous message, and
   ``tool_use`` blocks not answered by a ``tool_result`` in the next message;
4. a conversation ending on an assistant turn: refused by models without prefill (Claude 4.6 and
   later), and for the others refused when the final assistant text ends in whitespace.

The messages are the API's own (sources and tests in ``docs/simulator.md``'s conformance table).
Consecutive turns of one role are combined into one turn, as the API does, before the tool rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from specproxy.errors import InvalidRequest
from specproxy.sim.capabilities import ModelSpec
from specproxy.sim.validate import Block, Message, MessagesRequest

PREFILL_REFUSED: Final = (
    "This model does not support assistant message prefill. The conversation must end with a user message."
)
TRAILING_WHITESPACE: Final = "final assistant content cannot end with trailing whitespace"
EMPTY_TEXT: Final = "messages: text content blocks must be non-empty"
BLANK_TEXT: Final = "messages: text content blocks must contain non-whitespace text"


def max_tokens_refusal(max_tokens: int, spec: ModelSpec) -> str:
    return (f"max_tokens: {max_tokens} > {spec.max_output_tokens}, which is the maximum allowed number of "
            f"output tokens for {spec.id}")


def unexpected_tool_result(path: str, tool_use_id: str) -> str:
    return (f"{path}: unexpected `tool_use_id` found in `tool_result` blocks: {tool_use_id}. "
            "Each `tool_result` block must have a corresponding `tool_use` block in the previous message.")


def missing_tool_result(index: int, ids: list[str]) -> str:
    return (f"messages.{index}: `tool_use` ids were found without `tool_result` blocks immediately after: "
            f"{', '.join(ids)}. Each `tool_use` block must have a corresponding `tool_result` block in the "
            "next message.")


@dataclass(frozen=True, slots=True)
class _Turn:
    """Consecutive messages of one role, combined (the API combines them into one turn)."""

    role: str
    first: int  # index of its first message
    blocks: tuple[tuple[str, Block], ...]  # (path, block)


def _path(index: int, msg: Message, j: int) -> str:
    return f"messages.{index}.content" if msg.plain else f"messages.{index}.content.{j}"


def _turns(messages: tuple[Message, ...]) -> list[_Turn]:
    turns: list[_Turn] = []
    for i, msg in enumerate(messages):
        blocks = tuple((_path(i, msg, j), b) for j, b in enumerate(msg.blocks))
        if turns and turns[-1].role == msg.role:
            last = turns[-1]
            turns[-1] = _Turn(last.role, last.first, last.blocks + blocks)
        else:
            turns.append(_Turn(msg.role, i, blocks))
    return turns


def _check_text(messages: tuple[Message, ...]) -> None:
    for msg in messages:
        for block in msg.blocks:
            if block.get("type") != "text":
                continue
            text = block.get("text", "")
            if text == "":
                raise InvalidRequest(EMPTY_TEXT)
            if not text.strip():
                raise InvalidRequest(BLANK_TEXT)


def _check_tools(turns: list[_Turn]) -> None:
    for k, turn in enumerate(turns):
        if turn.role == "user":
            previous = turns[k - 1] if k > 0 else None
            offered = {b.get("id") for _, b in previous.blocks if b.get("type") == "tool_use"} if previous else set()
            for path, block in turn.blocks:
                if block.get("type") == "tool_result" and block.get("tool_use_id") not in offered:
                    raise InvalidRequest(unexpected_tool_result(path, str(block.get("tool_use_id"))))
        elif k + 1 < len(turns):
            ids = [str(b.get("id")) for _, b in turn.blocks if b.get("type") == "tool_use"]
            answered = {b.get("tool_use_id") for _, b in turns[k + 1].blocks if b.get("type") == "tool_result"}
            missing = [i for i in ids if i not in answered]
            if missing:
                raise InvalidRequest(missing_tool_result(turn.first, missing))


def _check_ending(turns: list[_Turn], spec: ModelSpec) -> None:
    last = turns[-1]
    if last.role != "assistant":
        return
    if not spec.prefill:
        raise InvalidRequest(PREFILL_REFUSED)
    _, final = last.blocks[-1]
    text = final.get("text")
    if final.get("type") == "text" and isinstance(text, str) and text != text.rstrip():
        raise InvalidRequest(TRAILING_WHITESPACE)


def check_conversation(req: MessagesRequest, spec: ModelSpec) -> None:
    """Raise the API's 400 for the first conversation rule ``req`` breaks on model ``spec``."""
    if req.max_tokens is not None and req.max_tokens > spec.max_output_tokens:
        raise InvalidRequest(max_tokens_refusal(req.max_tokens, spec))
    _check_text(req.messages)
    turns = _turns(req.messages)
    _check_tools(turns)
    _check_ending(turns, spec)
