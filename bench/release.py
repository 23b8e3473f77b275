"""Release lag: how long after a warm's response do the requests held on it reach the upstream?

Per trial: a /prewarm carries ``x-sim-gate`` (the proxy forwards it on the warm), so the warm waits
at the simulator's gate while N questions with the same prefix pile up in the proxy; once
``GET /healthz`` shows all N held, the gate opens. The lag of each held request is its ``received_at``
in the simulator's request log minus the warm's ``response_started_at`` there (both
``time.monotonic()`` of the simulator, at time scale 0): it spans the warm's response crossing to the
proxy, the proxy settling the warm, waking the holders and forwarding each one, and the
simulator's own event loop reaching each request (it stamps ``received_at`` only when it starts the
handler, one request after another).

That last part is not the proxy's, so the same N requests are also fired straight at the simulator
on already-open connections (``direct_burst``: ``received_at`` minus the send time), the floor
this harness can see.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Final

import aiohttp

from bench.common import (
    Servers,
    Target,
    client_session,
    context_text,
    dumps,
    get_json,
    headers,
    question_body,
    release_gate,
    summary,
    table,
    warm_body,
)

CONTEXT_BYTES: Final = 9_000  # ~2,250 tokens: above claude-sonnet-4-6's 2,048-token minimum
TARGET_P99_MS: Final = 5.0


async def _until(check: Any, timeout: float = 60.0, every: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(every)


async def _ask(session: aiohttp.ClientSession, url: str, body: bytes, hdrs: dict[str, str]) -> str:
    async with session.post(url + "/v1/messages", data=body, headers=hdrs) as resp:
        await resp.read()
        return resp.headers.get("X-Cache-Warm", f"http-{resp.status}") if resp.status == 200 else f"http-{resp.status}"


async def _trial(session: aiohttp.ClientSession, proxy: str, sim: str, n: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:12]
    gate = f"release-{tag}"
    context = f"trial {tag}\n" + context_text(CONTEXT_BYTES, seed=n)
    await get_json(session, sim + "/_sim/reset", "POST")
    async with session.post(proxy + "/prewarm", data=dumps(warm_body(context)),
                            headers=headers(x_sim_gate=gate)) as resp:
        if resp.status != 202:
            raise RuntimeError(f"/prewarm answered {resp.status}: {await resp.text()}")

    async def warm_at_gate() -> bool:
        return int((await get_json(session, sim + "/_sim/gates")).get(gate, 0)) >= 1

    await _until(warm_at_gate)
    body = dumps(question_body(context, "What does pagerStep7 return?", max_tokens=16))
    hdrs = headers(x_sim_reply_tokens="1")
    tasks = [asyncio.ensure_future(_ask(session, proxy, body, hdrs)) for _ in range(n)]
    held_seen = 0

    async def all_held() -> bool:
        nonlocal held_seen
        held_seen = int((await get_json(session, proxy + "/healthz"))["held"])
        return held_seen >= n

    await _until(all_held)
    outcomes, log, started = await release_gate(session, sim, gate, tasks)
    held = [e for e in log if e["path"] == "/v1/messages" and e.get("gate") is None]
    return {
        "n": n,
        "held_seen": held_seen,
        "forwarded": len(held),
        "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "lags_ms": sorted((e["received_at"] - started) * 1000 for e in held),
    }


async def _direct_burst(session: aiohttp.ClientSession, sim: str, n: int) -> list[float]:
    """N requests at once straight to the simulator: received_at minus the send time (ms)."""
    context = context_text(CONTEXT_BYTES, seed=n + 1)
    body = dumps(question_body(context, "What does pagerStep7 return?", max_tokens=16))
    hdrs = headers(x_sim_reply_tokens="1")
    await asyncio.gather(*(_ask(session, sim, body, hdrs) for _ in range(n)))  # opens n connections
    await get_json(session, sim + "/_sim/reset", "POST")
    t0 = time.monotonic()
    await asyncio.gather(*(_ask(session, sim, body, hdrs) for _ in range(n)))
    log = await get_json(session, sim + "/_sim/requests")
    return sorted((e["received_at"] - t0) * 1000 for e in log if e["path"] == "/v1/messages")


async def run(quick: bool = False) -> dict[str, Any]:
    """Run the scenario; return its JSON document."""
    plan = {1: 1, 10: 1, 50: 1} if quick else {1: 10, 100: 5, 1000: 3}
    results: dict[str, Any] = {}
    with Servers() as servers:
        sim = servers.sim(time_scale=0.0, max_logged_requests=20_000)
        proxy = servers.proxy(sim.url, max_hold=120.0, max_held_total=100_000, max_held_per_tenant=100_000,
                              upstream_max_connections=0)
        async with client_session(limit=0) as session:
            if not quick:  # untimed: opens the proxy's upstream pool as wide as the largest trial
                await _trial(session, proxy.url, sim.url, max(plan))
            for n, trials in plan.items():
                runs = [await _trial(session, proxy.url, sim.url, n) for _ in range(trials)]
                lags = [lag for r in runs for lag in r["lags_ms"]]
                burst = await _direct_burst(session, sim.url, n)
                results[str(n)] = {
                    "trials": trials,
                    "held_seen": [r["held_seen"] for r in runs],
                    "forwarded": [r["forwarded"] for r in runs],
                    "outcomes": _merge([r["outcomes"] for r in runs]),
                    "lag_ms": summary(lags),
                    "lag_max_ms": round(max(lags), 4) if lags else None,
                    "direct_burst_ms": summary(burst),
                }
    biggest = str(max(plan))
    targets = [Target(f"release lag p99 with {biggest} held", results[biggest]["lag_ms"]["p99"], TARGET_P99_MS,
                      "ms", note=f"simulator floor for {biggest} at once: p99 "
                                 f"{results[biggest]['direct_burst_ms']['p99']:.2f} ms")]
    return {
        "scenario": "release",
        "quick": quick,
        "method": ("lag = simulator received_at of each held request - simulator response_started_at of the warm "
                   "(same monotonic clock); direct_burst = the same number of requests sent at once straight to "
                   "the simulator on open connections, received_at - send time"),
        "results": results,
        "targets": [t.as_json() for t in targets],
        "_targets": targets,
    }


def _merge(dicts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def render(result: dict[str, Any]) -> str:
    rows = []
    for n, r in result["results"].items():
        rows.append([n, r["trials"], min(r["held_seen"]), sum(r["forwarded"]), r["lag_ms"]["p50"], r["lag_ms"]["p99"],
                     r["lag_max_ms"], r["direct_burst_ms"]["p50"], r["direct_burst_ms"]["p99"],
                     ",".join(f"{k}={v}" for k, v in r["outcomes"].items())])
    return table(rows, ["held", "trials", "held seen", "forwarded", "lag p50 ms", "lag p99 ms", "lag max ms",
                        "sim floor p50", "sim floor p99", "outcomes"])
