"""A deterministic token count approximation for prompt blocks and replies.

Real tokenizers are not public; the simulator only needs counts that are stable, monotonic in
size and of the right order of magnitude. The rules (also in ``docs/simulator.md``):

- text (a text block, a system block, a thinking block, a plain-string content): ``ceil(chars / 4)``;
  an empty text block counts 0;
- a tool definition, a ``tool_use`` block, and any block type not listed here:
  ``ceil(len(canonical JSON) / 4)`` where canonical JSON has sorted keys, no spaces and no
  ``cache_control``;
- a ``tool_result`` block: its string content as text, or the sum of its content blocks;
- an image: ``IMAGE_TOKENS``; a document: ``DOCUMENT_TOKENS`` unless its source is plain text,
  which counts as text.

There is no per-message or per-request overhead, so for every request
``input_tokens + cache_creation_input_tokens + cache_read_input_tokens`` equals what
``count_tokens`` returns for it. About 600 KB of ASCII text is about 150k tokens.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

CHARS_PER_TOKEN: Final = 4
IMAGE_TOKENS: Final = 1600
DOCUMENT_TOKENS: Final = 2500


def text_tokens(text: str) -> int:
    """Tokens of a piece of text: ``ceil(len(text) / 4)``."""
    return -(-len(text) // CHARS_PER_TOKEN)


def strip_cache_control(block: Any) -> Any:
    """The block without its ``cache_control`` marker (nested content blocks included)."""
    if not isinstance(block, dict):
        return block
    out = {k: v for k, v in block.items() if k != "cache_control"}
    content = out.get("content")
    if isinstance(content, list):
        out["content"] = [strip_cache_control(b) for b in content]
    return out


def canonical(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, compact, ``cache_control`` removed from blocks."""
    return orjson.dumps(strip_cache_control(value), option=orjson.OPT_SORT_KEYS)


def json_tokens(value: Any) -> int:
    """Tokens of a structured value: ``ceil(len(canonical JSON) / 4)``."""
    return -(-len(canonical(value)) // CHARS_PER_TOKEN)


def block_tokens(block: Any) -> int:
    """Tokens of one content block (or of a plain string, counted as text)."""
    if isinstance(block, str):
        return text_tokens(block)
    if not isinstance(block, dict):
        return json_tokens(block)
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        return text_tokens(block["text"])
    if kind == "thinking" and isinstance(block.get("thinking"), str):
        return text_tokens(block["thinking"])
    if kind == "image":
        return IMAGE_TOKENS
    if kind == "document":
        source = block.get("source")
        if isinstance(source, dict) and source.get("type") == "text" and isinstance(source.get("data"), str):
            return text_tokens(source["data"])
        return DOCUMENT_TOKENS
    if kind == "tool_result":
        content = block.get("content")
        if content is None:
            return 1
        if isinstance(content, str):
            return text_tokens(content)
        if isinstance(content, list):
            return sum(block_tokens(b) for b in content)
    return json_tokens(block)


def reply_text(tokens: int) -> str:
    """A deterministic reply of exactly ``tokens`` approximate tokens (``4 x tokens`` characters)."""
    if tokens <= 0:
        return ""
    size = tokens * CHARS_PER_TOKEN
    reps = size // len(_REPLY_SEED) + 1
    return (_REPLY_SEED * reps)[:size]


_REPLY_SEED: Final = (
    "The simulator answers every question with this same deterministic text, sized to the number "
    "of tokens the profile asks for, so that replies are reproducible across runs and machines. "
)
