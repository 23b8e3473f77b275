"""Overhead: what a request pays for going through specproxy, against the upstream directly and
against the minimal pass-through hop (:mod:`bench.hop`), the floor for this stack.

One keep-alive connection per variant, one request at a time, simulator at time scale 0 (no
artificial latency). Bodies: 2 KB, and 600 KB (a ~150k-token prompt with a breakpoint) as ASCII and
as mixed UTF-8. Non-streaming latency, and streaming time to first byte (first body chunk) and to
last byte. Variants interleave in rounds, their order rotated each round, so machine drift hits them
equally. "Added" is a per-distribution difference: the variant's percentile minus the direct
percentile over all samples of all rounds (plus the per-round p50 difference, to show its spread).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
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
    percentile,
    question_body,
    rotated,
    summary,
    table,
)

VARIANTS: Final = ("direct", "proxy", "hop")
METRICS: Final = {"json": ("latency",), "stream": ("ttfb", "ttlb")}
TARGET_P50_MS: Final = {"2KB": 0.3, "600KB-ascii": 1.5, "600KB-utf8": 2.5}
_JSON_WRAPPING: Final = 260  # bytes of JSON around the context in question_body


@dataclass(frozen=True)
class Payload:
    name: str
    size: int
    kind: str


PAYLOADS: Final = (Payload("2KB", 2 * 1024, "ascii"), Payload("600KB-ascii", 600 * 1024, "ascii"),
                   Payload("600KB-utf8", 600 * 1024, "utf8"))


def _bodies() -> dict[tuple[str, str], bytes]:
    out = {}
    for p in PAYLOADS:
        context = context_text(p.size - _JSON_WRAPPING, p.kind, seed=len(p.name))
        for mode in METRICS:
            out[(p.name, mode)] = dumps(question_body(context, "Which function returns the largest value?",
                                                      stream=mode == "stream"))
    return out


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, hdrs: dict[str, str],
               stream: bool) -> tuple[float, float]:
    """(seconds to the first body chunk, seconds to the end) of one request; raises on a non-200."""
    t0 = time.perf_counter()
    first = 0.0
    async with session.post(url, data=body, headers=hdrs) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
        if stream:
            async for _ in resp.content.iter_any():
                if not first:
                    first = time.perf_counter() - t0
        else:
            await resp.read()
    total = time.perf_counter() - t0
    return (first or total), total


async def run(quick: bool = False, rounds: int | None = None, cprofile: str | None = None,
              baseline: str | None = None) -> dict[str, Any]:
    """Run the scenario; return its JSON document (``cprofile``: profile the proxy into that file;
    ``baseline``: another checkout of specproxy, measured as the ``baseline`` variant in the same rounds)."""
    variants = VARIANTS + (("baseline",) if baseline else ())
    rounds = rounds or (1 if quick else 5)
    per_block = {"2KB": 20 if quick else 400, "600KB-ascii": 3 if quick else 60, "600KB-utf8": 3 if quick else 60}
    warmup = 2 if quick else 20
    bodies = _bodies()
    hdrs = headers()
    samples: dict[tuple[str, str, str, str], list[float]] = {}
    round_p50: dict[tuple[str, str, str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}  # (payload, variant) -> [CPU seconds, requests]
    with Servers() as servers:
        sim = servers.sim(time_scale=0.0, max_logged_requests=100)
        proxy = servers.proxy(sim.url, cprofile=cprofile)
        hop = servers.hop(sim.url)
        urls = {"direct": sim.url, "proxy": proxy.url, "hop": hop.url}
        middle = {"direct": sim.pid, "proxy": proxy.pid, "hop": hop.pid}  # whose CPU a block is charged to
        if baseline:
            before = servers.proxy(sim.url, root=Path(baseline))
            urls["baseline"], middle["baseline"] = before.url, before.pid
        sessions = {v: client_session(limit=1) for v in variants}
        try:
            for v in variants:  # open each connection, let every process reach a steady state
                for (name, mode), body in bodies.items():
                    for _ in range(warmup if name == "2KB" else max(2, warmup // 5)):
                        await _one(sessions[v], urls[v] + "/v1/messages", body, hdrs, mode == "stream")
            for r in range(rounds):
                for p in PAYLOADS:
                    for mode in METRICS:
                        for v in rotated(variants, r):
                            firsts, totals = [], []
                            cpu0 = cpu_seconds(middle[v])
                            for _ in range(per_block[p.name]):
                                first, total = await _one(sessions[v], urls[v] + "/v1/messages",
                                                          bodies[(p.name, mode)], hdrs, mode == "stream")
                                firsts.append(first * 1000)
                                totals.append(total * 1000)
                            used = cpu.setdefault((p.name, v), [0.0, 0])
                            used[0] += cpu_seconds(middle[v]) - cpu0
                            used[1] += per_block[p.name]
                            got = {"latency": totals} if mode == "json" else {"ttfb": firsts, "ttlb": totals}
                            for metric, values in got.items():
                                samples.setdefault((p.name, mode, metric, v), []).extend(values)
                                round_p50.setdefault((p.name, mode, metric, v), []).append(percentile(values, 50))
        finally:
            for s in sessions.values():
                await s.close()
    cpu_ms = {p.name: {v: round(cpu[(p.name, v)][0] / cpu[(p.name, v)][1] * 1000, 4) for v in variants}
              for p in PAYLOADS}
    return _report(samples, round_p50, rounds, per_block, quick, cpu_ms, variants)


def _report(samples: dict[tuple[str, str, str, str], list[float]], round_p50: dict[tuple[str, str, str, str],
            list[float]], rounds: int, per_block: dict[str, int], quick: bool,
            cpu_ms: dict[str, dict[str, float]], variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    cases: dict[str, Any] = {}
    for p in PAYLOADS:
        for mode, metrics in METRICS.items():
            for metric in metrics:
                key = f"{p.name}/{mode}/{metric}"
                direct = samples[(p.name, mode, metric, "direct")]
                case: dict[str, Any] = {"ms": {}, "added_ms": {}, "added_p50_by_round_ms": {}, "cdf_ms": {}}
                for v in variants:
                    values = samples[(p.name, mode, metric, v)]
                    case["ms"][v] = summary(values)
                    case["cdf_ms"][v] = [round(percentile(values, q), 4) for q in range(1, 100)]
                    if v == "direct":
                        continue
                    case["added_ms"][v] = {f"p{q}": round(percentile(values, q) - percentile(direct, q), 4)
                                           for q in (50, 90, 99)}
                    case["added_p50_by_round_ms"][v] = [
                        round(a - b, 4) for a, b in zip(round_p50[(p.name, mode, metric, v)],
                                                        round_p50[(p.name, mode, metric, "direct")], strict=True)]
                cases[key] = case
    targets = []
    for p in PAYLOADS:
        worst_key, worst = "", float("-inf")
        for mode, metrics in METRICS.items():
            for metric in metrics:
                key = f"{p.name}/{mode}/{metric}"
                value = cases[key]["added_ms"]["proxy"]["p50"]
                if value > worst:
                    worst_key, worst = key, value
        targets.append(Target(f"overhead added p50 at {p.name}", round(worst, 4), TARGET_P50_MS[p.name], "ms",
                              note=f"worst of latency/TTFB/TTLB: {worst_key}; hop floor "
                                   f"{cases[worst_key]['added_ms']['hop']['p50']:.3f} ms"))
    return {
        "scenario": "overhead",
        "quick": quick,
        "method": ("sequential requests on one keep-alive aiohttp connection per variant; simulator at time scale 0; "
                   "variants interleaved in rounds with rotated order; added_ms = percentile(variant) - "
                   "percentile(direct) over all samples (per-distribution difference); added_p50_by_round_ms = "
                   "per-round p50 difference; cpu_ms_per_request = CPU time (/proc/PID/stat) of the server each "
                   "variant talks to (direct: the simulator; proxy, hop: the proxy or hop process alone), per "
                   "request, JSON and streaming together: unlike latency, unaffected by other load on the machine"),
        "rounds": rounds,
        "requests_per_block": per_block,
        "cases": cases,
        "cpu_ms_per_request": cpu_ms,
        "targets": [t.as_json() for t in targets],
        "_targets": targets,
    }


def render(result: dict[str, Any]) -> str:
    rows = []
    for key, case in result["cases"].items():
        d, pr, hp = case["ms"]["direct"], case["added_ms"]["proxy"], case["added_ms"]["hop"]
        rows.append([key, d["p50"], pr["p50"], pr["p90"], pr["p99"], hp["p50"], hp["p90"], hp["p99"], d["n"]])
    text = table(rows, ["case", "direct p50", "+proxy p50", "+proxy p90", "+proxy p99", "+hop p50", "+hop p90",
                        "+hop p99", "n/variant"])
    cpu = result["cpu_ms_per_request"]
    rows = [[name, c["direct"], c["hop"], c["proxy"], round(c["proxy"] - c["hop"], 4),
             round(c["hop"] / c["proxy"], 3)] for name, c in cpu.items()]
    text += "\n\n" + table(rows, ["CPU ms per request", "simulator", "hop process", "proxy process", "proxy - hop",
                                  "hop/proxy (per-CPU throughput)"])
    if "baseline" in next(iter(cpu.values())):  # --baseline: the other checkout, in the same rounds
        rows = [[key, case["added_ms"]["baseline"]["p50"], case["added_ms"]["proxy"]["p50"]]
                for key, case in result["cases"].items()]
        text += "\n\n" + table(rows, ["baseline vs this checkout", "+baseline p50", "+proxy p50"])
        rows = [[name, c["baseline"], c["proxy"], round(c["baseline"] - c["hop"], 4), round(c["proxy"] - c["hop"], 4),
                 round(c["hop"] / c["baseline"], 3), round(c["hop"] / c["proxy"], 3)] for name, c in cpu.items()]
        text += "\n\n" + table(rows, ["CPU ms per request", "baseline", "proxy", "baseline - hop", "proxy - hop",
                                      "hop/baseline", "hop/proxy"])
    return text
