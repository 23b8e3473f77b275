"""Speculation benchmarks on the calibrated simulator: what coalescing, next-turn and keep-warm buy.

    python -m bench.speculation [--time-scale 0.05] [--out bench/results]

Runs the simulator and the proxy in-process (these figures are the simulator's calibrated
latencies, not the proxy's own cost) at a time scale, and reports times scaled back to real
seconds, with dollars from the pricing table in specproxy/metrics.py.
- Fan-out: N = 10 parallel cold requests over one ~150k-token prefix, with and without coalescing,
  streaming and non-streaming: cache writes and reads, dollars, mean TTFT and the time to the last.
- Fan-out behind a warm system prompt: N = 5 parallel questions on a new ~10k-token document after
  the system prompt was prewarmed: writes 2 (the system prompt, the document once), not N + 1.
- Next turn: turn 2's TTFT after a long reply, with and without the next-turn warm.
- Keep-warm: a prefix kept warm for a simulated hour: re-warms, their cost, against the rewrites
  (and their TTFT) it avoids for a user who comes back after the TTL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from specproxy.metrics import cost
from specproxy.testing import run_proxy, run_sim
from specproxy.usage import Usage

MODEL = "claude-sonnet-4-6"
KEY = "sk-ant-bench-speculation"
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
# ~600 KB of text: ~150k tokens by the simulator's approximation (4 characters a token), the cookbook's size.
CONTEXT = "".join(f"def f_{i}(x):\n    return x * {i} + {i % 97}  # line {i}\n" for i in range(15_000))[:600_000]


def question(q: str, *, stream: bool, context: str = CONTEXT, max_tokens: int = 64) -> dict[str, Any]:
    return {
        "model": MODEL, "max_tokens": max_tokens, "stream": stream,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": context, "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": q}]}],
    }


async def timed(http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                **hdrs: str) -> tuple[float, float, dict[str, Any], dict[str, str]]:
    """(TTFT, total, usage, response headers); TTFT is the first body byte of a stream, else the total."""
    start = time.perf_counter()
    async with http.post(url + "/v1/messages", data=orjson.dumps(body), headers={**HEADERS, **hdrs}) as r:
        first = None
        chunks = []
        async for chunk in r.content.iter_any():
            first = first or time.perf_counter()
            chunks.append(chunk)
        end = time.perf_counter()
        raw = b"".join(chunks)
        if body.get("stream"):
            line = next(x for x in raw.split(b"\n") if x.startswith(b"data:") and b"message_start" in x)
            usage = orjson.loads(line[5:])["message"]["usage"]
            ttft = (first or end) - start
        else:
            usage = orjson.loads(raw)["usage"]
            ttft = end - start
        return ttft, end - start, usage, dict(r.headers)


def dollars(usages: list[dict[str, Any]]) -> float:
    return sum(cost(Usage.from_api(u), MODEL)[0] for u in usages)


def _variant(stream: bool, coalesce: bool) -> str:
    return f"{'stream' if stream else 'json'}_{'coalesce' if coalesce else 'off'}"


def _fan_result(stats: dict[str, Any], results: list[tuple[float, float, dict[str, Any], dict[str, str]]],
                wall: float, scale: float) -> dict[str, Any]:
    """One fan-out variant's figures: the simulator's counters, dollars, times scaled back, outcomes."""
    return {
        "cache_writes": stats["cache_writes"],
        "cache_reads": stats["cache_reads"],
        "tokens_written": sum(u["cache_creation_input_tokens"] for _, _, u, _ in results),
        "dollars": round(dollars([u for _, _, u, _ in results]), 4),
        "mean_ttft_s": round(statistics.mean(t for t, _, _, _ in results) / scale, 2),
        "last_done_s": round(wall / scale, 2),
        "outcomes": sorted(h["X-Cache-Warm"] for _, _, _, h in results),
    }


async def fan_out(scale: float, n: int = 10) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stream in (True, False):
        for coalesce in (True, False):
            async with run_sim(time_scale=scale) as sim, run_proxy(sim.url, coalesce=coalesce) as proxy, \
                    aiohttp.ClientSession() as http:
                start = time.perf_counter()
                results = await asyncio.gather(*(timed(http, proxy.url, question(f"q{i}", stream=stream))
                                                 for i in range(n)))
                wall = time.perf_counter() - start
                stats = await sim.stats()
            out[_variant(stream, coalesce)] = _fan_result(stats, results, wall, scale)
    return out


SYSTEM = "".join(f"Rule {i}: cite the clause number of every fact you use.\n" for i in range(600))  # ~8k tokens
DOCUMENT = "".join(f"Clause {i}. The party of part {i % 13} shall deliver item {i}.\n" for i in range(700))  # ~10k


def doc_question(q: str, *, stream: bool) -> dict[str, Any]:
    """A system prompt that is already warm, then a new ~10k-token document, then the question."""
    return {
        "model": MODEL, "max_tokens": 64, "stream": stream,
        "system": [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": DOCUMENT, "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": q}]}],
    }


async def fan_out_behind_warm_system(scale: float, n: int = 5) -> dict[str, Any]:
    """N parallel questions on a new document behind a prewarmed system prompt: the document should be
    written once (2 writes in all, the system prompt's included), not N times."""
    out: dict[str, Any] = {}
    for stream in (True, False):
        for coalesce in (True, False):
            async with run_sim(time_scale=scale) as sim, run_proxy(sim.url, coalesce=coalesce) as proxy, \
                    aiohttp.ClientSession() as http:
                warm = {"model": MODEL, "system": doc_question("", stream=False)["system"],
                        "messages": [{"role": "user", "content": "hi"}]}
                async with http.post(proxy.url + "/prewarm?wait=1", data=orjson.dumps(warm), headers=HEADERS) as r:
                    assert (await r.json())["state"] == "warm"
                start = time.perf_counter()
                results = await asyncio.gather(*(timed(http, proxy.url, doc_question(f"q{i}", stream=stream))
                                                 for i in range(n)))
                wall = time.perf_counter() - start
                stats = await sim.stats()
            out[_variant(stream, coalesce)] = _fan_result(stats, results, wall, scale)
    return out


async def next_turn(scale: float, reply_tokens: int = 2000) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for warm_next in (False, True):
        async with run_sim(time_scale=scale) as sim, run_proxy(sim.url) as proxy, aiohttp.ClientSession() as http:
            t1 = question("Explain f_7.", stream=False, max_tokens=reply_tokens)
            hdrs = {"x-sim-reply-tokens": str(reply_tokens)}
            if warm_next:
                hdrs["x-cache-warm-next"] = "1"
            async with http.post(proxy.url + "/v1/messages", data=orjson.dumps(t1), headers={**HEADERS, **hdrs}) as r:
                reply = (await r.json())["content"]
            await asyncio.sleep(10 * scale)  # the user reads and types for 10 s
            t2 = {**t1, "stream": True, "max_tokens": 64, "messages": [
                t1["messages"][0], {"role": "assistant", "content": reply},
                {"role": "user", "content": [{"type": "text", "text": "And f_8?",
                                              "cache_control": {"type": "ephemeral"}}]}]}
            ttft, _, usage, h = await timed(http, proxy.url, t2)
            out["with_next_turn" if warm_next else "without"] = {
                "turn2_ttft_s": round(ttft / scale, 3), "cache_read": usage["cache_read_input_tokens"],
                "cache_write": usage["cache_creation_input_tokens"], "outcome": h["X-Cache-Warm"],
            }
    return out


async def keep_warm(scale: float, hours: float = 1.0) -> dict[str, Any]:
    """A user who comes back every 6 minutes for an hour: kept warm vs not."""
    gap = 360.0
    visits = int(hours * 3600 / gap)
    out: dict[str, Any] = {}
    for kept in (False, True):
        async with run_sim(time_scale=scale) as sim, run_proxy(
            sim.url, cache_ttl_scale=scale, keep_warm=kept, keep_warm_margin=30 * scale, keep_warm_idle=900 * scale
        ) as proxy, aiohttp.ClientSession() as http:
            async with http.post(proxy.url + "/prewarm?wait=1", data=orjson.dumps(question("", stream=False)),
                                 headers=HEADERS) as r:
                await r.read()
            ttfts, usages = [], []
            for i in range(visits):
                await asyncio.sleep(gap * scale)
                ttft, _, usage, _ = await timed(http, proxy.url, question(f"visit {i}", stream=True))
                ttfts.append(ttft / scale)
                usages.append(usage)
            stats = await sim.stats()
            refreshes = stats["requests"] - visits - 1
            visit_dollars = dollars(usages)
            total_dollars = dollars([e["usage"] for e in await sim.requests() if e.get("usage")])
        out["kept_warm" if kept else "not_kept"] = {
            "visits": visits,
            "rewrites": sum(1 for u in usages if u["cache_creation_input_tokens"] > 1000),
            "mean_visit_ttft_s": round(statistics.mean(ttfts), 2),
            "re_warms": refreshes,
            "dollars_visits": round(visit_dollars, 4),
            "dollars_total": round(total_dollars, 4),
            "dollars_warms": round(total_dollars - visit_dollars, 4),
        }
    return out


def table(results: dict[str, Any]) -> str:
    lines = ["", "Fan-out: 10 parallel cold requests over one ~150k-token prefix (simulated seconds)",
             f"{'variant':22} {'writes':>6} {'reads':>6} {'$':>8} {'mean TTFT':>10} {'last done':>10}"]
    for k, v in results["fan_out"].items():
        lines.append(f"{k:22} {v['cache_writes']:>6} {v['cache_reads']:>6} {v['dollars']:>8.3f} "
                     f"{v['mean_ttft_s']:>9.2f}s {v['last_done_s']:>9.2f}s")
    lines += ["", "Fan-out of 5 on a new ~10k-token document behind a warm ~8k-token system prompt "
              "(writes include the system prompt's prewarm)",
              f"{'variant':22} {'writes':>6} {'reads':>6} {'tok written':>11} {'$':>8} {'mean TTFT':>10} "
              f"{'last done':>10} outcomes"]
    for k, v in results["fan_out_behind_warm_system"].items():
        lines.append(f"{k:22} {v['cache_writes']:>6} {v['cache_reads']:>6} {v['tokens_written']:>11} "
                     f"{v['dollars']:>8.3f} {v['mean_ttft_s']:>9.2f}s {v['last_done_s']:>9.2f}s "
                     f"{','.join(v['outcomes'])}")
    lines += ["", "Next turn: turn-2 TTFT after a 2,000-token reply",
              f"{'variant':22} {'TTFT':>8} {'read':>8} {'write':>8} outcome"]
    for k, v in results["next_turn"].items():
        lines.append(f"{k:22} {v['turn2_ttft_s']:>7.3f}s {v['cache_read']:>8} {v['cache_write']:>8} {v['outcome']}")
    lines += ["", "Keep-warm: a user back every 6 minutes for an hour (5-minute TTL)",
              f"{'variant':12} {'visits':>6} {'rewrites':>8} {'re-warms':>8} {'visit TTFT':>10} "
              f"{'$ visits':>9} {'$ warms':>11} {'$ total':>8}"]
    for k, v in results["keep_warm"].items():
        lines.append(f"{k:12} {v['visits']:>6} {v['rewrites']:>8} {v['re_warms']:>8} {v['mean_visit_ttft_s']:>9.2f}s "
                     f"{v['dollars_visits']:>9.3f} {v['dollars_warms']:>11.3f} {v['dollars_total']:>8.3f}")
    return "\n".join(lines)


async def run(scale: float, quick: bool) -> dict[str, Any]:
    return {
        "time_scale": scale,
        "fan_out": await fan_out(scale, n=4 if quick else 10),
        "fan_out_behind_warm_system": await fan_out_behind_warm_system(scale, n=3 if quick else 5),
        "next_turn": await next_turn(scale),
        "keep_warm": await keep_warm(0.005 if not quick else 0.002, hours=0.2 if quick else 1.0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.speculation", description=__doc__.splitlines()[0])
    parser.add_argument("--time-scale", type=float, default=0.25)
    parser.add_argument("--quick", action="store_true", help="smaller, for smoke tests")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.time_scale, args.quick))
    print(table(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("speculation-quick.json" if args.quick else "speculation.json")).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
