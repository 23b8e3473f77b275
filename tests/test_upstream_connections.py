"""Pooled upstream connections that the upstream has already dropped.

A kept-alive connection can be dead by the time the proxy reuses it: llama-server closes its
connection after every streamed response (while advertising ``Keep-Alive: timeout=5``), and any
upstream closes idle ones on its own schedule, so a request can be written into a socket the server
closes without reading it. This upstream does that on purpose: it answers the first request of a
connection (after a stream, or after any response), and closes the connection when the next request
arrives on it, answering nothing. The proxy must lose neither a client's request nor a warm to it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import orjson

from specproxy.testing import run_proxy
from tests.conftest import KEY_A, headers, question_body, warm_body

USAGE = {"input_tokens": 20, "cache_creation_input_tokens": 2000, "cache_read_input_tokens": 0, "output_tokens": 0}


def _message(usage: dict[str, int]) -> dict[str, object]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5",
            "stop_reason": "max_tokens", "stop_sequence": None, "usage": usage}


def _sse(event: str, data: object) -> bytes:
    payload = b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(payload), payload)


@dataclass
class DroppingUpstream:
    """Serves ``/v1/messages`` over raw HTTP/1.1; a connection is dropped, unanswered, at its next
    request after a streamed response (``after="stream"``) or after any response (``after="any"``)."""

    after: str
    url: str = ""
    connections: int = 0
    answered: list[bytes] = field(default_factory=list)  # the first line of each answered request
    dropped: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        doomed = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = orjson.loads(await reader.readexactly(length)) if length else {}
                if doomed:  # the connection the client thinks is alive: close it, answer nothing
                    self.dropped += 1
                    return
                self.answered.append(head.split(b"\r\n", 1)[0])
                stream = bool(body.get("stream")) and body.get("max_tokens") != 0
                wrote = b"cache_control" in orjson.dumps(body)
                usage = {**USAGE, "cache_creation_input_tokens": USAGE["cache_creation_input_tokens"] if wrote else 0}
                if stream:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                                 b"Keep-Alive: timeout=5, max=100\r\n\r\n")
                    writer.write(_sse("message_start", {"type": "message_start", "message": _message(usage)}))
                    writer.write(_sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                                        "usage": {"output_tokens": 1}}))
                    writer.write(_sse("message_stop", {"type": "message_stop"}) + b"0\r\n\r\n")
                else:
                    data = orjson.dumps(_message(usage))
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(data), data))
                await writer.drain()
                doomed = self.after == "any" or stream
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def dropping(after: str) -> AsyncIterator[DroppingUpstream]:
    upstream = DroppingUpstream(after)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield upstream
        server.close()


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, object]) -> tuple[int, bytes]:
    async with http.post(url, data=orjson.dumps(body), headers=headers(KEY_A)) as r:
        return r.status, await r.read()


async def test_behind_llamacpp_a_stream_s_connection_is_not_pooled_so_the_next_request_is_not_lost() -> None:
    async with dropping("stream") as up, run_proxy(up.url, upstream_profile="llamacpp") as p, \
            aiohttp.ClientSession() as http:
        statuses = []
        for i in range(3):
            code, raw = await post(http, p.url + "/v1/messages", {**question_body(f"Q{i}?"), "stream": True})
            assert b"message_stop" in raw
            statuses.append(code)
            statuses.append((await post(http, p.url + "/v1/messages", question_body(f"R{i}?")))[0])
    assert statuses == [200] * 6
    # A stream's connection was never used again: every request had its own.
    assert up.dropped == 0 and up.answered.count(b"POST /v1/messages HTTP/1.1") == 6


async def test_a_warm_sent_into_a_dead_pooled_connection_is_sent_again_once_on_a_fresh_one() -> None:
    async with dropping("any") as up, run_proxy(up.url) as p, aiohttp.ClientSession() as http:
        # A question first, so that the pool holds a connection the upstream will drop.
        assert (await post(http, p.url + "/v1/messages", question_body("Q?")))[0] == 200
        code, raw = await post(http, p.url + "/prewarm?wait=1", warm_body("Another document. " * 200))
        warm = orjson.loads(raw)
        async with http.get(p.url + f"/prewarm/{warm['prefix']}", headers=headers(KEY_A)) as r:
            state = await r.json()
    assert code == 200 and warm["state"] == "warm", state
    assert up.dropped == 1  # the warm met the dead connection once ...
    assert len(up.answered) == 2 and up.connections == 2  # ... and was answered on a fresh one, once
