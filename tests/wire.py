"""A raw upstream for wire-level tests: it records each request's exact bytes and answers as told.

No HTTP library sits between the proxy and what is recorded, so a test sees the request line,
header names and bytes, and body exactly as the proxy sent them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field


@dataclass
class Captured:
    """One request as it arrived: the head (request line and headers) and the body bytes."""

    head: bytes
    body: bytes

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def target(self) -> bytes:
        return self.request_line.split(b" ")[1]

    @property
    def header_lines(self) -> list[tuple[bytes, bytes]]:
        out = []
        for line in self.head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            out.append((name, value.strip()))
        return out

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.header_lines if n.lower() == name.lower()]


Answer = Callable[[Captured], list[bytes]]  # the response, as chunks written one after another


def json_answer(body: bytes = b'{"ok":true}', extra: bytes = b"") -> Answer:
    def answer(_: Captured) -> list[bytes]:
        return [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + extra
                + b"content-length: %d\r\n\r\n" % len(body) + body]
    return answer


@dataclass
class WireUpstream:
    """The running raw upstream: its URL, what it received, and how it answers."""

    url: str = ""
    requests: list[Captured] = field(default_factory=list)
    answer: Answer = field(default_factory=json_answer)
    received_bytes: int = 0  # body bytes received so far, across requests (for streaming checks)
    gap: float = 0.0  # seconds between response chunks

    async def _read_body(self, reader: asyncio.StreamReader, head: bytes) -> bytes:
        length = None
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            elif name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        body = bytearray()
        if chunked:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                chunk = await reader.readexactly(size)
                body += chunk
                self.received_bytes += len(chunk)
                await reader.readexactly(2)
        elif length:
            while len(body) < length:
                chunk = await reader.read(min(1 << 16, length - len(body)))
                if not chunk:
                    break
                body += chunk
                self.received_bytes += len(chunk)
        return bytes(body)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = (await reader.readuntil(b"\r\n\r\n"))[:-4]
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                captured = Captured(head, b"")
                self.requests.append(captured)
                captured.body = await self._read_body(reader, head)
                for i, chunk in enumerate(self.answer(captured)):
                    if i and self.gap:
                        await asyncio.sleep(self.gap)
                    writer.write(chunk)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def wire_upstream(answer: Answer | None = None) -> AsyncIterator[WireUpstream]:
    up = WireUpstream()
    if answer is not None:
        up.answer = answer
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    up.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield up
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


async def raw_request(url: str, request: bytes, *, read: bool = True) -> bytes:
    """Send raw bytes to ``url`` on a new connection; return one response (head and body)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        if not read:
            return b""
        async with asyncio.timeout(20):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            body = await (reader.readexactly(length) if length is not None else reader.read())
            return head + body
    finally:
        writer.close()
