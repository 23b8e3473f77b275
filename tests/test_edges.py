"""Edges (issue 13): what the upstream would accept goes through unaltered; bad input and hostile
clients get a clear answer and cost nothing.

One test per failure found by the black-box run, through real servers: the SDK or raw sockets, the
proxy, and the simulator or a raw upstream that records the exact bytes it receives (tests/wire.py).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import os
import re
import resource
import socket
import sys
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from specproxy.keys import FORWARDER, WARMER
from specproxy.serving import SERVER_STATS, descriptor_budget
from specproxy.testing import ProxyHandle, SimHandle, run_proxy
from tests.conftest import KEY_A, MODEL, access_lines, eventually, headers, question_body
from tests.wire import Captured, WireUpstream, json_answer, raw_request, wire_upstream

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def wire() -> Any:
    async with wire_upstream() as up:
        yield up


@pytest.fixture
async def wired(wire: WireUpstream) -> Any:
    async with run_proxy(wire.url, max_hold=1.0) as p:
        yield p


def one(wire: WireUpstream) -> Captured:
    assert len(wire.requests) == 1, [r.request_line for r in wire.requests]
    return wire.requests[0]


BODY = orjson.dumps(question_body())


# --- transparency -----------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_body_reaches_the_simulator_compressed_and_labelled_and_is_answered(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession, encoding: str
) -> None:
    packed = gzip.compress(BODY) if encoding == "gzip" else zlib.compress(BODY)
    async with http.post(proxy.url + "/v1/messages", data=packed,
                         headers=headers(**{"content-encoding": encoding})) as r:
        assert r.status == 200, await r.text()  # was 500: inflated by the proxy, still labelled
        assert (await r.json())["type"] == "message"
        assert r.headers["X-Cache-Warm"] == "bypass"  # relayed as sent, not read
    [entry] = [e for e in await sim.requests() if e["path"] == "/v1/messages"]
    assert entry["sha256"] == hashlib.sha256(BODY).hexdigest()  # the simulator inflated the very bytes


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_a_compressed_body_goes_upstream_as_the_client_sent_it(
    wired: ProxyHandle, wire: WireUpstream, encoding: str, path: str
) -> None:
    packed = gzip.compress(BODY) if encoding == "gzip" else os.urandom(64)  # opaque bytes for br / zstd
    request = (f"POST {path} HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY_A}\r\ncontent-type: application/json\r\n"
               f"Content-Encoding: {encoding}\r\nContent-Length: {len(packed)}\r\n\r\n").encode() + packed
    answer = await raw_request(wired.url, request)
    assert answer.startswith(b"HTTP/1.1 200")
    got = one(wire)
    assert got.body == packed and got.values(b"content-encoding") == [encoding.encode()]
    assert got.values(b"content-length") == [str(len(packed)).encode()]


@pytest.mark.parametrize("target", [
    "/v1/models?x=%2F", "/v1/models/claude%2Dx", "/v1/../x", "/v1/models?a=1&a=2&b=%20+", "/v1/files/%7Efile",
])
async def test_the_request_target_goes_upstream_exactly_as_received(
    wired: ProxyHandle, wire: WireUpstream, target: str
) -> None:
    answer = await raw_request(wired.url, f"GET {target} HTTP/1.1\r\nHost: x\r\nx-api-key: k\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200")
    assert one(wire).target == target.encode()


async def test_the_proxys_control_header_never_reaches_the_upstream(
    wired: ProxyHandle, wire: WireUpstream, http: aiohttp.ClientSession
) -> None:
    async with http.post(wired.url + "/v1/messages", data=BODY,
                         headers=headers(**{"X-Cache-Warm-Next": "1", "x-keep": "yes"})) as r:
        assert r.status == 200
    got = one(wire)
    assert got.values(b"x-cache-warm-next") == [] and got.values(b"x-keep") == [b"yes"]


async def test_a_pass_through_upload_over_max_body_bytes_is_streamed_upstream_whole(
    sim: SimHandle, wire: WireUpstream
) -> None:
    size = 4 * 1024 * 1024
    blob = os.urandom(size)
    async with run_proxy(wire.url, max_body_bytes=64 * 1024) as proxy:
        head = (f"POST /v1/files HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY_A}\r\n"
                "content-type: application/octet-stream\r\n"
                f"anthropic-beta: files-api-2025-04-14\r\nContent-Length: {size}\r\n\r\n").encode()
        host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head + blob[: size // 2])
        await writer.drain()
        # Streamed, not buffered: the upstream has bytes before the client has sent the rest.
        await eventually(lambda: wire.received_bytes > 0)
        assert wire.received_bytes <= size // 2
        writer.write(blob[size // 2:])
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200")
        got = one(wire)
        assert got.body == blob and got.values(b"content-length") == [str(size).encode()]
        # The Messages limit still holds on /v1/messages (and /prewarm): 413, nothing sent.
        big = b'{"model":"m","messages":[],"x":"' + b"a" * (200 * 1024) + b'"}'
        async with aiohttp.ClientSession() as http, \
                http.post(proxy.url + "/v1/messages", data=big, headers=headers()) as r:
            assert r.status == 413 and (await r.json())["error"]["type"] == "request_too_large"
            assert r.headers["X-Cache-Warm"] == "bypass"
        assert len(wire.requests) == 1


# --- crashes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("odd", [
    {"type": ["text"], "text": "x", "cache_control": {"type": "ephemeral"}},
    {"type": {"t": "text"}, "text": "x", "cache_control": {"type": "ephemeral"}},
    {"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": ["5m"]}},
    {"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": {"m": 5}}},
    {"type": "text", "text": "x", "cache_control": ["ephemeral"]},
])
async def test_an_odd_block_is_forwarded_as_bypass_and_answered_by_the_upstream(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession, records: list[logging.LogRecord],
    odd: dict[str, Any]
) -> None:
    body = question_body()
    body["messages"][0]["content"].insert(0, odd)
    raw = orjson.dumps(body)
    async with http.post(proxy.url + "/v1/messages", data=raw, headers=headers()) as r:
        status, answer = r.status, await r.read()
        outcome = r.headers["X-Cache-Warm"]
    assert status < 500, answer  # was 500 text/plain, and nothing forwarded
    assert outcome in ("bypass", "miss")  # identified or not, never a crash
    sent = [e for e in await sim.requests() if e["path"] == "/v1/messages"]
    assert [e["sha256"] for e in sent] == [hashlib.sha256(raw).hexdigest()]
    await eventually(lambda: len(access_lines(records)) == 1)
    assert access_lines(records)[0]["status"] == status  # not 499


# --- limits ------------------------------------------------------------------------------------------

async def test_garbage_credentials_leave_bounded_bookkeeping(sim: SimHandle) -> None:
    body = orjson.dumps({"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "tiny", "cache_control": {"type": "ephemeral"}}]}]})
    async with run_proxy(sim.url, credential_state_max=500) as proxy, aiohttp.ClientSession() as http:
        sem = asyncio.Semaphore(32)

        async def one_key(i: int) -> int:
            async with sem, http.post(proxy.url + "/prewarm", data=body,
                                      headers=headers(f"garbage-{i:05d}-{os.urandom(4).hex()}")) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one_key(i) for i in range(3000)))
        assert set(statuses) == {202}
        await eventually(lambda: proxy.app[WARMER].in_flight == 0, timeout=60)
        assert proxy.app[WARMER].limits.tracked <= 500  # 3,000 keys, at most 500 remembered


async def test_partial_headers_get_408_after_the_header_timeout(sim: SimHandle) -> None:
    async with run_proxy(sim.url, client_header_timeout=0.2) as proxy:
        answer = await raw_request(proxy.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nx-slow: ")
        assert answer.startswith(b"HTTP/1.1 408")
        assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "timeout_error"
        assert proxy.app[SERVER_STATS].header_timeouts == 1


async def test_a_stalled_body_gets_408_after_the_body_timeout_and_nothing_goes_upstream(
    sim: SimHandle, records: list[logging.LogRecord]
) -> None:
    async with run_proxy(sim.url, client_body_timeout=0.2) as proxy:
        raw = BODY
        answer = await raw_request(proxy.url, (
            f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY_A}\r\ncontent-type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw[:100])
        assert answer.startswith(b"HTTP/1.1 408")
        assert b"X-Cache-Warm: bypass" in answer
        assert proxy.app[SERVER_STATS].body_timeouts == 1
    assert [e for e in await sim.requests() if e["path"] == "/v1/messages"] == []
    assert [line["status"] for line in access_lines(records)] == [408]


async def test_slow_sockets_under_a_256_descriptor_limit_do_not_starve_healthz(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECPROXY_")}

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "specproxy.cli", "serve", "--port", str(port), "--upstream", sim.url,
        "--log-level", "warning", env=env, preexec_fn=limit,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    slow: list[asyncio.StreamWriter] = []
    try:
        async def health() -> dict[str, Any] | None:
            # A new connection each time: a pooled keep-alive one would be served however starved.
            try:
                async with http.get(url + "/healthz", headers={"Connection": "close"},
                                    timeout=aiohttp.ClientTimeout(total=5)) as r:
                    return await r.json() if r.status == 200 else None
            except (aiohttp.ClientError, TimeoutError):
                return None

        async def up() -> bool:
            return await health() is not None

        await eventually(up, timeout=30)
        for i in range(240):  # each sends part of its headers, then nothing
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-slow-{i}: ".encode())
            slow.append(w)
        await asyncio.gather(*(w.drain() for w in slow), return_exceptions=True)

        async def all_accepted() -> bool:  # the server has taken every slow socket off its backlog
            h = await health()
            return h is not None and h["connections"]["evicted"] >= 240 - h["connections"]["max"]

        await eventually(all_accepted, timeout=30)
        served = [await health() for _ in range(5)]
        assert all(h is not None for h in served)  # was refused for a minute
        stats = served[-1]["connections"]  # type: ignore[index]
        assert stats["max"] == descriptor_budget(1024, 0, 256)[1] < 240
        assert stats["evicted"] >= 240 - stats["max"] and stats["open"] <= stats["max"] + 1
    finally:
        for w in slow:
            w.close()
        proc.terminate()
        await proc.wait()


async def test_the_upstream_pool_is_bounded_and_a_full_pool_answers_529(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    def plain(text: str) -> bytes:  # no breakpoint: nothing held or coalesced, each goes at once
        return orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": text}]})

    async with run_proxy(sim.url, upstream_max_connections=2, upstream_pool_timeout=0.3,
                         upstream_connect_timeout=0.5) as proxy:
        held = [asyncio.create_task(http.post(proxy.url + "/v1/messages", data=plain(f"q{i}"),
                                              headers=headers(**{"x-sim-gate": "pool"}))) for i in range(2)]
        async def both_in() -> bool:
            return (await sim.gates()).get("pool") == 2

        await eventually(both_in)
        async with http.post(proxy.url + "/v1/messages", data=plain("third"), headers=headers()) as r:
            assert r.status == 529 and (await r.json())["error"]["type"] == "overloaded_error"
            assert r.headers["X-Cache-Warm"]
        await sim.open_gate("pool")
        for task in held:
            resp = await task
            assert resp.status == 200
            resp.release()
        connector = proxy.app[FORWARDER]._session.connector
        assert connector is not None and connector.limit == 2


async def test_idle_upstream_connections_expire(sim: SimHandle, http: aiohttp.ClientSession) -> None:
    async with run_proxy(sim.url, upstream_idle_timeout=0.2) as proxy:
        await asyncio.gather(*(http.get(proxy.url + "/v1/models", headers=headers()) for _ in range(20)))
        connector = proxy.app[FORWARDER]._session.connector
        assert connector is not None

        def idle() -> int:
            return sum(len(v) for v in connector._conns.values())

        await eventually(lambda: idle() == 0)  # was 500 idle sockets kept after a burst


# --- headers -----------------------------------------------------------------------------------------

async def test_case_variant_repeats_all_reach_the_upstream(wired: ProxyHandle, wire: WireUpstream) -> None:
    answer = await raw_request(wired.url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: k\r\n"
                                          b"Anthropic-Beta: a\r\nanthropic-beta: b\r\nANTHROPIC-BETA: c\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    assert one(wire).values(b"anthropic-beta") == [b"a", b"b", b"c"]


async def test_non_ascii_header_bytes_go_through_in_both_directions(wire: WireUpstream) -> None:
    wire.answer = json_answer(extra=b"x-caf: caf\xe9\r\nx-utf8: caf\xc3\xa9\r\n")
    async with run_proxy(wire.url) as proxy:
        answer = await raw_request(proxy.url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: k\r\n"
                                              b"x-t: caf\xe9\r\nx-u: caf\xc3\xa9 \xe6\x97\xa5\r\n\r\n")
    got = one(wire)
    assert got.values(b"x-t") == [b"caf\xe9"] and got.values(b"x-u") == [b"caf\xc3\xa9 \xe6\x97\xa5"]
    assert b"\r\nx-caf: caf\xe9\r\n" in answer and b"\r\nx-utf8: caf\xc3\xa9\r\n" in answer


async def test_the_proxys_own_401_and_413_carry_the_contract_headers(sim: SimHandle) -> None:
    async with run_proxy(sim.url, client_tokens="tok-1", upstream_api_key="up-key", max_body_bytes=1000) as proxy, \
            aiohttp.ClientSession() as http:
        async with http.post(proxy.url + "/v1/messages", data=BODY, headers=headers("not-a-token")) as r:
            assert r.status == 401
            assert (r.headers["X-Cache-Warm"], r.headers["X-Cache-Warm-Wait-Ms"]) == ("bypass", "0")
        async with http.post(proxy.url + "/v1/messages", data=b"x" * 2000, headers=headers("tok-1")) as r:
            assert r.status == 413
            assert (r.headers["X-Cache-Warm"], r.headers["X-Cache-Warm-Wait-Ms"]) == ("bypass", "0")
    assert await sim.requests() == []


# --- small ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["/prewarm/../../v1/models", "/prewarm/..%2F..%2Fv1%2Fmodels",
                                    "/%70rewarm/../v1/models", "/status.json/../v1/models", "/healthz/x"])
async def test_a_path_under_the_proxys_own_names_never_reaches_the_upstream(
    wired: ProxyHandle, wire: WireUpstream, target: str
) -> None:
    answer = await raw_request(wired.url, f"GET {target} HTTP/1.1\r\nHost: x\r\nx-api-key: k\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 404")
    assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "not_found_error"
    assert wire.requests == []


def sse(*events: tuple[str, bytes]) -> bytes:
    return b"".join(b"event: " + e.encode() + b"\ndata: " + d + b"\n\n" for e, d in events)


START = orjson.dumps({"type": "message_start", "message": {"id": "msg_1", "model": MODEL, "usage": {
    "input_tokens": 5, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 1}}})
STOP = sse(("message_stop", b'{"type":"message_stop"}'))
BAD_STREAMS = {
    "data not JSON": sse(("message_start", b"{not json")) + STOP,
    "data a JSON array": sse(("message_start", b"[1,2,3]")) + STOP,
    "usage of the wrong type": sse(("message_start", orjson.dumps(
        {"type": "message_start", "message": {"usage": {"input_tokens": "five"}}}))) + STOP,
    "usage a list": sse(("message_start", orjson.dumps({"type": "message_start", "message": {"usage": [1]}}))) + STOP,
    "delta not JSON": sse(("message_start", START), ("message_delta", b"{{")) + STOP,
    "delta usage wrong": sse(("message_start", START), ("message_delta", orjson.dumps(
        {"type": "message_delta", "usage": {"output_tokens": {"n": 1}}}))) + STOP,
    "content block not an object": sse(("message_start", START), ("content_block_start", b'"x"')) + STOP,
}


@pytest.mark.parametrize("name", list(BAD_STREAMS))
async def test_a_malformed_stream_is_relayed_byte_for_byte(
    wire: WireUpstream, records: list[logging.LogRecord], name: str
) -> None:
    payload = BAD_STREAMS[name]
    chunks = [payload[i:i + 17] for i in range(0, len(payload), 17)]
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    wire.answer = lambda _: [head, *(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks), b"0\r\n\r\n"]
    async with run_proxy(wire.url, next_turn=True) as proxy, aiohttp.ClientSession() as http:
        async with http.post(proxy.url + "/v1/messages", data=orjson.dumps(question_body(stream=True)),
                             headers=headers()) as r:
            got = await r.read()
            assert r.status == 200
        await eventually(lambda: len(access_lines(records)) == 1)
    assert got == payload  # was: headers and 0 bytes, or a stream cut after one event
    line = access_lines(records)[0]
    assert line["status"] == 200 and not line.get("broken")


@pytest.mark.parametrize("usage", [{"input_tokens": "5"}, [1, 2], "none", {"cache_creation": [1]},
                                   {"output_tokens": -1}, {"input_tokens": True}])
async def test_a_json_response_with_a_bad_usage_is_relayed_logged_and_counted(
    wire: WireUpstream, records: list[logging.LogRecord], http: aiohttp.ClientSession, usage: Any
) -> None:
    body = orjson.dumps({"type": "message", "model": MODEL, "content": [], "usage": usage})
    wire.answer = json_answer(body)
    async with run_proxy(wire.url) as proxy:
        async with http.post(proxy.url + "/v1/messages", data=BODY, headers=headers()) as r:
            assert r.status == 200 and await r.read() == body
        async with http.get(proxy.url + "/metrics") as r:
            metrics = await r.text()
        await eventually(lambda: len(access_lines(records)) >= 1)
    line = access_lines(records)[0]
    assert (line["path"], line["status"], line["outcome"]) == ("/v1/messages", 200, "miss")
    assert "usage" not in line  # unknown, not invented
    assert re.search(r'specproxy_requests_total\{outcome="miss",path="/v1/messages",status="200"\} 1\.0', metrics)


async def test_the_sdk_gets_the_upstreams_answer_for_an_odd_ttl(proxy: ProxyHandle, sim: SimHandle) -> None:
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=KEY_A, max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [
                {"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": ["5m"]}}]}])
    assert caught.value.status_code < 500
    assert caught.value.response.headers["X-Cache-Warm"] == "bypass"
    assert len([e for e in await sim.requests() if e["path"] == "/v1/messages"]) == 1


# --- the suite runs as the README says ---------------------------------------------------------------

def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```\w*\n(.*?)```", text, re.S)
    return blocks[1].strip()


def test_ci_runs_exactly_the_readmes_test_command_in_a_fresh_virtualenv() -> None:
    command = readme_test_command()
    assert command.startswith("python3 -m venv .venv && .venv/bin/pip install ")
    assert command.endswith(".venv/bin/python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == command
