"""Reading ``usage`` from a response as it is relayed, without holding the stream back.

Streaming: ``message_start`` carries the input usage (cache counters included) and the final
``message_delta`` the cumulative counts. Non-streaming: the JSON body's ``usage``; a copy of the
body is kept (bounded) only until the response ends. Compressed bodies are inflated on the copy.

The tap never raises: an event that is not JSON, JSON that is not an object, or a usage count that
is not a non-negative integer makes the usage unknown (``failed``), and the relay goes on unchanged.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Final

import orjson

from specproxy.sse import SSEReader

MAX_JSON_COPY: Final = 8 * 1024 * 1024


def _count(value: Any) -> int:
    """A token count: a non-negative integer, or 0 when absent; anything else is not usage."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("a usage count is not a non-negative integer")
    return value


def _obj(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


@dataclass(slots=True)
class Usage:
    """Token counts of one response, by kind."""

    input: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    output: int = 0

    @classmethod
    def from_api(cls, usage: dict[str, Any]) -> Usage:
        """From the API's ``usage`` object; ValueError when it is not one (wrong types)."""
        usage = _obj(usage)
        created = _count(usage.get("cache_creation_input_tokens"))
        split = _obj(usage.get("cache_creation"))
        w1h = _count(split.get("ephemeral_1h_input_tokens"))
        return cls(
            input=_count(usage.get("input_tokens")),
            cache_read=_count(usage.get("cache_read_input_tokens")),
            cache_write_5m=max(0, created - w1h),
            cache_write_1h=w1h,
            output=_count(usage.get("output_tokens")),
        )

    def merge_delta(self, usage: dict[str, Any]) -> None:
        """Apply a ``message_delta`` usage: counts there are cumulative, and may repeat input ones."""
        merged = Usage.from_api(usage)
        self.output = merged.output or self.output
        if "input_tokens" in usage and usage["input_tokens"] is not None:
            self.input = merged.input
        if usage.get("cache_read_input_tokens") is not None:
            self.cache_read = merged.cache_read
        if usage.get("cache_creation_input_tokens") is not None:
            if isinstance(usage.get("cache_creation"), dict):
                self.cache_write_5m, self.cache_write_1h = merged.cache_write_5m, merged.cache_write_1h
            else:
                # The API's message_delta carries the write total only, not its 5m/1h split: keep
                # message_start's 1h share rather than counting every write as 5m.
                total = merged.cache_write_5m
                self.cache_write_1h = min(self.cache_write_1h, total)
                self.cache_write_5m = total - self.cache_write_1h

    @property
    def cache_written(self) -> int:
        return self.cache_write_5m + self.cache_write_1h

    def as_dict(self) -> dict[str, int]:
        return {
            "input": self.input,
            "cache_read": self.cache_read,
            "cache_write_5m": self.cache_write_5m,
            "cache_write_1h": self.cache_write_1h,
            "output": self.output,
        }


class UsageTap:
    """Fed every chunk of a Messages response (``feed``); ``finish`` returns its usage, or None."""

    __slots__ = ("_collect", "_inflate", "_json", "_partial", "_size", "_sse", "content", "failed", "model", "usage")

    def __init__(self, content_type: str, content_encoding: str, *, collect_content: bool = False) -> None:
        # With collect_content, the reply's content blocks are rebuilt (JSON: as sent; SSE: from
        # the deltas), so the next turn can be warmed with the reply in it.
        self._collect = collect_content
        self.content: list[dict[str, Any]] | None = [] if collect_content else None
        self._partial: dict[int, list[str]] = {}
        self._sse = SSEReader() if content_type.startswith("text/event-stream") else None
        enc = content_encoding.lower().strip()
        # wbits 47: zlib or gzip header, detected; raw deflate is rare from HTTP servers.
        self._inflate = zlib.decompressobj(47) if enc in ("gzip", "deflate", "x-gzip") else None
        self._json: list[bytes] | None = None if self._sse else []
        self._size = 0
        self.usage: Usage | None = None
        self.model: str | None = None
        self.failed = False  # the response could not be read: its usage is unknown
        if enc not in ("", "identity", "gzip", "deflate", "x-gzip"):
            self._sse = None
            self._json = None  # br/zstd: not read

    def _give_up(self) -> None:
        self.failed = True
        self.usage = None
        self.content = None
        self._sse = self._json = self._inflate = None

    def feed(self, chunk: bytes) -> None:
        """Read one chunk of the response (never raises)."""
        try:
            self._feed(chunk)
        except Exception:  # any malformed upstream data: usage unknown, the relay is unaffected
            self._give_up()

    def _feed(self, chunk: bytes) -> None:
        if self._inflate is not None:
            try:
                chunk = self._inflate.decompress(chunk)
            except zlib.error:
                self._sse = self._json = self._inflate = None
                return
        if self._sse is not None:
            for event, data in self._sse.feed(chunk):
                if event == "message_start":
                    message = _obj(_obj(orjson.loads(data)).get("message"))
                    model = message.get("model")
                    self.model = model if isinstance(model, str) else None
                    self.usage = Usage.from_api(_obj(message.get("usage")))
                elif event == "message_delta" and self.usage is not None:
                    self.usage.merge_delta(_obj(_obj(orjson.loads(data)).get("usage")))
                elif self._collect and event.startswith("content_block"):
                    try:
                        self._rebuild(event, _obj(orjson.loads(data)))
                    except Exception:  # a reply we cannot rebuild is not warmed; usage is still read
                        self.content = None
        elif self._json is not None:
            self._size += len(chunk)
            if self._size > MAX_JSON_COPY:
                self._json = None
            else:
                self._json.append(chunk)

    def finish(self) -> Usage | None:
        """The response's usage, or None when it is unknown (never raises)."""
        try:
            return self._finish()
        except Exception:  # a malformed body: usage unknown
            self._give_up()
            return None

    def _finish(self) -> Usage | None:
        if self._json is not None:
            try:
                data = orjson.loads(b"".join(self._json))
            except orjson.JSONDecodeError:
                self._give_up()
                return None
            self._json = None
            if isinstance(data, dict) and "usage" in data:
                model = data.get("model")
                self.model = model if isinstance(model, str) else None
                self.usage = Usage.from_api(data["usage"])
                if self._collect and isinstance(data.get("content"), list):
                    self.content = data["content"]
        return self.usage

    def _rebuild(self, event: str, data: dict[str, Any]) -> None:
        """Apply one content_block_* event to the reply being rebuilt, as the SDKs accumulate it."""
        content = self.content
        if content is None:
            return
        index = data.get("index", 0)
        if event == "content_block_start":
            block = dict(data.get("content_block") or {})
            if block.get("type") == "tool_use":
                self._partial[index] = []
            content.append(block)
            return
        if not 0 <= index < len(content):
            self.content = None  # out of order: give up rather than warm a wrong prompt
            return
        block = content[index]
        if event == "content_block_delta":
            delta = data.get("delta") or {}
            kind = delta.get("type")
            if kind == "text_delta":
                block["text"] = block.get("text", "") + delta.get("text", "")
            elif kind == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + delta.get("thinking", "")
            elif kind == "signature_delta":
                block["signature"] = delta.get("signature", "")
            elif kind == "input_json_delta":
                self._partial.setdefault(index, []).append(delta.get("partial_json", ""))
            elif kind == "citations_delta":
                block.setdefault("citations", []).append(delta.get("citation"))
        elif event == "content_block_stop" and index in self._partial:
            raw = "".join(self._partial.pop(index))
            try:
                block["input"] = orjson.loads(raw) if raw else {}
            except orjson.JSONDecodeError:
                self.content = None
