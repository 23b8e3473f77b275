"""Calibrate the simulator against the prompt-caching cookbook's measured time to first token.

The cookbook loaded ~150k tokens of SQLite source and measured TTFT 20.87 s without a cache and
1.94 s after a speculative pre-warm. This script does the same through the official SDK against
an in-process simulator (default profile, or ``--config FILE``): one cold streamed request, then a
``max_tokens: 0`` warm and a streamed request that reads it. Times are measured at ``--time-scale``
(default 0.05, a couple of seconds in all) and scaled back up by ``1 / time_scale``; the fixed
HTTP and JSON cost of a 600 KB request, measured first at time scale 0, is subtracted before
scaling so that it is not magnified twenty times.

    python bench/sim_calibration.py [--time-scale 0.05] [--config FILE]
    python -m bench.sim_calibration
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from typing import Any, Final

import anthropic

from specproxy.sim import SimProfile, load_profile
from specproxy.testing import run_sim

PUBLISHED_UNCACHED_S: Final = 20.87
PUBLISHED_CACHED_S: Final = 1.94
CONTEXT_TOKENS: Final = 150_000
MODEL: Final = "claude-sonnet-4-6"
QUESTION: Final = "Explain how the pager decides when to spill dirty pages to disk."
TOLERANCE: Final = 0.10


def build_context(tokens: int) -> str:
    """A deterministic C-like source text of about ``tokens`` tokens (4 characters each)."""
    lines: list[str] = []
    size = 0
    i = 0
    while size < tokens * 4:
        line = f"static int sqlite3PagerStep{i:06d}(Pager *p, int n) {{ return p->nRef * {i % 97} + n; }}\n"
        lines.append(line)
        size += len(line)
        i += 1
    return "".join(lines)[: tokens * 4]


def request(context: str, question: str) -> dict[str, Any]:
    """The cookbook's shape: the context as a cached system block, then the question."""
    return {
        "model": MODEL,
        "system": [{"type": "text", "text": context, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": question}],
    }


async def ttft(client: anthropic.AsyncAnthropic, body: dict[str, Any]) -> float:
    """Seconds from sending a streamed request to its first text delta."""
    start = time.perf_counter()
    async with client.messages.stream(max_tokens=1024, **body) as stream:
        async for _ in stream.text_stream:
            return time.perf_counter() - start
    raise RuntimeError("the stream carried no text")


async def measure(profile: SimProfile, context: str) -> tuple[float, float]:
    """(uncached TTFT, cached TTFT after a max_tokens=0 warm), in real seconds."""
    async with run_sim(profile) as sim:
        cold = anthropic.AsyncAnthropic(base_url=sim.url, api_key="calibration-cold", max_retries=0)
        warm = anthropic.AsyncAnthropic(base_url=sim.url, api_key="calibration-warm", max_retries=0)
        async with cold, warm:
            await ttft(cold, request("warm-up " * 4, "Hi"))  # connection and import costs, not measured
            uncached = await ttft(cold, request(context, QUESTION))
            prefix = request(context, "(pre-warm)")
            await warm.messages.create(max_tokens=0, **prefix)
            cached = await ttft(warm, request(context, QUESTION))
    return uncached, cached


def deviation(measured: float, published: float) -> str:
    return f"{(measured - published) / published * 100:+.1f}%"


async def run(profile: SimProfile) -> int:
    context = build_context(CONTEXT_TOKENS)
    scale = profile.time_scale
    overhead_uncached, overhead_cached = await measure(dataclasses.replace(profile, time_scale=0.0), context)
    raw_uncached, raw_cached = await measure(profile, context)
    if scale > 0:
        uncached = max(raw_uncached - overhead_uncached, 0.0) / scale
        cached = max(raw_cached - overhead_cached, 0.0) / scale
    else:
        uncached, cached = raw_uncached, raw_cached
    print(f"simulator calibration: ~{CONTEXT_TOKENS:,}-token prompt, {MODEL}, time scale {scale:g}")
    print(f"{'':16}{'published':>11}{'simulated':>11}{'deviation':>11}")
    print(f"{'TTFT uncached':16}{PUBLISHED_UNCACHED_S:>10.2f}s{uncached:>10.2f}s"
          f"{deviation(uncached, PUBLISHED_UNCACHED_S):>11}")
    print(f"{'TTFT cached':16}{PUBLISHED_CACHED_S:>10.2f}s{cached:>10.2f}s{deviation(cached, PUBLISHED_CACHED_S):>11}")
    published_gain = deviation(PUBLISHED_CACHED_S, PUBLISHED_UNCACHED_S)
    print(f"{'cached vs cold':16}{published_gain:>11}{deviation(cached, uncached):>11}")
    print(f"(measured {raw_uncached:.3f} s / {raw_cached:.3f} s; HTTP and JSON overhead at time scale 0: "
          f"{overhead_uncached:.3f} s / {overhead_cached:.3f} s, subtracted before dividing by {scale:g})")
    ok = (abs(uncached - PUBLISHED_UNCACHED_S) <= TOLERANCE * PUBLISHED_UNCACHED_S
          and abs(cached - PUBLISHED_CACHED_S) <= TOLERANCE * PUBLISHED_CACHED_S)
    print("within 10% of the published figures" if ok else "NOT within 10% of the published figures")
    return 0 if ok or scale == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--time-scale", type=float, default=0.05, help="simulator speed (default 0.05)")
    parser.add_argument("--config", default=None, help="simulator profile TOML (default: built-in profile)")
    args = parser.parse_args(argv)
    profile = load_profile(args.config, time_scale=args.time_scale)
    return asyncio.run(run(profile))


if __name__ == "__main__":
    sys.exit(main())
