"""``specproxy demo``: standard vs speculative prompt caching, side by side, through the official SDK.

The prompt-caching cookbook's comparison, offline by default. The demo starts the simulator and
the proxy in-process on free ports, loads a large real context that exists on every machine (the
running interpreter's own standard-library sources, about 150k tokens), and asks the same
question twice through ``anthropic.AsyncAnthropic`` pointed at the proxy:

1. **standard**: the user types, then asks; the context carries ``cache_control`` but nothing was
   warmed, so the question pays for the whole prefill;
2. **speculative**: ``POST /prewarm`` when typing starts; the proxy warms the cache upstream while
   the user types, and the question reads it.

Each flow uses its own context salt, so the standard flow is really cold. ``--upstream URL`` runs
the same two flows against a real Messages API (``ANTHROPIC_API_KEY`` required; no simulator).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import sys
import sysconfig
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO, TypeVar

import aiohttp

from specproxy.config import Settings
from specproxy.outcome import HEADER, HEADER_PREFIX, HEADER_WAIT

T = TypeVar("T")

# The cookbook used claude-sonnet-4-5; the SDKs now warn that it is deprecated, so its successor.
DEFAULT_MODEL: Final = "claude-sonnet-4-6"
# Long enough for the warm of a ~150k-token context to finish before the question (its prefill
# takes ~21 s uncached). With less typing the question is held until the warm has written the
# cache (X-Cache-Warm: held): it still reads the cache, but waits for the rest of the warm.
DEFAULT_TYPING_S: Final = 25.0
CHARS_PER_TOKEN: Final = 4  # the simulator's (and a fair real-world) approximation
ANTHROPIC_VERSION: Final = "2023-06-01"
SYSTEM: Final = "You are an expert Python programmer helping a colleague read CPython's standard library."
QUESTION: Final = "What happens to the inner task when asyncio.wait_for() times out, and why?"
# Standard-library packages read for the context, in this order, files sorted by name.
CONTEXT_PACKAGES: Final = (
    "asyncio", "concurrent/futures", "json", "email", "http", "urllib", "logging",
    "importlib", "collections", "unittest", "xml/etree", "multiprocessing",
)  # fmt: skip


# --- the context ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Context:
    """The large shared context: text, how many files went in, and where they came from."""

    text: str
    files: int
    source: str

    @property
    def approx_tokens(self) -> int:
        return -(-len(self.text) // CHARS_PER_TOKEN)


def load_context(tokens: int, salt: str, stdlib: str | os.PathLike[str] | None = None) -> Context:
    """About ``tokens`` tokens of CPython's standard-library sources, deterministic apart from ``salt``.

    The salt opens the text, so two flows (or two runs against a real API) never share a cache
    entry by accident. Files are read in a fixed order and the last one is cut at a line boundary.
    """
    lib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    head = f"# specproxy demo context, session {salt}\n"
    target = max(tokens * CHARS_PER_TOKEN, len(head) + 1)
    parts = [head]
    size = len(head)
    files = 0
    used: list[str] = []
    for package in CONTEXT_PACKAGES:
        for path in sorted((lib / package).glob("*.py")):
            if size >= target:
                break
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            chunk = f"\n# ===== Lib/{path.relative_to(lib).as_posix()} =====\n{text}"
            room = target - size
            if len(chunk) > room:
                cut = chunk.rfind("\n", 0, room)
                chunk = chunk[: cut + 1 if cut > 0 else room]
            parts.append(chunk)
            size += len(chunk)
            files += 1
            if package not in used:
                used.append(package)
    if size < target:  # an interpreter shipped without its .py sources: fill with stable filler
        filler = "".join(f"# line {i}: padding that stands in for source code\n" for i in range(1000))
        while size < target:
            chunk = filler[: target - size]
            parts.append(chunk)
            size += len(chunk)
    source = ", ".join(f"Lib/{p}" for p in used) if used else "generated filler"
    return Context("".join(parts), files, source)


def warm_body(model: str, context: str) -> dict[str, Any]:
    """The /prewarm body: the shared prefix, with the breakpoint on the last block the question shares."""
    return {
        "model": model,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": [_context_block(context)]}],
    }


def question_messages(context: str, question: str) -> list[dict[str, Any]]:
    """The question's messages: the same context block, then the question after the breakpoint."""
    return [
        {
            "role": "user",
            "content": [_context_block(context), {"type": "text", "text": f"Answer the user's question: {question}"}],
        }
    ]


