"""Print specproxy's OpenTelemetry traces as trees, from a tiny OTLP/HTTP receiver.

Two ways to run it (needs ``pip install -e '.[otel,demo]'``):

    python deploy/otel/trace_tree.py
        The prompt-caching cookbook's speculative flow, end to end and offline: starts the
        simulator (``specproxy sim``) and the proxy (``specproxy serve``, traced through the
        ``SPECPROXY_OTEL_*`` variables, exporting here over OTLP/HTTP) as processes, then, as the
        app, sends ``POST /prewarm`` when the user starts typing and the question through the
        official SDK while the warm is still being written (held), then a second question (hit).
        When the proxy has shut down (which flushes its spans) it prints every trace as a tree.

    python deploy/otel/trace_tree.py --listen 127.0.0.1:4318
        Only the receiver: point a proxy at it (``SPECPROXY_OTEL_ENABLED=true
        SPECPROXY_OTEL_ENDPOINT=http://127.0.0.1:4318 specproxy serve``) and it prints each batch.

Attributes shown are the ones docs/observability.md lists; nothing else is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Iterable
from typing import Any

from aiohttp import ClientSession, web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

KINDS = {Span.SPAN_KIND_SERVER: "server", Span.SPAN_KIND_CLIENT: "client", Span.SPAN_KIND_INTERNAL: "internal"}
SHOWN = ("specproxy.cache_warm", "specproxy.wait_ms", "specproxy.prefix", "http.response.status_code",
         "specproxy.warm.state", "specproxy.warm.mode", "gen_ai.usage.input_tokens",
         "gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_creation.input_tokens",
         "gen_ai.usage.output_tokens", "error.type")
APP_TRACE = "a11ce0ffee0000000000000000000001"  # the app's own trace, sent as traceparent
TIME_SCALE = 0.05
TYPING_S = 0.4  # 8 simulated seconds: the question arrives while the ~21 s warm is still being written


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def spans_of(blobs: Iterable[bytes]) -> list[Span]:
    out: list[Span] = []
    for blob in blobs:
        for rs in ExportTraceServiceRequest.FromString(blob).resource_spans:
            for ss in rs.scope_spans:
                out.extend(ss.spans)
    return out


def render(spans: list[Span]) -> list[str]:
    """Every trace as a tree, oldest trace first; links shown by the name of the span they point to."""
    by_id = {s.span_id: s for s in spans}
    names = {s.span_id: s.name for s in spans}
    traces: dict[bytes, list[Span]] = {}
    for s in sorted(spans, key=lambda s: s.start_time_unix_nano):
        traces.setdefault(s.trace_id, []).append(s)
    short = {trace_id: f"T{i + 1}" for i, trace_id in enumerate(traces)}
    lines: list[str] = []
    for trace_id, members in traces.items():
        label = short.get(trace_id, "T?")
        note = " (continues the app's traceparent)" if trace_id.hex() == APP_TRACE else ""
        lines.append(f"{label} trace {trace_id.hex()[:8]}…{note}")
        roots = [s for s in members if s.parent_span_id not in by_id]

        def walk(span: Span, prefix: str, last: bool, members: list[Span] = members) -> None:
            ms = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
            attrs = {a.key: _value(a.value) for a in span.attributes}
            shown = " ".join(f"{k.removeprefix('specproxy.').removeprefix('gen_ai.usage.')}={attrs[k]}"
                             for k in SHOWN if k in attrs)
            lines.append(f"{prefix}{'└─ ' if last else '├─ '}{span.name} [{KINDS.get(span.kind, '?')}] "
                         f"{ms:,.0f} ms  {shown}".rstrip())
            inner = prefix + ("   " if last else "│  ")
            for link in span.links:
                kind = {a.key: _value(a.value) for a in link.attributes}.get("specproxy.link", "link")
                target = names.get(link.span_id, "a span outside this run")
                where = short.get(link.trace_id, "T?")
                lines.append(f"{inner}   ↔ {kind}: {target} ({where})")
            kids = [c for c in members if c.parent_span_id == span.span_id]
            for i, child in enumerate(kids):
                walk(child, inner, i == len(kids) - 1)

        for i, root in enumerate(roots):
            walk(root, "", i == len(roots) - 1)
        lines.append("")
    return lines


def receiver(blobs: list[bytes], echo: bool) -> web.Application:
    async def traces(request: web.Request) -> web.Response:
        blob = await request.read()
        blobs.append(blob)
        if echo:
            print("\n".join(render(spans_of([blob]))), flush=True)
        return web.Response(content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start(*argv: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "specproxy.cli", *argv, env=env,
                                                stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if b"listening on" not in line:
        raise RuntimeError(f"{argv[0]} did not start: {line!r}")
    return proc


async def cookbook(blobs: list[bytes], collector: str) -> None:
    import anthropic

    from specproxy.demo import SYSTEM, load_context, question_messages, warm_body

    sim_port, proxy_port = free_port(), free_port()
    sim = await start("sim", "--port", str(sim_port), "--time-scale", str(TIME_SCALE))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPECPROXY_", "OTEL_"))}
    env.update(SPECPROXY_OTEL_ENABLED="true", SPECPROXY_OTEL_ENDPOINT=collector, SPECPROXY_LOG_LEVEL="warning",
               SPECPROXY_CACHE_TTL_SCALE=str(TIME_SCALE), OTEL_SERVICE_NAME="specproxy")
    proxy = await start("serve", "--port", str(proxy_port), "--upstream", f"http://127.0.0.1:{sim_port}", env=env)
    url = f"http://127.0.0.1:{proxy_port}"
    model = "claude-sonnet-4-6"
    context = load_context(150_000, "trace-tree").text
    key = "any-key-works-with-the-simulator"
    try:
        async with ClientSession() as http, anthropic.AsyncAnthropic(base_url=url, api_key=key,
                                                                     max_retries=0) as client:
            print("typing starts -> POST /prewarm", file=sys.stderr)
            headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"}
            async with http.post(url + "/prewarm", data=json.dumps(warm_body(model, context)), headers=headers) as r:
                print(f"  {r.status} {await r.json()}", file=sys.stderr)
            await asyncio.sleep(TYPING_S)
            for i, question in enumerate(("What happens to the inner task when asyncio.wait_for() times out?",
                                          "And what does asyncio.shield() change about that?")):
                traceparent = f"00-{APP_TRACE}-{'b' * 15}{i + 1}-01"  # one app trace, two app spans
                raw = await client.messages.with_raw_response.create(
                    model=model, max_tokens=420, system=SYSTEM, messages=question_messages(context, question),
                    extra_headers={"traceparent": traceparent},
                )
                message = await raw.parse()
                print(f"question {i + 1}: X-Cache-Warm {raw.headers['x-cache-warm']}, "
                      f"cache read {message.usage.cache_read_input_tokens:,}", file=sys.stderr)
    finally:
        proxy.send_signal(signal.SIGTERM)  # shutting down flushes the batched spans to the receiver
        await proxy.wait()
        sim.send_signal(signal.SIGTERM)
        await sim.wait()


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", help="HOST:PORT: only receive and print (default: run the cookbook flow)")
    args = parser.parse_args(argv)
    blobs: list[bytes] = []
    host, port = (args.listen.rsplit(":", 1) if args.listen else ("127.0.0.1", "0"))
    runner = web.AppRunner(receiver(blobs, echo=bool(args.listen)), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, int(port) or free_port())
    await site.start()
    collector = site.name
    try:
        if args.listen:
            print(f"receiving OTLP/HTTP traces on {collector}/v1/traces", flush=True)
            await asyncio.Event().wait()
        await cookbook(blobs, collector)
        print("\n".join(render(spans_of(blobs))))
    finally:
        await runner.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
