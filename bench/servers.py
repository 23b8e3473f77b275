"""Runner for the processes under measurement: ``python -m bench.servers sim|proxy|hop [options]``.

Each benchmark server runs in its own process, started by :mod:`bench.common`, and prints
``<banner> listening on <url>`` on stdout once it accepts connections (port 0 picks a free port).

- ``sim``: the simulator with profile overrides, plus one bench-only control route,
  ``GET /_sim/bench/drain?older_than=S``, which hands over and forgets the request-log entries
  older than ``S`` seconds (the soak reads the log as it goes instead of keeping it all);
- ``proxy``: specproxy itself, built as ``specproxy serve`` builds it but from explicit settings only
  (no config file, no ``SPECPROXY_*`` environment), with ``--cprofile FILE`` to profile it, and
  ``--tracemalloc FILE`` to write its largest live allocations to FILE on SIGUSR1;
- ``hop``: the minimal pass-through hop of :mod:`bench.hop`.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import linecache
import os
import resource
import signal
import sysconfig
import time
import tracemalloc
from typing import Any

from aiohttp import web

DRAIN_FIELDS = ("method", "path", "sha256", "size", "received_at", "response_started_at", "status",
                "request_id", "max_tokens", "stream", "gate", "fault", "usage", "tenant")


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one (1,000 held requests need ~3,000 sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _trace_allocations(path: str) -> None:
    """Trace allocations from now on; on SIGUSR1 write the largest live ones (by line and by stack) to ``path``."""
    tracemalloc.start(8)

    # File names relative to where they were installed from: a report names no path of this machine.
    roots = sorted({sysconfig.get_paths()[k] + os.sep for k in ("purelib", "platlib", "stdlib")}
                   | {os.getcwd() + os.sep}, key=len, reverse=True)

    def where(frame: tracemalloc.Frame) -> str:
        name = next((frame.filename[len(r):] for r in roots if frame.filename.startswith(r)), frame.filename)
        return f"{name}:{frame.lineno}"

    def dump(*_: object) -> None:
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        total = sum(s.size for s in snapshot.statistics("filename"))
        lines = [f"live traced memory: {total / 1e6:.1f} MB", "", "largest by line:"]
        lines += [f"  {s.size / 1e6:8.2f} MB  {s.count:8d} blocks  {where(s.traceback[0])}"
                  for s in snapshot.statistics("lineno")[:25]]
        lines += ["", "largest by stack (innermost first):"]
        for s in snapshot.statistics("traceback")[:8]:
            lines.append(f"  {s.size / 1e6:8.2f} MB  {s.count:8d} blocks")
            for frame in list(s.traceback)[::-1][:8]:
                code = linecache.getline(frame.filename, frame.lineno).strip()
                lines.append(f"      {where(frame)}  {code}")
        with open(path + ".tmp", "w") as fh:
            fh.write("\n".join(lines) + "\n")
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR1, dump)


def _sim_app(args: argparse.Namespace) -> web.Application:
    from specproxy.sim import SIM_STATE, SimProfile, create_sim_app

    overrides: dict[str, Any] = {"time_scale": args.time_scale, **json.loads(args.profile)}
    app = create_sim_app(dataclasses.replace(SimProfile(), **overrides))
    state = app[SIM_STATE]

    async def drain(request: web.Request) -> web.Response:
        cutoff = time.monotonic() - float(request.query.get("older_than", "0"))
        out = []
        log = state.log
        while log and log[0]["received_at"] <= cutoff:
            entry = log.popleft()
            out.append({k: entry.get(k) for k in DRAIN_FIELDS})
        return web.json_response(out)

    app.router.add_get("/_sim/bench/drain", drain)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    parser.add_argument("kind", choices=("sim", "proxy", "hop"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", default="")
    parser.add_argument("--time-scale", dest="time_scale", type=float, default=0.0)
    parser.add_argument("--profile", default="{}", help="sim: JSON object of SimProfile overrides")
    parser.add_argument("--settings", default="{}", help="proxy: JSON object of settings")
    parser.add_argument("--cprofile", default=None, help="write cProfile stats of the whole run to this file")
    parser.add_argument("--tracemalloc", default=None, help="on SIGUSR1, write the largest live allocations here")
    args = parser.parse_args(argv)
    raise_nofile()
    if args.tracemalloc:
        _trace_allocations(args.tracemalloc)

    from specproxy.serving import serve_forever

    profiler = cProfile.Profile() if args.cprofile else None
    if profiler is not None:
        profiler.enable()
    try:
        if args.kind == "sim":
            serve_forever(lambda: _sim_app(args), args.host, args.port, banner="sim")
        elif args.kind == "hop":
            from bench.hop import create_hop_app

            serve_forever(lambda: create_hop_app(args.upstream), args.host, args.port, banner="hop")
        else:
            from specproxy import logs
            from specproxy.app import create_app
            from specproxy.config import load_settings

            overrides = {"upstream": args.upstream, "host": args.host, "port": args.port,
                         **json.loads(args.settings)}
            settings = load_settings(None, env={}, overrides=overrides, read_default_file=False)
            logs.configure(settings.log_level, settings.log_format)
            serve_forever(lambda: create_app(settings), settings.host, settings.port, banner="specproxy")
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.cprofile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
