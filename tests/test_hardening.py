"""Hardening: the fault matrix, credentials, isolation, limits, key hygiene and graceful shutdown.

Each fault row states what the client sees and what the upstream sees, and ends by checking that
nothing is left behind: no held request, no warm in flight, no upstream connection in use.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import httpx2
import orjson
import pytest
from multidict import CIMultiDict

from specproxy.config import ConfigError, load_settings
from specproxy.keys import FORWARDER, REGISTRY, WARMER
from specproxy.registry import State
from specproxy.testing import ProxyHandle, SimHandle, run_proxy
from tests.conftest import KEY_A, KEY_B, eventually, headers, question_body, warm_body

KEY_C = "sk-ant-test-tenant-c-0003"


def connections_in_use(proxy: ProxyHandle) -> int:
    connector = proxy.app[FORWARDER]._session.connector
    assert connector is not None
    return len(connector._acquired)


async def assert_nothing_left_behind(proxy: ProxyHandle) -> None:
    await eventually(lambda: proxy.held == 0 and proxy.app[WARMER].in_flight == 0 and connections_in_use(proxy) == 0)
    for row in proxy.app[REGISTRY].snapshot():
        assert row["state"] in {s.value for s in State}


async def post(http: aiohttp.ClientSession, url: str, body: Any, **hdrs: str) -> tuple[int, CIMultiDict[str], Any]:
    async with http.post(url, data=orjson.dumps(body), headers=headers(**hdrs)) as r:
        data = await r.json(content_type=None) if r.content_type != "text/event-stream" else await r.text()
        return r.status, CIMultiDict(r.headers), data


@pytest.fixture
async def fast_proxy(sim: SimHandle) -> AsyncIterator[ProxyHandle]:
    async with run_proxy(sim.url, max_hold=0.3, upstream_read_timeout=0.5, warm_timeout=1.0) as p:
        yield p


# --- the fault matrix ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("fault", "status", "error_type", "retry_after"),
    [
        ("rate_limit", 429, "rate_limit_error", True),
        ("overloaded", 529, "overloaded_error", False),
        ("api_error", 500, "api_error", False),
    ],
)
async def test_upstream_error_on_the_question_is_relayed_as_is(
    fast_proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession,
    fault: str, status: int, error_type: str, retry_after: bool,
) -> None:
    code, hdrs, body = await post(http, fast_proxy.url + "/v1/messages", question_body(), **{"x-sim-fault": fault})
    assert code == status and body["error"]["type"] == error_type
    assert ("retry-after" in {k.lower() for k in hdrs}) is retry_after
    assert hdrs["request-id"].startswith("req_") and hdrs["X-Cache-Warm"] == "miss"
    await assert_nothing_left_behind(fast_proxy)


@pytest.mark.parametrize("fault", ["rate_limit", "overloaded", "api_error"])
async def test_failed_warm_is_recorded_and_the_question_goes_at_once(
    fast_proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession, fault: str
) -> None:
    code, _, warm = await post(http, fast_proxy.url + "/prewarm?wait=1", warm_body(), **{"x-sim-fault": fault})
    assert code == 200 and warm["state"] == "failed"
    code, hdrs, body = await post(http, fast_proxy.url + "/v1/messages", question_body())
    assert code == 200 and hdrs["X-Cache-Warm"] == "failed" and hdrs["X-Cache-Warm-Wait-Ms"] == "0"
    assert body["usage"]["cache_creation_input_tokens"] > 0
    await assert_nothing_left_behind(fast_proxy)


async def test_dead_upstream_gives_502_and_a_failed_warm(http: aiohttp.ClientSession) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    async with run_proxy(dead, max_hold=0.5) as proxy:
        code, _, warm = await post(http, proxy.url + "/prewarm?wait=1", warm_body())
        assert code == 200 and warm["state"] == "failed"
        code, hdrs, body = await post(http, proxy.url + "/v1/messages", question_body())
        assert code == 502 and body["error"]["type"] == "api_error" and hdrs["X-Cache-Warm"] == "failed"
        await assert_nothing_left_behind(proxy)


async def test_stalled_question_times_out_as_504(fast_proxy: ProxyHandle, http: aiohttp.ClientSession) -> None:
    code, _, body = await post(http, fast_proxy.url + "/v1/messages", question_body(), **{"x-sim-fault": "stall"})
    assert code == 504 and body["error"]["type"] == "timeout_error"
    await assert_nothing_left_behind(fast_proxy)


async def test_stalled_warm_fails_at_warm_timeout_after_holding_to_max_hold(
    fast_proxy: ProxyHandle, http: aiohttp.ClientSession
) -> None:
    await post(http, fast_proxy.url + "/prewarm", warm_body(), **{"x-sim-fault": "stall"})
    code, hdrs, _ = await post(http, fast_proxy.url + "/v1/messages", question_body())
    assert code == 200 and hdrs["X-Cache-Warm"] == "timeout"
    await eventually(lambda: fast_proxy.app[WARMER].in_flight == 0)
    code, _, state = await post(http, fast_proxy.url + "/prewarm", warm_body())
    assert state["state"] == "failed" and state["sent"] is False  # remembered for failed_ttl
    await assert_nothing_left_behind(fast_proxy)


async def test_stream_cut_mid_way_reaches_the_client_as_a_broken_stream(
    proxy: ProxyHandle, client: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises((anthropic.APIError, httpx2.RemoteProtocolError)):
        cut = {"x-sim-fault": "disconnect_mid_stream"}
        async with client.messages.stream(**question_body(), extra_headers=cut) as s:
            async for _ in s.text_stream:
                pass
    await assert_nothing_left_behind(proxy)


async def test_client_leaving_mid_stream_closes_the_upstream_connection(http: aiohttp.ClientSession) -> None:
    from specproxy.testing import run_sim

    async with run_sim(time_scale=0.05) as slow_sim, run_proxy(slow_sim.url) as proxy:
        body = question_body(stream=True, max_tokens=4000)
        async with http.post(proxy.url + "/v1/messages", data=orjson.dumps(body),
                             headers=headers(**{"x-sim-reply-tokens": "4000"})) as r:
            assert r.status == 200
            await r.content.readline()  # the stream has begun
            assert connections_in_use(proxy) == 1
            r.close()  # the client goes away mid-stream
        await assert_nothing_left_behind(proxy)
        connector = proxy.app[FORWARDER]._session.connector
        assert connector is not None and not connector._conns  # closed, not pooled


async def test_slow_client_reading_a_long_stream_gets_every_byte(
    sim: SimHandle, proxy: ProxyHandle, http: aiohttp.ClientSession
) -> None:
    body = orjson.dumps(question_body(stream=True, max_tokens=3000))
    hdrs = headers(**{"x-sim-reply-tokens": "3000"})
    async with http.post(sim.url + "/v1/messages", data=body, headers=hdrs) as r:
        direct = [line for line in (await r.read()).split(b"\n") if b"text_delta" in line]
    async with http.post(proxy.url + "/v1/messages", data=body, headers=hdrs) as r:
        chunks = []
        while chunk := await r.content.read(512):
            chunks.append(chunk)
            await asyncio.sleep(0.001)
    relayed = [line for line in b"".join(chunks).split(b"\n") if b"text_delta" in line]
    assert [orjson.loads(x[5:])["delta"] for x in relayed] == [orjson.loads(x[5:])["delta"] for x in direct]
    assert len(relayed) > 50
    await assert_nothing_left_behind(proxy)


# --- isolation ------------------------------------------------------------------------------------

async def test_three_tenants_never_share_holds_or_warm_state(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    a = await post(http, proxy.url + "/prewarm", warm_body(), **{"x-api-key": KEY_A, "x-sim-gate": "a"})
    held = asyncio.create_task(post(http, proxy.url + "/v1/messages", question_body(), **{"x-api-key": KEY_A}))
    await proxy.until_held(1)
    # B and C ask the identical question while A's warm is in flight: neither waits.
    for key in (KEY_B, KEY_C):
        code, hdrs, _ = await post(http, proxy.url + "/v1/messages", question_body(), **{"x-api-key": key})
        assert code == 200 and hdrs["X-Cache-Warm"] == "miss" and hdrs["X-Cache-Warm-Wait-Ms"] == "0"
        async with http.get(f"{proxy.url}/prewarm/{a[2]['prefix']}", headers=headers(key)) as r:
            assert r.status == 404
    assert proxy.held == 1
    await sim.open_gate("a")
    code, hdrs, _ = await held
    assert hdrs["X-Cache-Warm"] == "held"
    by_tenant = (await sim.stats())["by_tenant"]
    assert len(by_tenant) == 3 and all(t["cache_writes"] == 1 for t in by_tenant.values())


# --- limits ---------------------------------------------------------------------------------------

async def test_over_the_hold_limit_a_request_goes_unheld_never_rejected(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    async with run_proxy(sim.url, max_held_per_tenant=2) as proxy:
        await post(http, proxy.url + "/prewarm", warm_body(), **{"x-sim-gate": "w"})
        held = [asyncio.create_task(post(http, proxy.url + "/v1/messages", question_body())) for _ in range(2)]
        await proxy.until_held(2)
        code, hdrs, _ = await post(http, proxy.url + "/v1/messages", question_body())
        assert code == 200 and hdrs["X-Cache-Warm"] == "unheld"
        await sim.open_gate("w")
        assert [r[1]["X-Cache-Warm"] for r in await asyncio.gather(*held)] == ["held", "held"]


async def test_warms_in_flight_per_tenant_are_bounded_with_429_and_retry_after(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    async with run_proxy(sim.url, max_warms_in_flight_per_tenant=2) as proxy:
        for i in range(2):
            code, _, _ = await post(http, proxy.url + "/prewarm", warm_body(f"context {i} " * 3000),
                                    **{"x-sim-gate": "w"})
            assert code == 202
        code, hdrs, body = await post(http, proxy.url + "/prewarm", warm_body("third " * 3000))
        assert code == 429 and body["error"]["type"] == "rate_limit_error" and int(hdrs["retry-after"]) >= 1
        # Another tenant is not limited by the first one's warms.
        code, _, _ = await post(http, proxy.url + "/prewarm", warm_body("third " * 3000), **{"x-api-key": KEY_B})
        assert code == 202
        await sim.open_gate("w")
        await assert_nothing_left_behind(proxy)


async def test_warms_per_minute_per_tenant_are_bounded(sim: SimHandle, http: aiohttp.ClientSession) -> None:
    async with run_proxy(sim.url, warms_per_minute_per_tenant=3) as proxy:
        codes = [(await post(http, proxy.url + "/prewarm", warm_body(f"ctx {i} " * 3000)))[0] for i in range(4)]
        assert codes == [202, 202, 202, 429]
        # A deduplicated prewarm sends nothing and does not count.
        await assert_nothing_left_behind(proxy)


# --- credentials ------------------------------------------------------------------------------------

async def test_injection_mode_sends_the_proxy_key_and_gates_clients_by_token(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    upstream_key = "sk-ant-upstream-secret-9999"
    async with run_proxy(sim.url, upstream_api_key=upstream_key, client_tokens=("team-a-token",)) as proxy:
        code, _, body = await post(http, proxy.url + "/v1/messages", question_body(), **{"x-api-key": "wrong"})
        assert code == 401 and body["error"]["type"] == "authentication_error"
        assert "wrong" not in orjson.dumps(body).decode()
        code, hdrs, _ = await post(http, proxy.url + "/prewarm?wait=1", warm_body(), **{"x-api-key": "team-a-token"})
        assert code == 200
        code, hdrs, _ = await post(http, proxy.url + "/v1/messages", question_body(), **{"x-api-key": "team-a-token"})
        assert code == 200 and hdrs["X-Cache-Warm"] == "hit"
    from specproxy.sim import tenant_digest as sim_digest

    assert set((await sim.stats())["by_tenant"]) == {sim_digest(upstream_key)[:16]}


def test_injection_mode_on_a_public_address_without_client_tokens_refuses_to_start() -> None:
    env = {"SPECPROXY_UPSTREAM_API_KEY": "sk-ant-x"}
    with pytest.raises(ConfigError, match="client_tokens"):
        load_settings(None, env=env, overrides={"host": "0.0.0.0"}, read_default_file=False)
    assert load_settings(None, env=env, overrides={"host": "127.0.0.1"}, read_default_file=False).upstream_api_key


async def test_keys_never_appear_in_logs_metrics_status_or_errors(
    sim: SimHandle, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    key = "sk-ant-RECOGNISABLE-KEY-0123456789"
    upstream_key = "sk-ant-UPSTREAM-SECRET-abcdef"
    seen: list[str] = []
    caplog.set_level(logging.DEBUG, logger="specproxy")
    async with run_proxy(sim.url, log_level="debug", metrics_tenant_label=True, max_hold=0.3) as proxy:
        await post(http, proxy.url + "/prewarm?wait=1", warm_body(), **{"x-api-key": key})
        await post(http, proxy.url + "/v1/messages", question_body(), **{"x-api-key": key})
        await post(http, proxy.url + "/v1/messages", question_body(stream=True), **{"x-api-key": key})
        await post(http, proxy.url + "/v1/messages", question_body(), **{"x-api-key": key, "x-sim-fault": "api_error"})
        await post(http, proxy.url + "/prewarm", {"model": 1}, **{"x-api-key": key})
        for path in ("/metrics", "/status.json", "/status", "/healthz"):
            async with http.get(proxy.url + path) as r:
                seen.append(await r.text())
    async with run_proxy("http://127.0.0.1:9", upstream_api_key=upstream_key) as proxy:
        seen.append(str(await post(http, proxy.url + "/v1/messages", question_body(), **{"x-api-key": key})))
        seen.append(str(await post(http, proxy.url + "/prewarm?wait=1", warm_body(), **{"x-api-key": key})))
        async with http.get(proxy.url + "/status.json") as r:
            seen.append(await r.text())
    seen += [r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records]
    text = "\n".join(seen)
    assert "specproxy_requests_total" in text and len(caplog.records) > 5
    for secret in (key, upstream_key, key[-12:], upstream_key[-12:]):
        assert secret not in text


async def test_status_needs_the_admin_token_when_one_is_set(sim: SimHandle, http: aiohttp.ClientSession) -> None:
    async with run_proxy(sim.url, admin_token="adm-123") as proxy:
        async with http.get(proxy.url + "/status.json") as r:
            assert r.status == 401
        async with http.get(proxy.url + "/status.json", headers={"authorization": "Bearer adm-123"}) as r:
            assert r.status == 200
        async with http.get(proxy.url + "/status?token=adm-123") as r:
            assert r.status == 200 and "<html" in await r.text()


# --- graceful shutdown -------------------------------------------------------------------------------

async def test_sigterm_releases_held_requests_upstream_and_exits_cleanly(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECPROXY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "specproxy.cli", "serve", "--port", str(port), "--upstream", sim.url,
        "--log-level", "warning", env={**env, "SPECPROXY_MAX_HOLD": "30", "SPECPROXY_DRAIN_TIMEOUT": "10"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async def up() -> bool:
            try:
                async with http.get(url + "/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(up)
        await post(http, url + "/prewarm", warm_body(), **{"x-sim-gate": "never"})
        question = asyncio.create_task(post(http, url + "/v1/messages", question_body()))

        async def held() -> bool:
            async with http.get(url + "/healthz") as r:
                return bool((await r.json())["held"] == 1)

        await eventually(held)
        # A stream already flowing when SIGTERM arrives (the upstream answers it 1 s later).
        other = question_body("slow?", context="another context " * 1000, stream=True)
        slow = asyncio.create_task(post(http, url + "/v1/messages", other,
                                        **{"x-sim-delay-ms": "1000"}))

        async def slow_arrived() -> bool:
            return any(e.get("stream") is True for e in await sim.requests())

        await eventually(slow_arrived)
        proc.send_signal(signal.SIGTERM)
        code, hdrs, body = await asyncio.wait_for(question, 20)
        assert code == 200 and hdrs["X-Cache-Warm"] == "unheld" and body["type"] == "message"
        code, _, text = await asyncio.wait_for(slow, 20)
        assert code == 200 and "message_stop" in text  # finished, not cut
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await sim.open_gate("never")
    log = [e for e in await sim.requests() if e["path"] == "/v1/messages"]
    assert sorted(e["max_tokens"] for e in log) == [0, 64, 64]  # the warm, the slow stream, the released one