def _context_block(context: str) -> dict[str, Any]:
    return {"type": "text", "text": context, "cache_control": {"type": "ephemeral"}}


# --- progress -----------------------------------------------------------------------------------
class Progress:
    """Step lines on ``out``; a spinner on ``err`` while waiting, only when it is a terminal."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out = out
        self.err = err
        self.spin = err.isatty()
        utf8 = (getattr(err, "encoding", None) or "").lower().replace("-", "") == "utf8"
        self.frames = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏" if utf8 else "|/-\\"

    def line(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    async def wait(self, label: str, aw: Awaitable[T]) -> T:
        """Await ``aw``, spinning with ``label`` meanwhile on a terminal."""
        if not self.spin:
            return await aw
        task = asyncio.ensure_future(aw)
        start = time.monotonic()
        try:
            for frame in itertools.cycle(self.frames):
                done, _ = await asyncio.wait({task}, timeout=0.08)
                if done:
                    break
                self.err.write(f"\r  {frame} {label} {time.monotonic() - start:5.1f} s ")
                self.err.flush()
        finally:
            self.err.write("\r\x1b[2K")
            self.err.flush()
            if not task.done():
                task.cancel()
        return task.result()


# --- one flow ------------------------------------------------------------------------------------------
@dataclass(slots=True)
class FlowResult:
    """What one flow measured (seconds are real, measured seconds) and what the proxy said."""

    name: str
    ttft: float
    total: float
    usage: dict[str, int]
    header: str
    wait_ms: int
    prefix: str
    warm: dict[str, Any] | None = None
    upstream_requests: int | None = None
    # The same flow's cost with every simulated delay at zero (client, proxy and simulator CPU): real
    # seconds that a faster simulator does not shrink, so they are not scaled up either.
    fixed_ttft: float = 0.0
    fixed_total: float = 0.0

    def simulated(self, scale: float) -> tuple[float, float]:
        """(TTFT, total) in simulated seconds: fixed local cost + the simulator's delays / scale."""

        def up(measured: float, fixed: float) -> float:
            return fixed + max(0.0, measured - fixed) / scale

        return up(self.ttft, self.fixed_ttft), up(self.total, self.fixed_total)


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything both flows share."""

    proxy_url: str
    model: str
    typing_s: float  # real seconds to sleep for the simulated typing
    context_tokens: int
    question: str = QUESTION


async def _ask(client: Any, plan: Plan, context: str, progress: Progress) -> tuple[float, float, Any, Any]:
    """Stream the question; return (ttft, total, final message, response headers)."""
    start = time.monotonic()
    ttft: float | None = None

    async def run() -> tuple[Any, Any]:
        nonlocal ttft
        async with client.messages.stream(
            model=plan.model,
            system=SYSTEM,
            max_tokens=1024,
            messages=question_messages(context, plan.question),
        ) as stream:
            async for text in stream.text_stream:
                if ttft is None and text.strip():
                    ttft = time.monotonic() - start
            return await stream.get_final_message(), stream.response.headers

    message, headers = await progress.wait("waiting for the answer", run())
    total = time.monotonic() - start
    return (ttft if ttft is not None else total), total, message, headers


async def _sdk_warm_up(client: Any, model: str) -> None:
    async with client.messages.stream(
        model=model, max_tokens=1, messages=[{"role": "user", "content": "Say OK."}]
    ) as stream:
        await stream.get_final_message()


def _usage(message: Any) -> dict[str, int]:
    u = message.usage
    return {
        "input": int(u.input_tokens or 0),
        "cache_read": int(getattr(u, "cache_read_input_tokens", 0) or 0),
        "cache_write": int(getattr(u, "cache_creation_input_tokens", 0) or 0),
        "output": int(u.output_tokens or 0),
    }


async def run_flow(
    name: str,
    client: Any,
    http: aiohttp.ClientSession,
    plan: Plan,
    progress: Progress,
    *,
    speculative: bool,
    sim: Any = None,
) -> FlowResult:
    """One flow of the comparison: type (warming first when ``speculative``), then ask."""
    context = load_context(plan.context_tokens, f"{name}-{uuid.uuid4().hex}").text
    before = await sim.stats() if sim is not None else None
    # Warm state is per credential: send the warm with the very credential header the SDK sends.
    headers = {**client.auth_headers, "anthropic-version": ANTHROPIC_VERSION}
    warm_state: dict[str, Any] | None = None
    if speculative:
        async with http.post(f"{plan.proxy_url}/prewarm", json=warm_body(plan.model, context), headers=headers) as r:
            warm_state = await r.json()
            if r.status >= 400:
                raise DemoError(f"POST /prewarm answered {r.status}: {warm_state}")
        progress.line(
            f"      typing starts -> POST /prewarm -> {r.status} "
            f"state={warm_state['state']} prefix={warm_state['prefix']}"
        )
    else:
        progress.line("      typing starts (nothing is sent while the user types)")
    await progress.wait("user is typing", asyncio.sleep(plan.typing_s))
    progress.line(f"      question sent: {plan.question!r}")
    ttft, total, message, resp_headers = await _ask(client, plan, context, progress)
    if speculative and warm_state is not None:
        async with http.get(f"{plan.proxy_url}/prewarm/{warm_state['prefix']}", headers=headers) as r:
            if r.status == 200:
                warm_state = await r.json()
    result = FlowResult(
        name=name,
        ttft=ttft,
        total=total,
        usage=_usage(message),
        header=resp_headers.get(HEADER, "(none)"),
        wait_ms=int(resp_headers.get(HEADER_WAIT, "0") or 0),
        prefix=resp_headers.get(HEADER_PREFIX, "-"),
        warm=warm_state,
    )
    if sim is not None and before is not None:
        after = await sim.stats()
        result.upstream_requests = after["requests"] - before["requests"]
    progress.line(
        f"      first token after {ttft:.3f} s, done after {total:.3f} s (measured); {HEADER}: {result.header}"
    )
    if warm_state is not None and "uses" in warm_state:
        progress.line(
            f"      the warm now: state={warm_state['state']} {warm_state.get('mode', '')} uses={warm_state['uses']}"
        )
    return result


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why."""


