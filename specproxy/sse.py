"""An incremental reader of server-sent events, fed the raw chunks of a stream as they pass.

The proxy never buffers a stream for the client; this reader keeps only the current incomplete
event, so the warmer can settle on ``message_start`` and usage can be read from a relayed stream.
"""

from __future__ import annotations

from collections.abc import Iterator


class SSEReader:
    """Feed bytes with :meth:`feed`; iterate the complete ``(event, data)`` pairs it yields."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self._buf = b""
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> Iterator[tuple[str, bytes]]:
        buf = self._buf + chunk if self._buf else chunk
        buf = buf.replace(b"\r\n", b"\n") if b"\r" in buf else buf
        while True:
            end = buf.find(b"\n\n")
            if end < 0:
                break
            raw, buf = buf[:end], buf[end + 2 :]
            event = "message"
            data: list[bytes] = []
            for line in raw.split(b"\n"):
                if line.startswith(b"event:"):
                    event = line[6:].strip().decode("utf-8", "replace")
                elif line.startswith(b"data:"):
                    data.append(line[5:].lstrip(b" "))
            if data or event != "message":
                yield event, b"\n".join(data)
        # A single event larger than the bound is not interesting to us (content deltas); drop it.
        self._buf = buf if len(buf) <= self._max else b""
