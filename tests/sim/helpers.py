"""Helpers for the simulator tests: prompt builders and a raw HTTP client with full control of bytes."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from specproxy.testing import SimHandle

MODEL = "claude-sonnet-4-6"  # minimum cacheable prefix: 2048 tokens
KEY = "sk-test-tenant-one"
OTHER_KEY = "sk-test-tenant-two"


def text(tokens: int, tag: str) -> str:
    """A text of exactly ``tokens`` approximate tokens (4 characters each), distinct per ``tag``."""
    head = f"[{tag}] "
    return (head + "lorem ipsum " * tokens)[: 4 * tokens]


def cached(block_text: str, ttl: str | None = None) -> dict[str, Any]:
    """A text block carrying a breakpoint."""
    cc: dict[str, Any] = {"type": "ephemeral"}
    if ttl is not None:
        cc["ttl"] = ttl
    return {"type": "text", "text": block_text, "cache_control": cc}


def plain(block_text: str) -> dict[str, Any]:
    return {"type": "text", "text": block_text}


@dataclass
class Reply:
    """A raw HTTP reply: status, parsed JSON (if any), headers, raw bytes."""

    status: int
    body: Any
    headers: Any
    raw: bytes

    @property
    def usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = self.body["usage"]
        return usage


class Api:
    """A small raw client for the simulator: full control over headers and body bytes."""

    def __init__(self, sim: SimHandle, session: aiohttp.ClientSession) -> None:
        self.sim = sim
        self.session = session

    def headers(self, key: str | None = KEY, version: str | None = "2023-06-01", **extra: str) -> dict[str, str]:
        hdrs = {"content-type": "application/json"}
        if key is not None:
            hdrs["x-api-key"] = key
        if version is not None:
            hdrs["anthropic-version"] = version
        hdrs.update({k.replace("_", "-"): v for k, v in extra.items()})
        return hdrs

    async def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> Reply:
        data: bytes | io.BytesIO = body if isinstance(body, bytes) else orjson.dumps(body)
        if len(data) > 1_000_000:  # aiohttp warns about large raw bytes bodies
            data = io.BytesIO(data)
        async with self.session.post(self.sim.url + path, data=data, headers=headers or self.headers()) as resp:
            raw = await resp.read()
            parsed = orjson.loads(raw) if resp.content_type == "application/json" else None
            return Reply(resp.status, parsed, resp.headers, raw)

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        async with self.session.get(self.sim.url + path, headers=headers or self.headers()) as resp:
            raw = await resp.read()
            parsed = orjson.loads(raw) if resp.content_type == "application/json" else None
            return Reply(resp.status, parsed, resp.headers, raw)

    async def messages(self, body: dict[str, Any], *, key: str = KEY, **headers: str) -> Reply:
        """POST /v1/messages with ``model`` and ``max_tokens`` defaulted."""
        full = {"model": MODEL, "max_tokens": 64, **body}
        return await self.post("/v1/messages", full, self.headers(key=key, **headers))
