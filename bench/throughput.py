"""Throughput: requests per second at 64 concurrent keep-alive connections, small non-streaming
requests (the 2 KB body with a breakpoint, a 20-token reply), direct vs specproxy vs the minimal hop.

Each variant runs a fixed duration per round, in rotated order, for several rounds; the figure per
variant is the median of its rounds. The load generator is this process (aiohttp, 64 loops each
sending one request after another); the simulator runs at time scale 0. On a 2-core machine the
load generator, the simulator and the hop or proxy share the cores, so the measured rate is bounded
by the whole machine (and moved by anything else running on it), which blurs the difference between
proxy and hop. The CPU time the proxy or hop process itself spends per request (/proc/PID/stat) does
not depend on that: ``capacity_over_hop`` = hop CPU per request / proxy CPU per request is what the
rate ratio becomes wherever the proxy, not the machine, is the bottleneck. Both are reported.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any, Final

import aiohttp

from bench.common import (
    Servers,
    Target,
    client_session,
    context_text,
    cpu_seconds,
    dumps,
    headers,
    question_body,
    rotated,
    table,
)

CONCURRENCY: Final = 64
VARIANTS: Final = ("direct", "proxy", "hop")
TARGET_RATIO: Final = 0.85


async def _load(url: str, body: bytes, hdrs: dict[str, str], seconds: float, pid: int) -> tuple[float, int, float]:
    """(completed per second, failed, CPU ms of process ``pid`` per request) over ``seconds``."""
    done = failed = 0
    async with client_session(limit=CONCURRENCY) as session:
        # Open all connections first, so the window measures steady state.
        await asyncio.gather(*(_post(session, url, body, hdrs) for _ in range(CONCURRENCY)))
        deadline = time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal done, failed
            while time.perf_counter() < deadline:
                if await _post(session, url, body, hdrs):
                    done += 1
                else:
                    failed += 1

        start = time.perf_counter()
        cpu0 = cpu_seconds(pid)
        await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
        cpu = cpu_seconds(pid) - cpu0
        elapsed = time.perf_counter() - start
    return done / elapsed, failed, cpu / max(done, 1) * 1000


async def _post(session: aiohttp.ClientSession, url: str, body: bytes, hdrs: dict[str, str]) -> bool:
    async with session.post(url + "/v1/messages", data=body, headers=hdrs) as resp:
        await resp.read()
        return resp.status == 200


async def run(quick: bool = False, seconds: float | None = None, rounds: int | None = None) -> dict[str, Any]:
    """Run the scenario; return its JSON document."""
    seconds = seconds or (0.5 if quick else 5.0)
    rounds = rounds or (1 if quick else 4)
    body = dumps(question_body(context_text(2 * 1024 - 260), "Which function returns the largest value?",
                               max_tokens=64))
    hdrs = headers(x_sim_reply_tokens="20")
    rps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    failed: dict[str, int] = dict.fromkeys(VARIANTS, 0)
    cpu_ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with Servers() as servers:
        sim = servers.sim(time_scale=0.0, max_logged_requests=100)
        proxy = servers.proxy(sim.url)
        hop = servers.hop(sim.url)
        urls = {"direct": sim.url, "proxy": proxy.url, "hop": hop.url}
        pids = {"direct": sim.pid, "proxy": proxy.pid, "hop": hop.pid}
        for v in VARIANTS:  # warm-up, untimed
            await _load(urls[v], body, hdrs, min(seconds, 1.0), pids[v])
        for r in range(rounds):
            for v in rotated(VARIANTS, r):
                rate, bad, cpu = await _load(urls[v], body, hdrs, seconds, pids[v])
                rps[v].append(round(rate, 1))
                failed[v] += bad
                cpu_ms[v].append(cpu)
    median = {v: round(statistics.median(rps[v]), 1) for v in VARIANTS}
    # Proxy and hop run next to each other in every round: the median of their per-round ratios is
    # less exposed to drift (and to other load on a shared machine) than a ratio of medians.
    ratios = [p / h for p, h in zip(rps["proxy"], rps["hop"], strict=True) if h]
    ratio = round(statistics.median(ratios), 3) if ratios else None
    cpu = {v: round(statistics.median(cpu_ms[v]), 4) for v in VARIANTS}
    capacity = round(cpu["hop"] / cpu["proxy"], 3) if cpu["proxy"] else None
    targets = [Target("throughput specproxy / minimal hop", ratio, TARGET_RATIO, "x", at_least=True,
                      note=f"{median['proxy']:.0f} vs {median['hop']:.0f} req/s; direct {median['direct']:.0f}"),
               Target("throughput per CPU (capacity) specproxy / minimal hop", capacity, TARGET_RATIO, "x",
                      at_least=True, note=f"CPU per request {cpu['proxy']:.3f} vs {cpu['hop']:.3f} ms")]
    return {
        "scenario": "throughput",
        "quick": quick,
        "method": (f"{CONCURRENCY} keep-alive connections, each sending the next request as soon as the last "
                   f"answered, {seconds} s per variant per round, {rounds} rounds in rotated order; "
                   "rps_median = median of rounds; proxy_over_hop = median of the per-round ratios; "
                   "cpu_ms_per_request = CPU time (/proc/PID/stat) of the server each variant talks to (direct: "
                   "the simulator) per request, median of rounds"),
        "concurrency": CONCURRENCY,
        "seconds_per_round": seconds,
        "rounds": rounds,
        "rps_by_round": rps,
        "rps_median": median,
        "failed": failed,
        "proxy_over_hop": ratio,
        "proxy_over_hop_by_round": [round(x, 3) for x in ratios],
        "cpu_ms_per_request": cpu,
        "capacity_over_hop": capacity,
        "proxy_over_direct": round(median["proxy"] / median["direct"], 3) if median["direct"] else None,
        "targets": [t.as_json() for t in targets],
        "_targets": targets,
    }


def render(result: dict[str, Any]) -> str:
    rows = [[v, result["rps_median"][v], " ".join(f"{x:.0f}" for x in result["rps_by_round"][v]), result["failed"][v],
             result["cpu_ms_per_request"][v]] for v in VARIANTS]
    return table(rows, ["variant", "req/s (median)", "by round", "failed", "CPU ms/request (its server)"])
