"""The ``specproxy`` command: ``serve``, ``sim``, ``demo``, ``config``, ``bench``.

A thin argparse layer: every proxy flag is also a ``SPECPROXY_*`` env var and a key of
``config/specproxy.toml``; the flag wins. Imports of the heavy parts happen inside each command.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from specproxy import __version__
from specproxy.config import ConfigError, Settings, load_settings, render_toml


def _settings_from(args: argparse.Namespace, *names: str) -> Settings:
    overrides: dict[str, Any] = {n: getattr(args, n, None) for n in names}
    return load_settings(args.config, overrides=overrides)


def _cmd_serve(args: argparse.Namespace) -> int:
    from specproxy.app import serve

    settings = _settings_from(args, "host", "port", "upstream", "log_level", "upstream_profile")
    serve(settings)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    settings = _settings_from(args, "host", "port", "upstream", "log_level", "upstream_profile")
    print(render_toml(settings))
    return 0


def _cmd_sim(args: argparse.Namespace) -> int:
    from specproxy.sim import load_profile, run_sim_server

    profile = load_profile(args.config, time_scale=args.time_scale, dialect=args.dialect,
                           cache_report=True if args.cache_report else None, models=args.models)
    run_sim_server(args.host, args.port, profile)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from specproxy.demo import run_demo

    return run_demo(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    try:
        from bench.__main__ import main as bench_main
    except ImportError:
        print("specproxy bench runs from a source checkout: python -m bench", file=sys.stderr)
        return 2
    return bench_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specproxy", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--version", action="version", version=f"specproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def proxy_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
        p.add_argument("--port", type=int, help="port to listen on (default 8787)")
        p.add_argument("--upstream", help="Messages API base URL (default https://api.anthropic.com)")
        p.add_argument("--log-level", dest="log_level", help="debug | info | warning | error")
        p.add_argument("--upstream-profile", dest="upstream_profile", help="auto, anthropic, vllm, sglang, llamacpp")
        p.add_argument("--config", help="TOML config file (default: $SPECPROXY_CONFIG or ./config/specproxy.toml)")

    p = sub.add_parser("serve", help="run the proxy")
    proxy_flags(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("config", help="print the effective configuration (secrets redacted)")
    proxy_flags(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("sim", help="run the Messages API simulator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--time-scale", dest="time_scale", type=float, default=None,
                   help="multiply every simulated delay and TTL (0 = no delay; default 1.0)")
    p.add_argument("--config", help="TOML file overriding the simulator profile")
    p.add_argument("--dialect", choices=("anthropic", "vllm", "sglang", "llamacpp"), default=None,
                   help="answer as the Anthropic API (default) or as this engine's /v1/messages")
    p.add_argument("--cache-report", dest="cache_report", action="store_true",
                   help="engine dialects: report cache reads in usage, as vLLM --enable-prompt-tokens-details "
                        "or SGLang --enable-cache-report do")
    p.add_argument("--models", default=None, help="TOML or JSON file extending the model capability table")
    p.set_defaults(func=_cmd_sim)

    p = sub.add_parser("demo", help="standard vs speculative prompt caching, side by side")
    p.add_argument("--time-scale", dest="time_scale", type=float, default=1.0,
                   help="simulator speed: 0.02 runs the demo fifty times faster (ignored with --upstream)")
    p.add_argument("--upstream", help="run against this API (needs ANTHROPIC_API_KEY) instead of the simulator")
    p.add_argument("--model", default=None, help="model to ask (default claude-sonnet-4-6)")
    p.add_argument("--context-tokens", dest="context_tokens", type=int, default=150_000,
                   help="approximate size of the context to load (default 150000)")
    p.add_argument("--typing-seconds", dest="typing_seconds", type=float, default=None,
                   help="simulated typing time before the question is sent (default 25: enough for the warm "
                        "of 150k tokens to finish; less shows a held question)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="run the benchmarks (source checkout only)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"specproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # the simulator's ProfileError, and other bad values from files
        if type(exc).__name__ not in ("ProfileError", "CapabilityError"):
            raise
        print(f"specproxy sim: profile error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