# --- the report ---------------------------------------------------------------------------------------
def improvement(before: float, after: float) -> float:
    """Percent saved going from ``before`` to ``after`` (positive when ``after`` is faster)."""
    return (before - after) / before * 100 if before > 0 else 0.0


def report(std: FlowResult, spec: FlowResult, time_scale: float, simulated: bool) -> list[str]:
    """The side-by-side comparison, as lines."""
    scale = time_scale if simulated and time_scale > 0 else 1.0
    scaled = scale != 1.0
    tag = " (simulated)" if scaled else ""
    unit = " simulated s" if scaled else " s"
    std_ttft, std_total = std.simulated(scale) if scaled else (std.ttft, std.total)
    spec_ttft, spec_total = spec.simulated(scale) if scaled else (spec.ttft, spec.total)
    rows: list[tuple[str, str, str]] = [
        (f"time to first token{tag}", f"{std_ttft:.2f} s", f"{spec_ttft:.2f} s"),
        (f"total time{tag}", f"{std_total:.2f} s", f"{spec_total:.2f} s"),
    ]
    if scaled:
        rows += [
            ("time to first token (measured)", f"{std.ttft:.3f} s", f"{spec.ttft:.3f} s"),
            ("total time (measured)", f"{std.total:.3f} s", f"{spec.total:.3f} s"),
        ]
    rows += [
        ("input tokens", f"{std.usage['input']:,}", f"{spec.usage['input']:,}"),
        ("cache-read tokens", f"{std.usage['cache_read']:,}", f"{spec.usage['cache_read']:,}"),
        ("cache-write tokens", f"{std.usage['cache_write']:,}", f"{spec.usage['cache_write']:,}"),
        ("output tokens", f"{std.usage['output']:,}", f"{spec.usage['output']:,}"),
        (HEADER, std.header, spec.header),
        (HEADER_WAIT, str(std.wait_ms), str(spec.wait_ms)),
        (HEADER_PREFIX, std.prefix, spec.prefix),
    ]
    if std.upstream_requests is not None and spec.upstream_requests is not None:
        rows.append(("upstream requests", str(std.upstream_requests), str(spec.upstream_requests)))
    width = max(len(r[0]) for r in rows) + 2
    col = max(17, *(len(v) for r in rows for v in r[1:]))
    lines = [f"{'':{width}}{'standard':>{col}}  {'speculative':>{col}}"]
    lines += [f"{label:{width}}{a:>{col}}  {b:>{col}}" for label, a, b in rows]
    ttft_gain = improvement(std_ttft, spec_ttft)
    total_gain = improvement(std_total, spec_total)
    lines += [
        "",
        f"TTFT improvement:  {ttft_gain:.1f}% ({std_ttft - spec_ttft:.2f}{unit} faster)",
        f"Total improvement: {total_gain:.1f}% ({std_total - spec_total:.2f}{unit} faster)",
    ]
    if scaled:
        lines.append(
            f"Simulated seconds: the simulator ran every delay {1 / time_scale:g} times faster, so the measured\n"
            f"time above the flow's fixed local cost (the same flow with no simulated delay: client, proxy and\n"
            f"simulator CPU, {std.fixed_ttft * 1000:.0f} / {spec.fixed_ttft * 1000:.0f} ms to the first token) "
            f"is multiplied by {1 / time_scale:g}; the fixed cost is not."
        )
    if spec.upstream_requests is not None:
        lines.append("The speculative flow's upstream requests are the warm (max_tokens 0) and the question.")
    if spec.header == "held":
        lines.append(
            f"The question arrived while the warm was in flight: it was held {spec.wait_ms} ms until the warm "
            "had written the cache, then read it."
        )
    return lines


