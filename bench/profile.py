"""Where the proxy spends its time under a benchmark's load: ``python -m bench.profile LOAD [--seconds N]``.

Loads: ``throughput`` (64 connections of 2 KB requests), ``2KB``, ``600KB-ascii``, ``600KB-utf8``
(one request at a time, non-streaming), ``release`` (1,000 held on one warm, repeatedly). The
proxy runs in its own process in front of the simulator (time scale 0) and is sampled by py-spy
(``pip install py-spy``; samples taken while the proxy is busy, idle waits excluded), or, without
py-spy, by cProfile inside the proxy (slower, so its percentages are rougher). Prints the busy share
of wall time and the hot spots: self time by function, inclusive time by function and by file.
``memory`` instead runs the soak's mixed traffic with the proxy under tracemalloc and prints its
largest live allocations at the end (what an RSS that keeps growing is made of).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import Servers, client_session, context_text, dumps, headers, question_body, raise_nofile

LOADS = ("throughput", "2KB", "600KB-ascii", "600KB-utf8", "release")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


def _body(load: str) -> bytes:
    size, kind = {"2KB": (2 * 1024, "ascii"), "throughput": (2 * 1024, "ascii"), "600KB-ascii": (600 * 1024, "ascii"),
                  "600KB-utf8": (600 * 1024, "utf8")}.get(load, (2 * 1024, "ascii"))
    return dumps(question_body(context_text(size - 260, kind), "Which function returns the largest value?",
                               max_tokens=64))


async def _drive(load: str, proxy: str, sim: str, seconds: float) -> int:
    """Send the load for ``seconds``; return how many requests were answered."""
    hdrs = headers(x_sim_reply_tokens="20")
    deadline = time.monotonic() + seconds
    done = 0
    if load == "release":
        from bench import release

        async with client_session() as session:
            while time.monotonic() < deadline:
                r = await release._trial(session, proxy, sim, 1000)
                done += r["forwarded"]
        return done
    body = _body(load)
    concurrency = 64 if load == "throughput" else 1
    async with client_session(limit=concurrency) as session:

        async def loop() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                async with session.post(proxy + "/v1/messages", data=body, headers=hdrs) as resp:
                    await resp.read()
                done += 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done


def _parse_raw(path: Path) -> tuple[int, Counter[str], Counter[str], Counter[str], Counter[str]]:
    """py-spy raw (collapsed) stacks → (samples, self by function, inclusive by function, inclusive by file,
    self by file)."""
    total = 0
    self_t: Counter[str] = Counter()
    self_files: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    files: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        self_t[frames[-1][0]] += n
        self_files[frames[-1][1]] += n
        for name in {f[0] for f in frames}:
            incl[name] += n
        for file in {f[1] for f in frames}:
            files[file] += n
    return total, self_t, incl, files, self_files


def _name(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), "?"
    file = m.group("file")
    return f"{file}:{m.group('func')}", file


def _print_top(title: str, counter: Counter[str], total: int, n: int) -> None:
    print(f"\n{title}")
    for name, count in counter.most_common(n):
        print(f"  {100 * count / total:5.1f}%  {name}")


async def _run(load: str, seconds: float, top: int) -> int:
    raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="specproxy-profile-"))
    spy = shutil.which("py-spy")
    cprof = None if spy else str(tmp / "proxy.prof")
    settings: dict[str, Any] = {"max_hold": 120.0, "max_held_total": 100_000, "max_held_per_tenant": 100_000}
    with Servers() as servers:
        sim = servers.sim(time_scale=0.0, max_logged_requests=20_000)
        proxy = servers.proxy(sim.url, cprofile=cprof, **settings)
        await _drive(load, proxy.url, sim.url, min(2.0, seconds / 4))  # warm up
        raw = tmp / "proxy.raw"
        rate = 250
        recorder = _start_spy(spy, proxy.pid, seconds, rate, raw) if spy else None
        if recorder is not None:
            await asyncio.sleep(0.5)
        started = time.monotonic()
        done = await _drive(load, proxy.url, sim.url, seconds)
        elapsed = time.monotonic() - started
        if recorder is not None:
            await asyncio.to_thread(recorder.wait)
    print(f"load {load}: {done} requests in {elapsed:.1f} s ({done / elapsed:.0f}/s)")
    if spy:
        total, self_t, incl, files, self_files = _parse_raw(raw)
        if not total:
            print("py-spy recorded no samples")
            return 1
        print(f"py-spy: {total} busy samples at {rate}/s over {int(seconds)} s: the proxy was busy "
              f"{100 * total / (rate * int(seconds)):.0f}% of wall time; percentages below are of busy samples")
        _print_top("self time by function", self_t, total, top)
        _print_top("inclusive time by function", incl, total, top)
        _print_top("inclusive time by file", files, total, top)
        _print_top("self time by file (C extensions count in their Python caller)", self_files, total, top)
    else:
        import pstats

        print("py-spy not installed: cProfile of the whole proxy run (cumulative)")
        pstats.Stats(cprof).sort_stats("tottime").print_stats(top)  # type: ignore[arg-type]
    shutil.rmtree(tmp)
    return 0


def _start_spy(spy: str, pid: int, seconds: float, rate: int, raw: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
                             "--format", "raw", "--output", str(raw), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _memory(seconds: float) -> int:
    """The soak's mixed traffic with the proxy tracing its allocations; print the largest live ones."""
    from bench import soak

    raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="specproxy-profile-"))
    path = tmp / "allocations.txt"
    result = await soak.mixed(seconds, tracemalloc=str(path))
    p = result["proxy"]
    print(f"mixed traffic {result['seconds']} s, {result['requests_sent']} requests; proxy RSS "
          f"{p['start']['rss_mb']} → {p['end_idle']['rss_mb']} MB (tracemalloc on: slower, and RSS includes "
          f"its own bookkeeping)\n")
    print(path.read_text() if path.exists() else "the proxy wrote no allocation report")
    shutil.rmtree(tmp)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("load", choices=(*LOADS, "memory"),
                        help="a load to sample CPU under, or memory: live allocations after mixed traffic")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    from specproxy.serving import install_uvloop

    install_uvloop()
    if args.load == "memory":
        return asyncio.run(_memory(args.seconds))
    return asyncio.run(_run(args.load, args.seconds, args.top))


if __name__ == "__main__":
    raise SystemExit(main())
