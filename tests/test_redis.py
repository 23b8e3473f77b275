"""The Redis registry: warm state shared by replicas, against a real redis-server.

Registry-level tests first (what only replicas have: racing claims, a late or dead replica, the keys
in Redis, a stalled or absent Redis), then proxy replicas in front of one simulator: the real HTTP
path, end to end. The behaviours every backend shares, across two replicas included, are in
tests/test_registry_conformance.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
import redis.asyncio as aioredis

from specproxy.prefix import Prefix, compute, tenant_digest
from specproxy.registry import Kind, RedisRegistry, State
from specproxy.registry.shared import SharedWarm
from specproxy.testing import ProxyHandle, SimHandle, run_proxy
from tests.conftest import CONTEXT, KEY_A, KEY_B, eventually, headers, question_body, warm_body
from tests.redis_server import REDIS_SERVER, RedisServer, run_replica

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not on PATH (apt-get install redis-server); replica tests need it"
)

A = tenant_digest(KEY_A)
B = tenant_digest(KEY_B)


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    await server.start()
    yield server
    await server.close()


def registry(url: str, **overrides: Any) -> RedisRegistry:
    # A generous op_timeout: a loaded CI machine must not turn a slow answer into a (correct) degraded
    # fallback that these tests would then read as a failure. The stall test sets its own.
    opts: dict[str, Any] = {"max_entries": 1000, "warm_timeout": 30.0, "failed_ttl": 10.0, "rewarm_margin": 30.0,
                            "op_timeout": 2.0, "reconnect_max": 0.2}
    opts.update(overrides)
    return RedisRegistry(url, **opts)


@contextlib.asynccontextmanager
async def registries(url: str, n: int = 3, **overrides: Any) -> AsyncIterator[list[RedisRegistry]]:
    regs = [registry(url, **overrides) for _ in range(n)]
    try:
        for reg in regs:
            await reg.start()
        yield regs
    finally:
        for reg in regs:
            await reg.close()


def prefix(text: str = "shared context", tenant: str = A) -> Prefix:
    block = {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}
    return compute({"model": "m", "messages": [{"role": "user", "content": [block]}]}, tenant)


async def knows(reg: RedisRegistry, p: Prefix, state: State | None = None) -> bool:
    found = await reg.match(p)
    return found is not None and (state is None or found.warm.state is state)


# --- the registry across replicas ---------------------------------------------------------------------


async def test_one_of_three_replicas_wins_a_prefix_claimed_by_all_at_once(redis_server: RedisServer) -> None:
    async with registries(redis_server.url) as regs:
        results = await asyncio.gather(*(reg.begin(A, prefix()) for reg in regs))
        assert sorted(started for _, started in results) == [False, False, True]
        assert len({warm.prefix for warm, _ in results}) == 1
        assert all(not reg.degraded for reg in regs)

async def test_leaders_racing_on_three_replicas_all_go_at_once_and_the_fleet_keeps_one(
    redis_server: RedisServer,
) -> None:
    """A leader's begin never waits for Redis: three replicas leading one prefix at the same instant all
    forward (single flight is best-effort across replicas), then every mirror follows the one claim
    Redis kept, and each leader still releases the requests holding on it on its own replica."""
    async with registries(redis_server.url) as regs:
        results = await asyncio.gather(*(reg.begin(A, prefix(), kind=Kind.LEADER) for reg in regs))
        assert [started for _, started in results] == [True, True, True]
        waits = [asyncio.create_task(warm.wait(30)) for warm, _ in results]
        for _ in range(2):  # all claims in Redis, then every announcement applied everywhere
            for reg in regs:
                await reg.sync()
        kept = {m.warm.uid for reg in regs
                if (m := await reg.match(prefix())) is not None and isinstance(m.warm, SharedWarm)}
        assert len(kept) == 1 and kept <= {w.uid for w, _ in results if isinstance(w, SharedWarm)}
        for reg, (warm, _) in zip(regs, results, strict=True):
            await reg.settle(warm, State.WARM)
        assert await asyncio.gather(*waits) == [True, True, True]
        for reg in regs:
            await reg.sync()
        assert [await knows(reg, prefix(), State.WARM) for reg in regs] == [True, True, True]
        assert all(not reg.degraded for reg in regs)


async def test_a_leaders_begin_returns_while_redis_cannot_answer(redis_server: RedisServer) -> None:
    async with registries(redis_server.url, n=2, op_timeout=30.0) as (a, b):
        redis_server.pause()
        try:
            async with asyncio.timeout(5):  # a bound on a hang (a claim awaited would take 30 s), not a measurement
                leader, started = await a.begin(A, prefix(), kind=Kind.LEADER)
            assert started and await knows(a, prefix(), State.WARMING) and not a.degraded
        finally:
            redis_server.resume()
        await a.sync()
        await b.sync()
        assert await knows(b, prefix(), State.WARMING)  # shared once Redis answered
        await a.settle(leader, State.WARM)
        await b.sync()
        assert await knows(b, prefix(), State.WARM)



async def test_a_replica_started_later_learns_the_live_warms(redis_server: RedisServer) -> None:
    async with registries(redis_server.url, n=1) as (a,):
        warming, _ = await a.begin(A, prefix("in flight"))
        done, _ = await a.begin(A, prefix("done"))
        await a.settle(done, State.WARM)
        async with registries(redis_server.url, n=1) as (late,):
            assert await knows(late, prefix("in flight"), State.WARMING)
            assert await knows(late, prefix("done"), State.WARM)
            # and holds on the one still in flight until its replica settles it
            match = await late.match(prefix("in flight"))
            assert match is not None
            wait = asyncio.create_task(match.warm.wait(30))
            await a.settle(warming, State.WARM)
            assert await wait and match.warm.state is State.WARM


async def test_a_warm_whose_replica_died_unsettled_is_given_up_after_warm_timeout(redis_server: RedisServer) -> None:
    async with registries(redis_server.url, n=1, warm_timeout=0.2) as (b,):
        a = registry(redis_server.url, warm_timeout=0.2)
        await a.start()
        await a.begin(A, prefix())
        await eventually(lambda: knows(b, prefix(), State.WARMING))
        match = await b.match(prefix())
        assert match is not None
        await a.close()  # gone without settling its warm (no announcement)
        assert await match.warm.wait(30)  # warm_timeout plus a grace for clock skew: about 5 s
        assert (match.warm.state, match.warm.error) == (State.FAILED, "lost")


async def test_every_key_expires_and_names_its_tenant(redis_server: RedisServer) -> None:
    async with registries(redis_server.url, n=1) as (a,):
        for tenant in (A, B):
            warm, _ = await a.begin(tenant, prefix(tenant=tenant))
            await a.settle(warm, State.WARM)
        failed, _ = await a.begin(A, prefix("failed"))
        await a.settle(failed, State.FAILED, error="api_error")
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            keys = [k.decode() async for k in client.scan_iter(match="specproxy:*")]
            assert len(keys) == 6  # three warms: one breakpoint key and one id key each
            assert all([await client.pttl(k) > 0 for k in keys])
            assert {k.split(":")[2] for k in keys} == {"{" + A[:16] + "}", "{" + B[:16] + "}"}
        finally:
            await client.aclose()


async def test_malformed_announcements_are_ignored(redis_server: RedisServer) -> None:
    async with registries(redis_server.url, n=2) as (a, b):
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            for junk in (b"not json", b"[]", b'{"op": "t"}', b'{"u": "x", "s": "bogus", "x": []}'):
                await client.publish("specproxy:events", junk)
        finally:
            await client.aclose()
        warm, _ = await a.begin(A, prefix())
        await a.settle(warm, State.WARM)
        await eventually(lambda: knows(b, prefix(), State.WARM))
        assert not b.degraded


# --- without Redis ------------------------------------------------------------------------------------


async def test_with_redis_down_start_does_not_raise_and_the_replica_serves_alone(
    redis_server: RedisServer,
) -> None:
    await redis_server.kill()
    async with registries(redis_server.url, n=2) as (a, b):
        assert a.degraded and b.degraded
        warm, started = await a.begin(A, prefix())
        assert started
        await a.settle(warm, State.WARM)
        assert await knows(a, prefix(), State.WARM)
        assert not await knows(b, prefix())
        await redis_server.start()
        await eventually(lambda: not a.degraded and not b.degraded, timeout=20)
        # On reconnect the replica pushed the warm it made alone: the other one learns it.
        await eventually(lambda: knows(b, prefix(), State.WARM))


async def test_a_stalled_redis_costs_at_most_the_op_timeout_then_the_replica_decides_alone(
    redis_server: RedisServer,
) -> None:
    async with registries(redis_server.url, n=2, op_timeout=0.05) as (a, b):
        redis_server.pause()
        try:
            async with asyncio.timeout(5):  # a bound on a hang, not a measurement
                warm, started = await a.begin(A, prefix())
            assert started and a.degraded
            assert (await a.match(prefix())) is not None
        finally:
            redis_server.resume()
        await eventually(lambda: not a.degraded, timeout=20)
        await eventually(lambda: knows(b, prefix(), State.WARMING))
        await a.settle(warm, State.WARM)
        await eventually(lambda: knows(b, prefix(), State.WARM))


# --- three proxy replicas, one simulator ----------------------------------------------------------------


@dataclass(slots=True)
class Replica:
    proxy: ProxyHandle
    registry: RedisRegistry

    @property
    def held(self) -> int:
        return self.proxy.held

    async def until_held(self, n: int) -> None:
        await self.proxy.until_held(n)


@contextlib.asynccontextmanager
async def replicas(sim: SimHandle, url: str, n: int = 3) -> AsyncIterator[list[Replica]]:
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for _ in range(n):
            reg = registry(url)
            proxy = await stack.enter_async_context(run_replica(sim.url, reg, max_hold=20.0))
            out.append(Replica(proxy, reg))
        yield out


async def prewarm(http: aiohttp.ClientSession, replica: Replica, *, key: str = KEY_A, context: str = CONTEXT,
                  wait: bool = False, **extra: str) -> dict[str, Any]:
    url = replica.proxy.url + "/prewarm" + ("?wait=1" if wait else "")
    async with http.post(url, data=orjson.dumps(warm_body(context)), headers=headers(key, **extra)) as r:
        assert r.status == (200 if wait else 202), await r.text()
        data: dict[str, Any] = await r.json()
        return data


async def ask(http: aiohttp.ClientSession, replica: Replica, *, key: str = KEY_A, context: str = CONTEXT,
              question: str = "What does function_7 return?", stream: bool = False,
              **extra: str) -> tuple[int, str, dict[str, Any]]:
    """One question; the body of a streamed answer is its message_start message."""
    body = orjson.dumps(question_body(question, context=context, stream=stream))
    async with asyncio.timeout(15):  # never an error or a long delay: bounded, not measured
        async with http.post(replica.proxy.url + "/v1/messages", headers=headers(key, **extra), data=body) as r:
            if not stream:
                return r.status, r.headers["X-Cache-Warm"], await r.json()
            lines = (await r.text()).splitlines()
            start = next(orjson.loads(x[5:]) for x in lines if x.startswith("data:") and "message_start" in x)
            return r.status, r.headers["X-Cache-Warm"], start["message"]


async def warming_everywhere(reps: list[Replica], context: str = CONTEXT, tenant: str = A) -> None:
    """Wait until every replica's mirror knows the warm in flight (announcements are asynchronous)."""
    p = compute(warm_body(context), tenant)
    for rep in reps:
        await eventually(lambda rep=rep: knows(rep.registry, p, State.WARMING))  # type: ignore[misc]