async def fixed_costs(model: str, context_tokens: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Both flows once more with every simulated delay at zero: their fixed local costs, real seconds.

    What is left when the simulator sleeps for nothing is the work of the SDK, the proxy and the
    simulator on this machine; a time-scaled run must not multiply it by 1/scale.
    """
    import io

    from anthropic import AsyncAnthropic

    from specproxy.app import create_app
    from specproxy.serving import running
    from specproxy.testing import run_sim

    quiet = Progress(io.StringIO(), io.StringIO())
    async with run_sim(time_scale=0.0) as sim:
        settings = Settings(upstream=sim.url, log_level="warning")
        async with (
            running(create_app(settings)) as proxy,
            aiohttp.ClientSession() as http,
            AsyncAnthropic(base_url=proxy.url, api_key="demo-key", max_retries=0) as client,
        ):
            plan = Plan(proxy.url, model, 0.0, context_tokens)
            await _sdk_warm_up(client, model)
            std = await run_flow("fixed-standard", client, http, plan, quiet, speculative=False, sim=sim)
            spec = await run_flow("fixed-speculative", client, http, plan, quiet, speculative=True, sim=sim)
    return (std.ttft, std.total), (spec.ttft, spec.total)


# --- the command ---------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _upstream(args: argparse.Namespace, time_scale: float) -> AsyncIterator[tuple[str, Any]]:
    """The upstream URL and, when simulated, the simulator's handle."""
    if args.upstream:
        yield args.upstream, None
        return
    from specproxy.testing import run_sim

    async with run_sim(time_scale=time_scale) as sim:
        yield sim.url, sim


async def _main(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    progress = Progress(out, err)
    real = bool(args.upstream)
    api_key = os.environ.get("ANTHROPIC_API_KEY", "")
    if real and not api_key:
        print("specproxy demo: --upstream needs ANTHROPIC_API_KEY in the environment", file=err)
        return 2
    time_scale = 1.0 if real else float(args.time_scale)
    if time_scale < 0:
        print("specproxy demo: --time-scale must be >= 0", file=err)
        return 2
    context_tokens = int(args.context_tokens)
    if context_tokens < 1:
        print("specproxy demo: --context-tokens must be >= 1", file=err)
        return 2
    typing_s = DEFAULT_TYPING_S if args.typing_seconds is None else float(args.typing_seconds)
    model = args.model or DEFAULT_MODEL

    from anthropic import AsyncAnthropic

    from specproxy.app import create_app
    from specproxy.serving import running

    probe = load_context(context_tokens, "probe")

    progress.line("specproxy demo: standard vs speculative prompt caching")
    if real:
        progress.line(f"  upstream  {args.upstream} (real API; every request is billed)")
    else:
        progress.line(f"  upstream  built-in simulator, time scale {time_scale:g} (every delay x{time_scale:g})")
    progress.line(f"  model     {model}")
    progress.line(
        f"  context   ~{probe.approx_tokens:,} tokens ({len(probe.text):,} characters) from "
        f"{probe.files} files of {probe.source}"
    )
    scaled = f" ({typing_s * time_scale:g} s real)" if time_scale != 1.0 else ""
    progress.line(f"  typing    {typing_s:g} s{scaled} before the question is sent")
    progress.line()

    async with _upstream(args, time_scale) as (upstream_url, sim):
        # The defaults, not ./config/specproxy.toml or SPECPROXY_* (a local redis registry, say, has no
        # place in the demo).
        settings = Settings(upstream=upstream_url, log_level="warning")
        async with running(create_app(settings)) as proxy, aiohttp.ClientSession() as http:
            client = AsyncAnthropic(base_url=proxy.url, api_key=api_key or "demo-key", max_retries=0 if sim else 2)
            plan = Plan(proxy.url, model, typing_s * time_scale, context_tokens)
            try:
                # The SDK's first request pays a one-off set-up (~0.15 s here); keep it out of the numbers.
                progress.line("warm-up: one tiny request without cache_control (the SDK's first-call set-up)")
                await progress.wait("warming up the SDK", _sdk_warm_up(client, model))
                progress.line()
                progress.line("[1/2] standard: the user types, then asks; context with cache_control, nothing warmed")
                std = await run_flow("standard", client, http, plan, progress, speculative=False, sim=sim)
                progress.line()
                progress.line("[2/2] speculative: POST /prewarm when typing starts, then the same question")
                spec = await run_flow("speculative", client, http, plan, progress, speculative=True, sim=sim)
            except DemoError as exc:
                print(f"specproxy demo: {exc}", file=err)
                return 1
            except Exception as exc:  # the SDK's and aiohttp's errors: say what failed, not a traceback
                if type(exc).__module__.split(".")[0] not in ("anthropic", "aiohttp"):
                    raise
                print(f"specproxy demo: request failed: {type(exc).__name__}: {exc}", file=err)
                return 1
            finally:
                await client.close()

    if not real and 0 < time_scale < 1:
        progress.line()
        progress.line("calibration: both flows again with no simulated delay (the fixed local cost)")
        fixed_std, fixed_spec = await progress.wait("measuring", fixed_costs(model, context_tokens))
        std.fixed_ttft, std.fixed_total = fixed_std
        spec.fixed_ttft, spec.fixed_total = fixed_spec
    progress.line()
    for text in report(std, spec, time_scale, simulated=not real):
        progress.line(text)
    return 0


def run_demo(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the comparison for ``specproxy demo``; the exit status."""
    return asyncio.run(_main(args, out or sys.stdout, err or sys.stderr))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m specproxy.demo``: the same as ``specproxy demo``."""
    from specproxy.cli import build_parser

    args = build_parser().parse_args(["demo", *(argv if argv is not None else sys.argv[1:])])
    return run_demo(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
