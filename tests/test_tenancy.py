"""Who sees what: ``/status*`` by view, the Docker image's public bind, and injection mode's one tenant.

- ``/status.json``: the admin token sees every registry row; a credential sees its own tenant's rows;
  anyone else the counts only. Bound to a non-loopback address without an admin token: counts only
  for everyone (the Docker image binds 0.0.0.0).
- Injection mode: every client token shares the proxy's upstream key, hence one upstream cache, so
  the tokens are one tenant: token B's question reads token A's warm, upstream and in the proxy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from specproxy.prefix import tenant_digest
from specproxy.sim import tenant_digest as sim_digest
from specproxy.testing import ProxyHandle, SimHandle, run_proxy
from tests.conftest import CONTEXT, KEY_A, KEY_B, headers, question_body, warm_body

ROOT = Path(__file__).resolve().parents[1]


async def prewarm(http: aiohttp.ClientSession, proxy: ProxyHandle, key: str, context: str) -> str:
    async with http.post(proxy.url + "/prewarm?wait=1", data=orjson.dumps(warm_body(context)),
                         headers=headers(key)) as r:
        assert r.status == 200, await r.text()
        prefix: str = (await r.json())["prefix"]
        return prefix


async def status(http: aiohttp.ClientSession, proxy: ProxyHandle, **hdrs: str) -> tuple[int, dict[str, Any], str]:
    async with http.get(proxy.url + "/status.json", headers=hdrs) as r:
        text = await r.text()
        return r.status, orjson.loads(text), text


def rows(data: dict[str, Any]) -> set[str]:
    return {row["prefix"] for row in data["registry"]}


async def test_each_view_of_status_json_shows_only_what_it_may(sim: SimHandle, http: aiohttp.ClientSession) -> None:
    async with run_proxy(sim.url) as proxy:
        a = await prewarm(http, proxy, KEY_A, CONTEXT + "tenant a")
        b = await prewarm(http, proxy, KEY_B, CONTEXT + "tenant b")
        code, data, raw = await status(http, proxy, **{"x-api-key": KEY_A})
        assert code == 200 and data["view"] == "tenant" and rows(data) == {a}
        assert b not in raw
        code, data, raw = await status(http, proxy, authorization=f"Bearer {KEY_B}")  # the bearer form
        assert code == 200 and data["view"] == "tenant" and rows(data) == {b}
        assert a not in raw
        code, data, raw = await status(http, proxy)
        assert code == 200 and data["view"] == "aggregate" and data["registry"] == []
        assert data["registry_size"] == 2 and data["outcomes"]["prewarm-sent"] == 2  # counts stay
        assert a not in raw and b not in raw
        for text in (KEY_A, KEY_B, tenant_digest(KEY_A)[:16], tenant_digest(KEY_B)[:16]):
            assert text not in raw


async def test_with_an_admin_token_the_admin_sees_all_a_tenant_its_own_anyone_else_401(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    async with run_proxy(sim.url, admin_token="adm-xyz") as proxy:
        a = await prewarm(http, proxy, KEY_A, CONTEXT + "a")
        b = await prewarm(http, proxy, KEY_B, CONTEXT + "b")
        code, data, _ = await status(http, proxy, authorization="Bearer adm-xyz")
        assert (code, data["view"], rows(data)) == (200, "admin", {a, b})
        code, data, _ = await status(http, proxy, **{"x-api-key": KEY_B})
        assert (code, data["view"], rows(data)) == (200, "tenant", {b})
        for hdrs in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Bearer {KEY_A}"}):
            code, data, _ = await status(http, proxy, **hdrs)
            assert code == 401 and data["error"]["type"] == "authentication_error"


def docker_bind_host() -> str:
    entry = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("ENTRYPOINT"))
    args = orjson.loads(entry.removeprefix("ENTRYPOINT").strip())
    return str(args[args.index("--host") + 1])


async def test_bound_like_the_docker_image_without_an_admin_token_status_shows_counts_only(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    host = docker_bind_host()
    assert host == "0.0.0.0"
    async with run_proxy(sim.url, host=host) as proxy:  # the view follows the configured bind address
        a = await prewarm(http, proxy, KEY_A, CONTEXT + "docker")
        for hdrs in ({}, {"x-api-key": KEY_A}, {"authorization": f"Bearer {KEY_A}"}):
            code, data, raw = await status(http, proxy, **hdrs)
            assert code == 200 and data["view"] == "aggregate" and data["registry"] == []
            assert data["registry_size"] == 1 and a not in raw
        async with http.get(proxy.url + "/status") as r:
            assert r.status == 200 and "rows are shown to the admin token" in await r.text()
    async with run_proxy(sim.url, host=host, admin_token="adm-1") as proxy:
        a = await prewarm(http, proxy, KEY_A, CONTEXT + "docker")
        code, data, _ = await status(http, proxy, authorization="Bearer adm-1")
        assert (code, data["view"], rows(data)) == (200, "admin", {a})


@pytest.mark.parametrize("stream", [False, True])
async def test_in_injection_mode_every_client_token_is_one_tenant(
    sim: SimHandle, http: aiohttp.ClientSession, stream: bool
) -> None:
    upstream_key = "sk-ant-shared-upstream-0042"
    async with run_proxy(sim.url, upstream_api_key=upstream_key, client_tokens="token-a,token-b") as proxy:
        prefix = await prewarm(http, proxy, "token-a", CONTEXT)
        # Token B asks on token A's warm: the upstream cache is the shared key's, so it is a hit, and it is read.
        async with http.post(proxy.url + "/v1/messages", data=orjson.dumps(question_body(stream=stream)),
                             headers=headers("token-b")) as r:
            assert r.status == 200
            assert (r.headers["X-Cache-Warm"], r.headers["X-Cache-Warm-Prefix"]) == ("hit", prefix)
            text = await r.text()
        read = re.search(r'"cache_read_input_tokens":\s*(\d+)', text)
        assert read is not None and int(read.group(1)) > 0
        async with http.get(proxy.url + f"/prewarm/{prefix}", headers=headers("token-b")) as r:
            assert r.status == 200 and (await r.json())["state"] == "warm"
        async with http.get(proxy.url + "/status.json", headers=headers("token-b")) as r:
            assert {row["prefix"] for row in (await r.json())["registry"]} == {prefix}
    stats = await sim.stats()
    assert set(stats["by_tenant"]) == {sim_digest(upstream_key)[:16]}  # one upstream credential
    assert stats["cache_writes"] == 1 and stats["cache_reads"] == 1  # written once, by A's warm; read by B


async def test_in_pass_through_mode_another_key_never_sees_or_reads_a_warm(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    async with run_proxy(sim.url) as proxy:
        prefix = await prewarm(http, proxy, KEY_A, CONTEXT)
        async with http.get(proxy.url + f"/prewarm/{prefix}", headers=headers(KEY_B)) as r:
            assert r.status == 404
        async with http.post(proxy.url + "/v1/messages", data=orjson.dumps(question_body()),
                             headers=headers(KEY_B)) as r:
            assert r.status == 200 and r.headers["X-Cache-Warm"] == "miss"
            assert (await r.json())["usage"]["cache_read_input_tokens"] == 0
