"""Memory: the proxy's resident set (VmRSS of /proc/PID/status) idle, with 1,000 concurrent
streaming requests, and over a mixed run (default 60 s; ``--memory-minutes 10`` for the full run).

The streams stay open because the simulator runs in real time (time scale 1) and each answer is
``STREAM_TOKENS`` tokens at 60 tokens a second in chunks of 100 tokens (about 10 s a stream). RSS is
read once every stream has its first byte, and then every half second until they end (peak
reported). The mixed run is :func:`bench.soak.mixed` on a fresh proxy; it "grew" when its RSS at the
end is more than ``GROWTH_MB`` above its baseline: the RSS once the registry can be full, i.e. after
the 5-minute cache TTL its warm entries live for (plus 30 s), or a quarter of the way in for a run
too short for that (then ``shorter_than_ttl`` is true and growth is expected: the registry is
still filling, so only a run of ~6 minutes or more says whether RSS levels off).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Final

import aiohttp

from bench import soak
from bench.common import (
    Servers,
    Target,
    client_session,
    context_text,
    dumps,
    headers,
    question_body,
    rss_mb,
    socket_fds,
    table,
)

STREAMS: Final = 1000
STREAM_TOKENS: Final = 600
GROWTH_MB: Final = 5.0
TTL_S: Final = 300.0  # warm entries live for the 5-minute cache TTL: the registry fills for that long
TARGET_IDLE_MB: Final = 60.0
TARGET_STREAMS_MB: Final = 150.0


async def _stream(session: aiohttp.ClientSession, url: str, body: bytes, hdrs: dict[str, str],
                  first: asyncio.Event, started: list[int], n: int) -> bool:
    async with session.post(url + "/v1/messages", data=body, headers=hdrs) as resp:
        head = await resp.content.readany()
        started[0] += 1
        if started[0] >= n:
            first.set()
        rest = await resp.read()
        return resp.status == 200 and b"event: message_stop" in head + rest


async def _streams(n: int, tokens: int) -> dict[str, Any]:
    with Servers() as servers:
        sim = servers.sim(time_scale=1.0, stream_chunk_tokens=100, max_logged_requests=5_000)
        proxy = servers.proxy(sim.url, upstream_max_connections=0)
        await asyncio.sleep(1.0)
        idle = {"rss_mb": round(rss_mb(proxy.pid), 1), "sockets": socket_fds(proxy.pid)}
        body = dumps(question_body(context_text(9_000), "Summarise pagerStep7.", stream=True, max_tokens=4096))
        hdrs = headers(x_sim_reply_tokens=str(tokens))
        first = asyncio.Event()
        started = [0]
        samples: list[float] = []
        sockets: list[int] = []
        async with client_session(limit=0) as session:
            t0 = time.monotonic()
            tasks = [asyncio.ensure_future(_stream(session, proxy.url, body, hdrs, first, started, n))
                     for _ in range(n)]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(first.wait(), 60)
            all_open_after = time.monotonic() - t0
            while not all(t.done() for t in tasks):
                samples.append(round(rss_mb(proxy.pid), 1))
                sockets.append(socket_fds(proxy.pid))
                await asyncio.wait(tasks, timeout=0.5)
            ok = sum(1 for t in tasks if not t.cancelled() and t.exception() is None and t.result())
        await asyncio.sleep(1.0)
        after = {"rss_mb": round(rss_mb(proxy.pid), 1), "sockets": socket_fds(proxy.pid)}
    return {
        "streams": n,
        "reply_tokens": tokens,
        "all_open_after_s": round(all_open_after, 2),
        "streams_open_together": started[0],
        "completed": ok,
        "idle": idle,
        "with_streams": {"rss_mb_first": samples[0] if samples else None, "rss_mb_peak": max(samples, default=None),
                         "sockets_peak": max(sockets, default=None), "samples": len(samples)},
        "after_streams": after,
    }


async def run(quick: bool = False, mixed_seconds: float | None = None) -> dict[str, Any]:
    """Run the scenario; return its JSON document."""
    streams = await _streams(50 if quick else STREAMS, 150 if quick else STREAM_TOKENS)
    seconds = mixed_seconds or (4.0 if quick else 60.0)
    mixed = await soak.mixed(seconds, workers=8 if quick else soak.WORKERS, sample_every=0.5 if quick else 2.0)
    series = mixed["rss_mb_series"]
    shorter_than_ttl = mixed["seconds"] < TTL_S + 60
    after_ttl = [rss for t, rss in series if t >= TTL_S + 30]
    if not shorter_than_ttl and after_ttl:
        baseline, baseline_at = after_ttl[0], f"{TTL_S + 30:.0f} s"
    elif series:
        baseline, baseline_at = series[len(series) // 4][1], f"{series[len(series) // 4][0]} s"
    else:
        baseline, baseline_at = mixed["proxy"]["start"]["rss_mb"], "start"
    end = mixed["proxy"]["end_idle"]["rss_mb"]
    mixed_summary = {
        "seconds": mixed["seconds"],
        "requests_sent": mixed["requests_sent"],
        "rss_mb_start": mixed["proxy"]["start"]["rss_mb"],
        "rss_mb_baseline": baseline,
        "baseline_at": baseline_at,
        "shorter_than_ttl": shorter_than_ttl,
        "rss_mb_peak": mixed["proxy"]["peak_rss_mb"],
        "rss_mb_end": end,
        "grew": end - baseline > GROWTH_MB,
        "growth_mb": round(end - baseline, 1),
        "rss_mb_series": series,
        "sockets_start_end": [mixed["proxy"]["start"]["sockets"], mixed["proxy"]["end_idle"]["sockets"]],
    }
    n = streams["streams"]
    targets = [
        Target("proxy RSS idle", streams["idle"]["rss_mb"], TARGET_IDLE_MB, "MB"),
        Target(f"proxy RSS with {n} concurrent streams", streams["with_streams"]["rss_mb_peak"], TARGET_STREAMS_MB,
               "MB", note=f"{streams['streams_open_together']} open together"),
    ]
    return {
        "scenario": "memory",
        "quick": quick,
        "method": ("VmRSS of the proxy process from /proc; streams: simulator at time scale 1, "
                   f"{streams['reply_tokens']}-token answers in 100-token chunks; mixed: bench.soak traffic, grew = "
                   f"end - baseline > {GROWTH_MB} MB, baseline = RSS 30 s after the 5-minute TTL (or a quarter of "
                   "the way in when the run is shorter: shorter_than_ttl)"),
        "streams": streams,
        "mixed": mixed_summary,
        "targets": [t.as_json() for t in targets],
        "_targets": targets,
    }


def render(result: dict[str, Any]) -> str:
    s, m = result["streams"], result["mixed"]
    rows = [
        ["idle (fresh proxy)", s["idle"]["rss_mb"], s["idle"]["sockets"], ""],
        [f"{s['streams']} concurrent streams (peak)", s["with_streams"]["rss_mb_peak"],
         s["with_streams"]["sockets_peak"], f"{s['streams_open_together']} open together, {s['completed']} completed"],
        ["after the streams", s["after_streams"]["rss_mb"], s["after_streams"]["sockets"], ""],
        [f"mixed run {m['seconds']} s: start / at {m['baseline_at']}", f"{m['rss_mb_start']} / {m['rss_mb_baseline']}",
         m["sockets_start_end"][0], f"{m['requests_sent']} requests"],
        ["mixed run: peak / end", f"{m['rss_mb_peak']} / {m['rss_mb_end']}", m["sockets_start_end"][1],
         f"grew: {'yes' if m['grew'] else 'no'} ({m['growth_mb']:+.1f} MB since {m['baseline_at']})"
         + ("; shorter than the 5-min TTL: registry still filling" if m["shorter_than_ttl"] else "")],
    ]
    return table(rows, ["proxy memory", "RSS MB", "sockets", "note"])