async def test_questions_on_two_replicas_are_held_by_a_warm_in_flight_on_the_third(
    sim: SimHandle, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with replicas(sim, redis_server.url) as (a, b, c):
        warm = await prewarm(http, a, **{"x-sim-gate": "warm"})
        await warming_everywhere([b, c])
        questions = [asyncio.create_task(ask(http, rep, question=f"question {i}?"))
                     for i, rep in enumerate([b, c, b, c, a])]
        await eventually(lambda: (b.held, c.held, a.held) == (2, 2, 1))
        await sim.state.gates.wait_for_waiters("warm", 1)
        assert (await sim.stats())["requests"] == 1  # only the warm has reached the upstream
        await sim.open_gate("warm")
        answers = await asyncio.gather(*questions)
        assert [(status, outcome) for status, outcome, _ in answers] == [(200, "held")] * 5
        assert all(body["usage"]["cache_read_input_tokens"] > 0 for _, _, body in answers)
        stats = await sim.stats()
        assert (stats["cache_writes"], stats["cache_reads"]) == (1, 5)
        async with http.get(f"{c.proxy.url}/prewarm/{warm['prefix']}", headers=headers()) as r:
            assert (await r.json())["state"] == "warm"


async def test_prewarm_repeated_on_other_replicas_while_warming_sends_nothing(
    sim: SimHandle, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with replicas(sim, redis_server.url) as (a, b, c):
        first = await prewarm(http, a, **{"x-sim-gate": "warm"})
        again = [await prewarm(http, rep) for rep in (b, c, b)]
        assert first["sent"] is True
        assert [(d["sent"], d["prefix"], d["state"]) for d in again] == [(False, first["prefix"], "warming")] * 3
        await sim.open_gate("warm")
        assert (await prewarm(http, c, wait=True))["state"] == "warm"
        assert (await sim.stats())["requests"] == 1


async def test_other_tenant_on_another_replica_never_waits_on_my_warm(
    sim: SimHandle, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with replicas(sim, redis_server.url, n=2) as (a, b):
        warm = await prewarm(http, a, key=KEY_A, **{"x-sim-gate": "a"})
        await warming_everywhere([b])
        status, outcome, body = await ask(http, b, key=KEY_B)
        assert (status, outcome, b.held) == (200, "miss", 0)
        assert body["usage"]["cache_read_input_tokens"] == 0
        for key, expected in ((KEY_A, 200), (KEY_B, 404)):
            async with http.get(f"{b.proxy.url}/prewarm/{warm['prefix']}", headers=headers(key)) as r:
                assert r.status == expected
        await sim.open_gate("a")


async def test_a_warm_failing_on_one_replica_releases_the_others_with_failed(
    sim: SimHandle, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with replicas(sim, redis_server.url, n=2) as (a, b):
        await prewarm(http, a, **{"x-sim-fault": "overloaded", "x-sim-gate": "w"})
        await warming_everywhere([b])
        question = asyncio.create_task(ask(http, b))
        await b.until_held(1)
        await sim.open_gate("w")
        status, outcome, _ = await question
        assert (status, outcome) == (200, "failed")


async def test_a_cold_request_on_one_replica_leads_and_its_twin_on_another_waits_for_it(
    sim: SimHandle, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with replicas(sim, redis_server.url, n=2) as (a, b):
        leader = asyncio.create_task(ask(http, a, stream=True, **{"x-sim-gate": "lead"}))
        await warming_everywhere([b])  # a's streamed request registered itself as the prefix's leader
        follower = asyncio.create_task(ask(http, b, question="Another question?"))
        await b.until_held(1)
        await sim.open_gate("lead")
        (_, lead_outcome, _), (status, outcome, body) = await asyncio.gather(leader, follower)
        assert (lead_outcome, status, outcome) == ("miss", 200, "held")
        assert body["usage"]["cache_read_input_tokens"] > 0
        assert (await sim.stats())["cache_writes"] == 1

async def test_a_leader_goes_upstream_while_redis_cannot_answer_and_the_fleet_learns_it_after(
    sim: SimHandle, redis_server: RedisServer
) -> None:
    """A cold streamed request through the SDK leads its prefix on replica a while Redis is stopped (SIGSTOP) and
    a's op_timeout is 30 s: it reaches the upstream with no Redis round trip, since its claim is shared
    in the background; once Redis answers, replica b knows the prefix and holds its twin on it."""
    a_reg, b_reg = registry(redis_server.url, op_timeout=30.0), registry(redis_server.url)
    async with (
        run_replica(sim.url, a_reg, max_hold=20.0) as a,
        run_replica(sim.url, b_reg, max_hold=20.0) as b,
        anthropic.AsyncAnthropic(base_url=a.url, api_key=KEY_A, max_retries=0) as client,
        aiohttp.ClientSession() as http,
    ):

        async def lead() -> tuple[str, int]:
            async with client.messages.stream(**question_body(), extra_headers={"x-sim-gate": "lead"}) as stream:
                message = await stream.get_final_message()
                return stream.response.headers["X-Cache-Warm"], message.usage.cache_creation_input_tokens or 0

        redis_server.pause()
        try:
            leader = asyncio.create_task(lead())
            async with asyncio.timeout(10):  # a bound on a hang (an awaited claim would take 30 s), not a measurement
                await sim.state.gates.wait_for_waiters("lead", 1)
            assert (await sim.stats())["requests"] == 1 and not a_reg.degraded  # forwarded; Redis never answered
        finally:
            redis_server.resume()
        await a_reg.sync()
        await b_reg.sync()
        assert await knows(b_reg, compute(question_body(), A), State.WARMING)  # b heard of a's leader
        twin = asyncio.create_task(ask(http, Replica(b, b_reg), question="Another question?"))
        await b.until_held(1)
        await sim.open_gate("lead")
        outcome, written = await leader
        assert outcome == "miss" and written > 0  # it led: it wrote the cache its twin reads
        status, outcome, body = await twin
        assert (status, outcome) == (200, "held") and body["usage"]["cache_read_input_tokens"] > 0
        stats = await sim.stats()
        assert (stats["requests"], stats["cache_writes"]) == (2, 1)
        assert not a_reg.degraded and not b_reg.degraded



async def test_a_non_streaming_leader_on_one_replica_is_taken_over_by_a_warm_from_another(
    sim: SimHandle, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with replicas(sim, redis_server.url, n=2) as (a, b):
        leader = asyncio.create_task(ask(http, a, **{"x-sim-gate": "lead"}))  # a whole generation: slow
        await warming_everywhere([b])
        # b does not wait for a's generation: it warms the prefix itself (max_tokens 0), replacing the
        # leader in Redis, and holds on that warm instead.
        status, outcome, body = await ask(http, b, question="Another question?")
        assert (status, outcome) == (200, "held")
        assert body["usage"]["cache_read_input_tokens"] > 0
        zero = [e for e in await sim.requests() if e["path"] == "/v1/messages" and e["max_tokens"] == 0]
        assert len(zero) == 1
        await sim.open_gate("lead")
        assert (await leader)[:2] == (200, "miss")


async def test_redis_killed_mid_run_replicas_serve_alone_then_share_again_after_restart(
    sim: SimHandle, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with replicas(sim, redis_server.url, n=2) as (a, b):
        await prewarm(http, a, wait=True)
        await eventually(lambda: knows(b.registry, compute(warm_body(), A), State.WARM))
        assert (await ask(http, b))[:2] == (200, "hit")  # shared while Redis lives

        await redis_server.kill()
        await eventually(lambda: a.registry.degraded and b.registry.degraded)
        alone = CONTEXT + "# during the outage\n"
        assert (await prewarm(http, a, context=alone, wait=True))["state"] == "warm"
        assert (await ask(http, a, context=alone))[:2] == (200, "hit")
        assert (await ask(http, b, context=alone))[:2] == (200, "miss")  # b never heard of it
        assert (await ask(http, b))[:2] == (200, "hit")  # what b knew before the outage still serves

        await redis_server.start()  # empty: nothing was persisted
        await eventually(lambda: not a.registry.degraded and not b.registry.degraded, timeout=20)
        await eventually(lambda: knows(b.registry, compute(warm_body(alone), A), State.WARM))
        assert (await ask(http, b, context=alone))[:2] == (200, "hit")  # a pushed it on reconnect

        after = CONTEXT + "# after the restart\n"
        await prewarm(http, a, context=after, **{"x-sim-gate": "after"})
        await warming_everywhere([b], context=after)
        question = asyncio.create_task(ask(http, b, context=after))
        await b.until_held(1)
        await sim.open_gate("after")
        assert (await question)[:2] == (200, "held")


async def test_a_settle_missed_while_redis_was_down_reaches_the_holder_on_reconnect(
    sim: SimHandle, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    async with replicas(sim, redis_server.url, n=2) as (a, b):
        await prewarm(http, a, **{"x-sim-gate": "warm"})
        await warming_everywhere([b])
        question = asyncio.create_task(ask(http, b))
        await b.until_held(1)

        await redis_server.kill()
        await eventually(lambda: a.registry.degraded and b.registry.degraded)
        await sim.open_gate("warm")
        await eventually(lambda: knows(a.registry, compute(warm_body(), A), State.WARM))
        assert b.held == 1 and not question.done()  # the settle could not cross: b still holds

        await redis_server.start()
        status, outcome, body = await question
        assert (status, outcome) == (200, "held")
        assert body["usage"]["cache_read_input_tokens"] > 0
        assert (await sim.stats())["cache_writes"] == 1


async def test_settings_alone_make_a_proxy_share_warm_state_through_redis(
    sim: SimHandle, redis_server: RedisServer
) -> None:
    """`registry = "redis"` is all it takes: the app builds, starts and reports the shared registry."""
    async with (
        run_proxy(sim.url, registry="redis", redis_url=redis_server.url) as one,
        run_proxy(sim.url, registry="redis", redis_url=redis_server.url) as two,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(one.url + "/prewarm", json=warm_body(), headers=headers(**{"x-sim-gate": "w"})) as r:
            assert r.status == 202
        question = asyncio.create_task(http.post(two.url + "/v1/messages", json=question_body(), headers=headers()))
        await two.until_held(1)
        await sim.open_gate("w")
        async with await question as r:
            assert r.headers["X-Cache-Warm"] == "held"
        async with http.get(two.url + "/healthz") as r:
            health = await r.json()
        assert health["registry"] == "redis" and health["registry_degraded"] is False
        assert (await sim.stats())["cache_writes"] == 1
