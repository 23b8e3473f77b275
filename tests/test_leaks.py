"""No credential in any response byte or log line, whatever the HTTP layer makes of a malformed request.

aiohttp's parser errors quote the offending header line in their message, which it logs (with a
traceback, at the default level) and echoes in its 400 body. Every parser error path is driven
here over a raw socket with a recognisable key: in-process (every log record captured, at DEBUG)
and in a ``specproxy serve`` process with each of aiohttp's two parsers (C and pure Python),
reading what the process itself writes to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Iterator

import aiohttp
import orjson
import pytest

from specproxy.logs import JSONFormatter, TextFormatter
from specproxy.testing import SimHandle, run_proxy
from tests.conftest import eventually

KEY = "sk-ant-LEAKCANARY-7f3a9c1d"
K = KEY.encode()
H = b"Host: proxy\r\n"
FRAGMENTS = (KEY, KEY[7:], "LEAKCANARY")

# name -> raw request. Each is refused by the HTTP layer itself, before any handler runs.
PARSER_ERRORS: dict[str, bytes] = {
    "control character in the key": b"POST /v1/messages HTTP/1.1\r\n" + H + b"x-api-key: " + K + b"\x01z\r\n"
                                    b"Content-Length: 0\r\n\r\n",
    "NUL in the key": b"POST /v1/messages HTTP/1.1\r\n" + H + b"x-api-key: " + K + b"\x00z\r\n\r\n",
    "Authorization over 8,190 bytes": b"GET /v1/models HTTP/1.1\r\n" + H + b"Authorization: Bearer " + K
                                      + b"A" * 9000 + b"\r\n\r\n",
    "x-api-key over 8,190 bytes": b"GET /v1/models HTTP/1.1\r\n" + H + b"x-api-key: " + K + b"B" * 8200 + b"\r\n\r\n",
    "a header line with no colon": b"GET /v1/models HTTP/1.1\r\n" + H + K + b"\r\n\r\n",
    "no colon after the key": b"GET /v1/models HTTP/1.1\r\n" + H + b"x-api-key: " + K + b"\r\n" + K + b" x\r\n\r\n",
    "space in a header name": b"GET /v1/models HTTP/1.1\r\n" + H + b"x-api key: " + K + b"\r\n\r\n",
    "obsolete line folding": b"GET /v1/models HTTP/1.1\r\n" + H + b"x-api-key: a\r\n " + K + b"\r\n\r\n",
    "control character in a header name": b"GET /v1/models HTTP/1.1\r\n" + H + b"x-\x01" + K + b": v\r\n\r\n",
    "bare CR": b"GET /v1/models HTTP/1.1\r\n" + H + b"x-api-key: " + K + b"\rX: y\r\n\r\n",
    "Content-Length not a number": b"POST /v1/messages HTTP/1.1\r\n" + H + b"Content-Length: " + K + b"\r\n\r\n",
    "two Content-Lengths": b"POST /v1/messages HTTP/1.1\r\n" + H + b"x-api-key: " + K
                           + b"\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "unknown Transfer-Encoding": b"POST /v1/messages HTTP/1.1\r\n" + H + b"x-api-key: " + K
                                 + b"\r\nTransfer-Encoding: " + K + b"\r\n\r\n",
    "malformed chunk": b"POST /v1/messages HTTP/1.1\r\n" + H + b"x-api-key: " + K
                       + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + K + b"\r\n",
    "the key as the method": K + b" /v1/models HTTP/1.1\r\n" + H + b"\r\n",
    "the key as the version": b"GET /v1/models HTTP/" + K + b"\r\n" + H + b"\r\n",
    "request line over 8,190 bytes": b"GET /v1/models?k=" + K + b"C" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n",
    "control character in the target": b"GET /v1/models?k=" + K + b"\x01 HTTP/1.1\r\n" + H + b"\r\n",
    "more than 128 headers": b"GET /v1/models HTTP/1.1\r\n" + H
                             + b"".join(b"x-h%d: %s\r\n" % (i, K) for i in range(200)) + b"\r\n",
}


async def send_raw(host: str, port: int, request: bytes) -> bytes:
    """Write ``request`` on a fresh connection; read one answer (or until the server closes)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            body = await (reader.readexactly(length) if length is not None else reader.read())
            return head + body
    finally:
        writer.close()


def split(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body


def assert_no_key(text: str) -> None:
    for fragment in FRAGMENTS:
        assert fragment not in text


def rendered(records: list[logging.LogRecord]) -> Iterator[str]:
    """Every way a record may be written: plain (with its traceback), ours as text and as JSON."""
    plain = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for record in records:
        yield plain.format(record)
        yield TextFormatter().format(record)
        yield JSONFormatter().format(record)
        yield repr(record.args) + repr(getattr(record, "fields", ""))


@pytest.mark.parametrize("name", list(PARSER_ERRORS))
async def test_a_parser_error_is_answered_in_anthropic_shape_without_the_key(
    sim: SimHandle, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, every level
    async with run_proxy(sim.url, log_level="debug") as proxy:
        host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        answer = await send_raw(host, int(port), PARSER_ERRORS[name])
        status, fields, body = split(answer)
        assert status == 400
        error = orjson.loads(body)
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert fields["request-id"].startswith("req_") and fields["x-cache-warm"] == "bypass"
    assert_no_key(answer.decode("latin-1"))
    assert caplog.records, "the rejection is logged (by kind)"
    for line in rendered(caplog.records):
        assert_no_key(line)
    assert len(await sim.requests()) == 0  # refused before anything went upstream


async def test_parser_errors_are_counted(sim: SimHandle) -> None:
    from specproxy.serving import SERVER_STATS

    async with run_proxy(sim.url) as proxy:
        host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        for request in list(PARSER_ERRORS.values())[:5]:
            await send_raw(host, int(port), request)
        assert proxy.app[SERVER_STATS].parser_errors == 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("parser", ["c", "python"])
@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_a_serving_process_writes_no_key_to_its_log_with_either_parser(
    sim: SimHandle, http: aiohttp.ClientSession, parser: str, log_format: str
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPECPROXY_", "AIOHTTP_"))}
    if parser == "python":
        env["AIOHTTP_NO_EXTENSIONS"] = "1"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "specproxy.cli", "serve", "--port", str(port), "--upstream", sim.url,
        "--log-level", "debug", env={**env, "SPECPROXY_LOG_FORMAT": log_format},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    answers: list[bytes] = []
    try:
        async def up() -> bool:
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(up, timeout=30)
        for request in PARSER_ERRORS.values():
            answers.append(await send_raw("127.0.0.1", port, request))
        # And a well-formed request carrying the key, so the log has its ordinary lines too.
        async with http.get(f"http://127.0.0.1:{port}/v1/models", headers={"x-api-key": KEY}) as r:
            assert r.status < 500
    finally:
        proc.terminate()
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    by_case = dict(zip(PARSER_ERRORS, answers, strict=True))
    if parser == "python":
        # The pure-Python parser takes any token as a method: a request, forwarded; the answer is the
        # upstream's own (relayed as it is), so only the proxy's log is checked for that one.
        assert split(by_case.pop("the key as the method"))[0] == 400
    assert {split(a)[0] for a in by_case.values()} == {400}
    log_text = stderr.decode("utf-8", "replace")
    assert "request" in log_text and "malformed" in log_text  # it did log: the kind, not the line
    assert "Traceback" not in log_text
    assert_no_key(log_text)
    for answer in by_case.values():
        assert_no_key(answer.decode("latin-1"))
