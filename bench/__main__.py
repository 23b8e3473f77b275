"""``python -m bench [scenario ...] [--quick] [--out DIR]``: run the benchmarks, print a table, write JSON.

Scenarios (all by default, in this order): overhead, release, throughput, savings, memory, soak;
``engine`` (a real llama-server, see bench/engine.py) runs only when named.
Every server runs in its own process on loopback, started and stopped here; this process is the
load generator. A benchmark reports against its targets (PASS/MISS); it never fails on a number.
``specproxy bench ...`` is the same command.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Final

from bench.common import ROOT, Target, environment, raise_nofile, write_json

SCENARIOS: Final = ("overhead", "release", "throughput", "savings", "memory", "soak")
OPTIONAL: Final = ("engine",)  # run only when named: needs a built llama-server (bench/engine.py)


def _options(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of one scenario's ``run`` from the command line."""
    opts: dict[str, Any] = {"quick": args.quick}
    if name == "overhead":
        opts.update(rounds=args.rounds, cprofile=args.cprofile, baseline=args.baseline)
    elif name == "throughput":
        opts.update(rounds=args.rounds, seconds=args.seconds)
    elif name == "memory":
        opts.update(mixed_seconds=args.memory_minutes * 60 if args.memory_minutes else None)
    elif name == "soak":
        opts.update(seconds=args.minutes * 60 if args.minutes else None)
    return opts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("scenarios", nargs="*", metavar="scenario",
                        help=f"any of: {', '.join(SCENARIOS + OPTIONAL)} (default: all but {', '.join(OPTIONAL)})")
    parser.add_argument("--quick", action="store_true", help="tiny runs (seconds): a smoke test, not a measurement")
    parser.add_argument("--out", default=None, help="where JSON and PNG go (default bench/results, "
                                                    "bench/results/quick with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="overhead/throughput: interleaved rounds")
    parser.add_argument("--seconds", type=float, default=None, help="throughput: seconds per variant per round")
    parser.add_argument("--minutes", type=float, default=None, help="soak: duration in minutes (default 1)")
    parser.add_argument("--memory-minutes", dest="memory_minutes", type=float, default=None,
                        help="memory: minutes of mixed traffic (default 1; 10 for the full run)")
    parser.add_argument("--cprofile", default=None, help="overhead: write the proxy's cProfile stats to this file")
    parser.add_argument("--baseline", default=None, metavar="CHECKOUT",
                        help="overhead: also measure the specproxy of another checkout (e.g. a git worktree of an "
                             "older commit) in the same interleaved rounds, as the 'baseline' variant")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the named scenarios (all by default); 0 when every scenario ran, 1 if one crashed."""
    args = build_parser().parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS + OPTIONAL]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS + OPTIONAL)}",
              file=sys.stderr)
        return 2
    names = [s for s in SCENARIOS + OPTIONAL if s in args.scenarios] if args.scenarios else list(SCENARIOS)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / ("quick" if args.quick else "")
    raise_nofile()

    from specproxy.serving import install_uvloop

    install_uvloop()
    env = environment()
    report: list[str] = [f"specproxy benchmarks ({'quick' if args.quick else 'full'}): python {env['python']}, "
                         f"aiohttp {env['aiohttp']}, {env['loop']}, {env['cpus']} CPUs, {env['date']}"]
    print(report[0], flush=True)
    targets: list[Target] = []
    crashed: list[str] = []
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"\n== {name} ...", flush=True)
        started = time.monotonic()
        load_before = os.getloadavg()
        try:
            result = asyncio.run(module.run(**_options(name, args)))
        except Exception:
            traceback.print_exc()
            crashed.append(name)
            report.append(f"\n== {name}: CRASHED (see the traceback above)")
            continue
        scenario_targets: list[Target] = result.pop("_targets", [])
        targets += scenario_targets
        result["env"] = env
        result["seconds"] = round(time.monotonic() - started, 1)
        result["loadavg_1m"] = {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)}
        results[name] = result
        write_json(out, name, result)
        text = f"\n== {name} ({result['seconds']} s; load average {result['loadavg_1m']['before']} → " \
               f"{result['loadavg_1m']['after']})\n{module.render(result)}"
        if scenario_targets:
            text += "\n" + "\n".join(t.line() for t in scenario_targets)
        print(text, flush=True)
        report.append(text)

    if targets:
        text = "\n== targets\n" + "\n".join(t.line() for t in targets)
        print(text)
        report.append(text)
    if args.plot and results:
        from bench.plot import plot

        note = plot(results, out)
        print(note)
        report.append(note)
    if names == list(SCENARIOS):  # a partial run does not replace the full report
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.txt").write_text("\n".join(report) + "\n")
    if crashed:
        print(f"\ncrashed: {', '.join(crashed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
