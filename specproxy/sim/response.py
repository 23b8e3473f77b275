"""The bodies the simulator answers with: Message objects and the SSE event stream.

The stream follows the Messages API's event sequence exactly: ``message_start`` (the Message with
empty content and the full input usage, ``output_tokens`` 1), ``content_block_start``, ``ping``,
``content_block_delta`` (``text_delta``, in chunks), ``content_block_stop``, ``message_delta``
(stop reason and cumulative usage, input and cache counters included), ``message_stop``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

from specproxy.errors import new_request_id
from specproxy.sim.cache import Usage
from specproxy.sim.tokens import CHARS_PER_TOKEN, reply_text

SSE_CONTENT_TYPE: Final = "text/event-stream; charset=utf-8"

# Plausible static rate limits, advertised on every /v1 response like the API does.
_LIMITS: Final = {"requests": 4000, "tokens": 2_400_000, "input-tokens": 2_000_000, "output-tokens": 400_000}


@dataclass(frozen=True, slots=True)
class Reply:
    """What the simulated model says: its text, token count and stop reason."""

    text: str
    output_tokens: int
    stop_reason: str

    @classmethod
    def build(cls, wanted_tokens: int, max_tokens: int) -> Reply:
        """A reply of ``wanted_tokens`` tokens, cut at ``max_tokens`` (0: a pre-warm, no content)."""
        if max_tokens == 0:
            return cls("", 0, "max_tokens")
        if max_tokens < wanted_tokens:
            return cls(reply_text(max_tokens), max_tokens, "max_tokens")
        return cls(reply_text(wanted_tokens), wanted_tokens, "end_turn")

    def chunks(self, chunk_tokens: int) -> Iterator[str]:
        """The text in pieces of ``chunk_tokens`` tokens, as streamed deltas."""
        size = chunk_tokens * CHARS_PER_TOKEN
        for start in range(0, len(self.text), size):
            yield self.text[start:start + size]


def new_message_id() -> str:
    """A message id in the API's style (``msg_`` and 24 base62 characters)."""
    return new_request_id("msg_")


def message(msg_id: str, model: str, usage: Usage, reply: Reply | None) -> dict[str, Any]:
    """A complete Message; ``reply=None`` gives the empty ``message_start`` form."""
    content: list[dict[str, Any]] = []
    if reply is not None and reply.text:
        content.append({"type": "text", "text": reply.text})
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reply.stop_reason if reply is not None else None,
        "stop_sequence": None,
        "usage": usage.as_dict(reply.output_tokens if reply is not None else 1),
    }


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event with its ``event:`` line."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def message_start(msg_id: str, model: str, usage: Usage, output_tokens: int) -> bytes:
    body = message(msg_id, model, usage, None)
    body["usage"]["output_tokens"] = output_tokens
    return sse("message_start", {"type": "message_start", "message": body})


def block_start() -> bytes:
    return sse("content_block_start",
               {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})


def ping() -> bytes:
    return sse("ping", {"type": "ping"})


def text_delta(text: str) -> bytes:
    return sse("content_block_delta",
               {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})


def block_stop() -> bytes:
    return sse("content_block_stop", {"type": "content_block_stop", "index": 0})


def message_delta(usage: Usage, reply: Reply) -> bytes:
    return sse("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
        "usage": {
            "input_tokens": usage.input_tokens,
            "cache_creation_input_tokens": usage.cache_creation_input_tokens,
            "cache_read_input_tokens": usage.cache_read_input_tokens,
            "output_tokens": reply.output_tokens,
        },
    })


def message_stop() -> bytes:
    return sse("message_stop", {"type": "message_stop"})


def ratelimit_headers(*, exhausted: bool = False) -> dict[str, str]:
    """``anthropic-ratelimit-*`` headers; ``exhausted`` for a 429 (nothing remaining)."""
    reset = (datetime.now(UTC) + timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%SZ")
    headers: dict[str, str] = {}
    for name, limit in _LIMITS.items():
        headers[f"anthropic-ratelimit-{name}-limit"] = str(limit)
        remaining = 0 if exhausted else limit - 1 if name == "requests" else limit
        headers[f"anthropic-ratelimit-{name}-remaining"] = str(remaining)
        headers[f"anthropic-ratelimit-{name}-reset"] = reset
    return headers
