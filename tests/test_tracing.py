"""OpenTelemetry traces, through real servers: the official SDK → the proxy → the simulator.

The simulator gets one extra middleware here that records the ``traceparent`` each request carried,
so the tests see what the upstream saw. Spans are read from the SDK's in-memory exporter, and, in
one test, from a real OTLP/HTTP receiver the test runs (POST /v1/traces, protobuf decoded with
``opentelemetry-proto``), fed by the proxy's own exporter configured only by settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp import web

from specproxy import tracing
from specproxy.app import create_app
from specproxy.config import ConfigError, Settings, load_settings
from specproxy.keys import COALESCER
from specproxy.serving import running
from specproxy.sim import SimProfile, create_sim_app
from specproxy.sim.messages import SIM_STATE
from specproxy.testing import SimHandle
from tests.conftest import CONTEXT, KEY_A, KEY_B, MODEL, eventually, headers, question_body, warm_body

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What does function_7 return, exactly?"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


# --- harness -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Upstream:
    """The simulator, and the traceparent of every request it received, in order."""

    sim: SimHandle
    seen: list[tuple[str, str | None]]  # (path, traceparent)


@contextlib.asynccontextmanager
async def recording_sim() -> AsyncIterator[Upstream]:
    seen: list[tuple[str, str | None]] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            seen.append((request.path, request.headers.get("traceparent")))
        result: web.StreamResponse = await handler(request)
        return result

    app = create_sim_app(SimProfile(time_scale=0.0))
    app.middlewares.insert(0, record)
    async with running(app) as r, aiohttp.ClientSession() as session:
        yield Upstream(SimHandle(url=r.url, app=app, state=app[SIM_STATE], session=session), seen)


def settings_for(upstream: str, **overrides: Any) -> Settings:
    return load_settings(None, env={}, read_default_file=False,
                         overrides={"upstream": upstream, "max_hold": 10.0, **overrides})


@dataclasses.dataclass
class Traced:
    url: str
    app: web.Application
    exporter: InMemorySpanExporter

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, prefix: str) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name.startswith(prefix)]

    async def until_held(self, n: int) -> None:
        await self.app[COALESCER].limits.until_held(n)


@contextlib.asynccontextmanager
async def traced_proxy(upstream: str, **overrides: Any) -> AsyncIterator[Traced]:
    settings = settings_for(upstream, otel_enabled=True, otel_service_name="specproxy-test", **overrides)
    exporter = InMemorySpanExporter()
    app = create_app(settings, tracer=tracing.setup(settings, exporter=exporter, env={}))
    async with running(app) as r:
        yield Traced(r.url, app, exporter)


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str = KEY_A,
               **extra: str) -> tuple[int, dict[str, str], bytes]:
    async with http.post(url, data=json.dumps(body), headers=headers(key, **extra)) as r:
        return r.status, dict(r.headers), await r.read()


def hexid(n: int, width: int = 16) -> str:
    return format(n, f"0{width}x")


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def links(span: ReadableSpan, kind: str) -> list[int]:
    """Span ids of ``span``'s links of one kind."""
    return [link.context.span_id for link in span.links if (link.attributes or {}).get("specproxy.link") == kind]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def every_value(span: ReadableSpan) -> list[str]:
    """Every string a span exports: name, attribute keys and values, link and event attributes, resource."""
    out = [span.name, *map(str, span.resource.attributes.values())]
    for mapping in [span.attributes or {}, *[link.attributes or {} for link in span.links],
                    *[e.attributes or {} for e in span.events]]:
        out += [str(k) for k in mapping] + [str(v) for v in mapping.values()]
    return out


def assert_no_secret(strings: list[str], *secrets: str) -> None:
    for secret in secrets:
        assert not [s for s in strings if secret in s], secret


# --- off by default ------------------------------------------------------------------------------------
def test_tracing_is_off_by_default_and_with_otel_sdk_disabled() -> None:
    assert Settings().otel_enabled is False
    assert tracing.setup(settings_for("http://127.0.0.1:1")) is None
    on = settings_for("http://127.0.0.1:1", otel_enabled=True)
    assert tracing.setup(on, env={"OTEL_SDK_DISABLED": "true"}) is None
    assert tracing.setup(on, exporter=InMemorySpanExporter(), env={}) is not None


def test_otel_settings_are_checked_and_the_endpoint_gets_the_traces_path() -> None:
    with pytest.raises(ConfigError, match="otel_endpoint"):
        settings_for("http://127.0.0.1:1", otel_endpoint="collector:4318")
    assert tracing.traces_endpoint("http://collector:4318") == "http://collector:4318/v1/traces"
    assert tracing.traces_endpoint("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert tracing.traces_endpoint("https://c.example/v1/traces") == "https://c.example/v1/traces"
    env = {"SPECPROXY_OTEL_ENABLED": "1", "SPECPROXY_OTEL_ENDPOINT": "http://c:4318",
           "SPECPROXY_OTEL_SERVICE_NAME": "x"}
    s = load_settings(None, env=env, read_default_file=False)
    assert (s.otel_enabled, s.otel_endpoint, s.otel_service_name) == (True, "http://c:4318", "x")
    assert tracing.service_name(Settings(), {"OTEL_SERVICE_NAME": "from-env"}) == "from-env"
    assert tracing.service_name(Settings(), {}) == "specproxy"


def test_without_the_sdk_turning_tracing_on_is_a_configuration_error_naming_the_extra() -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from specproxy import tracing; from specproxy.config import load_settings\n"
        "s = load_settings(None, env={'SPECPROXY_OTEL_ENABLED': 'true'}, read_default_file=False)\n"
        "print(tracing.setup(s, env={}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "ConfigError" in done.stderr and "pip install 'specproxy[otel]'" in done.stderr


async def test_off_the_client_traceparent_reaches_the_upstream_untouched_and_no_middleware_is_added() -> None:
    async with recording_sim() as up:
        app = create_app(settings_for(up.sim.url))
        assert app[tracing.ENABLED] is False
        assert not [m for m in app.middlewares if "OtelTracing" in getattr(m, "__qualname__", "")]
        async with running(app) as r, aiohttp.ClientSession() as http:
            status, h, _ = await post(http, r.url + "/v1/messages", question_body(), traceparent=CLIENT_TRACEPARENT)
    assert status == 200 and h["X-Cache-Warm"] == "miss"
    assert up.seen == [("/v1/messages", CLIENT_TRACEPARENT)]


# --- the span tree ---------------------------------------------------------------------------------------
async def test_a_held_question_traces_hold_and_upstream_under_its_request_and_links_to_its_warm() -> None:
    async with recording_sim() as up, traced_proxy(up.sim.url) as proxy, aiohttp.ClientSession() as http, \
            anthropic.AsyncAnthropic(base_url=proxy.url, api_key=KEY_A, max_retries=0,
                                     default_headers={"traceparent": CLIENT_TRACEPARENT}) as client:
        status, _, body = await post(http, proxy.url + "/prewarm", warm_body(), **{"x-sim-gate": "warm"})
        assert status == 202
        prefix = json.loads(body)["prefix"]
        question = question_body(QUESTION)
        ask = asyncio.ensure_future(client.messages.with_raw_response.create(**question))
        await proxy.until_held(1)
        await up.sim.open_gate("warm")
        raw = await ask
        reply = await raw.parse()
    assert raw.headers["x-cache-warm"] == "held"
    spans = proxy.spans()

    [prewarm] = proxy.named("POST /prewarm")
    [warm] = proxy.named("warm ")
    [request] = proxy.named("POST /v1/messages")
    # The request continues the client's trace; its children are the hold and the upstream call.
    assert hexid(request.context.trace_id, 32) == CLIENT_TRACE
    assert request.parent is not None and hexid(request.parent.span_id) == CLIENT_SPAN
    assert request.kind is SpanKind.SERVER
    assert sorted(s.name for s in children(spans, request)) == [f"chat {MODEL}", "specproxy.hold"]
    [hold] = proxy.named("specproxy.hold")
    [chat] = proxy.named("chat ")
    assert chat.kind is SpanKind.CLIENT
    assert hold.start_time is not None and hold.end_time is not None and chat.start_time is not None
    assert hold.end_time <= chat.start_time  # held, then sent

    # The warm: its own trace, started by the prewarm request, releasing the question.
    assert warm.parent is None and warm.context.trace_id not in (request.context.trace_id,
                                                                  prewarm.context.trace_id)
    assert links(warm, "started_by") == [prewarm.context.span_id]
    assert links(warm, "released") == [request.context.span_id]
    assert links(hold, "released_by") == [warm.context.span_id]
    assert warm.end_time is not None and hold.end_time is not None and warm.end_time <= hold.end_time

    # Attributes: the X-Cache-Warm outcome, the hold, GenAI usage as the response reported it.
    a = attrs(request)
    assert (a["specproxy.cache_warm"], a["specproxy.prefix"], a["http.response.status_code"]) == ("held", prefix, 200)
    assert a["specproxy.wait_ms"] == int(raw.headers["x-cache-warm-wait-ms"])
    assert attrs(hold)["specproxy.cache_warm"] == "held" and attrs(hold)["specproxy.prefix"] == prefix
    u = reply.usage
    c = attrs(chat)
    assert c["gen_ai.operation.name"] == "chat" and c["gen_ai.provider.name"] == "anthropic"
    assert c["gen_ai.request.model"] == MODEL and c["gen_ai.response.model"] == reply.model
    assert c["gen_ai.usage.cache_read.input_tokens"] == u.cache_read_input_tokens > 0
    assert c["gen_ai.usage.cache_creation.input_tokens"] == (u.cache_creation_input_tokens or 0) == 0
    assert c["gen_ai.usage.input_tokens"] == u.input_tokens + u.cache_read_input_tokens  # cached included
    assert c["gen_ai.usage.output_tokens"] == u.output_tokens
    assert c["specproxy.upstream.request_id"] == raw.headers["request-id"]
    w = attrs(warm)
    assert (w["specproxy.warm.state"], w["specproxy.warm.mode"], w["specproxy.prefix"]) == ("warm", "0", prefix)
    assert w["gen_ai.usage.cache_creation.input_tokens"] == u.cache_read_input_tokens  # it wrote what was read

    # The upstream saw the proxy's upstream span as the question's parent; the warm carried nothing.
    question_sent = [tp for path, tp in up.seen if path == "/v1/messages"]
    assert question_sent[0] is None  # the warm: the prewarm request sent no traceparent
    assert question_sent[1] == f"00-{CLIENT_TRACE}-{hexid(chat.context.span_id)}-01"
    assert_no_secret([v for s in spans for v in every_value(s)], KEY_A, QUESTION, CONTEXT[:40], "function_7")
    assert {s.resource.attributes["service.name"] for s in spans} == {"specproxy-test"}


async def test_one_warm_releasing_three_questions_links_to_each_of_them() -> None:
    async with recording_sim() as up, traced_proxy(up.sim.url) as proxy, aiohttp.ClientSession() as http:
        await post(http, proxy.url + "/prewarm", warm_body(), **{"x-sim-gate": "warm"})
        asks = [asyncio.ensure_future(post(http, proxy.url + "/v1/messages", question_body(f"q{i}?")))
                for i in range(3)]
        await proxy.until_held(3)
        await up.sim.open_gate("warm")
        answers = await asyncio.gather(*asks)
    assert [h["X-Cache-Warm"] for _, h, _ in answers] == ["held"] * 3
    [warm] = proxy.named("warm ")
    requests = proxy.named("POST /v1/messages")
    assert sorted(links(warm, "released")) == sorted(r.context.span_id for r in requests)
    holds = proxy.named("specproxy.hold")
    assert len(holds) == 3 and all(links(h, "released_by") == [warm.context.span_id] for h in holds)
    assert len({r.context.trace_id for r in requests}) == 3  # three requests, three traces


async def test_a_follower_held_behind_a_leading_stream_links_to_the_leaders_upstream_span() -> None:
    async with recording_sim() as up, traced_proxy(up.sim.url) as proxy, aiohttp.ClientSession() as http:
        lead = asyncio.ensure_future(post(http, proxy.url + "/v1/messages", question_body("lead?", stream=True),
                                          **{"x-sim-gate": "lead"}))
        await eventually(lambda: bool(up.seen))  # the leader reached the upstream (and sits at its gate)
        follow = asyncio.ensure_future(post(http, proxy.url + "/v1/messages", question_body("follow?", stream=True)))
        await proxy.until_held(1)
        await up.sim.open_gate("lead")
        (_, lh, _), (_, fh, _) = await asyncio.gather(lead, follow)
    assert (lh["X-Cache-Warm"], fh["X-Cache-Warm"]) == ("miss", "held")
    chats = {attrs(s)["specproxy.cache_warm"]: s for s in proxy.named("chat ")}
    requests = {attrs(s)["specproxy.cache_warm"]: s for s in proxy.named("POST /v1/messages")}
    [hold] = proxy.named("specproxy.hold")
    assert hold.parent is not None and hold.parent.span_id == requests["held"].context.span_id
    assert links(hold, "released_by") == [chats["miss"].context.span_id]
    assert links(chats["miss"], "released") == [requests["held"].context.span_id]
    assert proxy.named("warm ") == []  # a leader is a request, not a warm the proxy sent


async def test_a_failed_warm_and_an_unreachable_upstream_are_error_spans() -> None:
    async with recording_sim() as up, traced_proxy(up.sim.url) as proxy, aiohttp.ClientSession() as http:
        status, _, body = await post(http, proxy.url + "/prewarm?wait=1", warm_body(), **{"x-sim-fault": "overloaded"})
        assert status == 200 and json.loads(body)["state"] == "failed"
    [warm] = proxy.named("warm ")
    assert warm.status.status_code is StatusCode.ERROR
    assert attrs(warm)["specproxy.warm.state"] == "failed" and attrs(warm)["error.type"] == "overloaded_error"

    async with traced_proxy("http://127.0.0.1:1") as proxy, aiohttp.ClientSession() as http:
        status, _, _ = await post(http, proxy.url + "/v1/messages", question_body())
    assert status == 502
    [request] = proxy.named("POST /v1/messages")
    [chat] = proxy.named("chat")
    assert chat.parent is not None and chat.parent.span_id == request.context.span_id
    assert request.status.status_code is StatusCode.ERROR and attrs(request)["http.response.status_code"] == 502
    assert chat.status.status_code is StatusCode.ERROR and attrs(chat)["error.type"] == "502"


async def test_probes_and_scrapes_are_not_traced_and_other_paths_get_a_server_span() -> None:
    async with recording_sim() as up, traced_proxy(up.sim.url) as proxy, aiohttp.ClientSession() as http:
        for path in ("/healthz", "/metrics", "/openapi.json", "/status.json"):
            async with http.get(proxy.url + path) as r:
                assert r.status == 200
        status, _, _ = await post(http, proxy.url + "/v1/messages/count_tokens",
                                  {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, key=KEY_B)
    assert status == 200
    [span] = proxy.spans()
    assert span.name == "POST passthrough" and span.kind is SpanKind.SERVER
    assert attrs(span)["url.path"] == "/v1/messages/count_tokens" and "http.route" not in attrs(span)


# --- a real OTLP/HTTP receiver -----------------------------------------------------------------------------
async def test_spans_reach_a_real_otlp_http_receiver_with_no_prompt_or_key_in_the_bytes() -> None:
    received: list[bytes] = []

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        received.append(await request.read())
        return web.Response(status=200, content_type="application/x-protobuf")

    receiver = web.Application()
    receiver.router.add_post("/v1/traces", traces)
    async with running(receiver) as collector, recording_sim() as up:
        settings = settings_for(up.sim.url, otel_enabled=True, otel_endpoint=collector.url,
                                otel_service_name="specproxy-otlp")
        app = create_app(settings)  # the exporter the settings make: OTLP/HTTP, batched
        async with running(app) as r, aiohttp.ClientSession() as http:
            status, _, _ = await post(http, r.url + "/prewarm?wait=1", warm_body())
            assert status == 200
            status, h, _ = await post(http, r.url + "/v1/messages", question_body(QUESTION),
                                      traceparent=CLIENT_TRACEPARENT)
            assert status == 200 and h["X-Cache-Warm"] == "hit"
        # The app's cleanup shut the provider down, which flushed the batch to the receiver.
    assert received
    assert_no_secret([b.decode("latin-1") for b in received], KEY_A, QUESTION, CONTEXT[:40])
    spans = []
    for blob in received:
        export = ExportTraceServiceRequest.FromString(blob)
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert resource["service.name"] == "specproxy-otlp"
            for scope in resource_spans.scope_spans:
                assert scope.scope.name == "specproxy"
                spans += list(scope.spans)
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {"POST /prewarm", f"warm {MODEL}", "POST /v1/messages", f"chat {MODEL}"}
    request, chat = by_name["POST /v1/messages"], by_name[f"chat {MODEL}"]
    assert request.trace_id.hex() == CLIENT_TRACE and request.parent_span_id.hex() == CLIENT_SPAN
    assert chat.parent_span_id == request.span_id and chat.trace_id == request.trace_id
    chat_attrs = {a.key: a.value for a in chat.attributes}
    assert chat_attrs["gen_ai.usage.cache_read.input_tokens"].int_value > 0
    request_attrs = {a.key: a.value for a in request.attributes}
    assert request_attrs["specproxy.cache_warm"].string_value == "hit"
    warm = by_name[f"warm {MODEL}"]
    assert [link.span_id for link in warm.links] == [by_name["POST /prewarm"].span_id]
    assert up.seen[-1] == ("/v1/messages", f"00-{CLIENT_TRACE}-{chat.span_id.hex()}-01")


# --- the documented cookbook trace ------------------------------------------------------------------------
def test_the_cookbook_trace_tree_script_prints_the_documented_shape() -> None:
    """``python deploy/otel/trace_tree.py`` (docs/observability.md): processes, OTLP/HTTP, the SDK."""
    script = ROOT / "deploy" / "otel" / "trace_tree.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, check=False,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    tree = done.stdout
    assert "question 1: X-Cache-Warm held" in done.stderr and "question 2: X-Cache-Warm hit" in done.stderr
    assert "└─ POST /prewarm [server]" in tree
    assert "warm claude-sonnet-4-6 [client]" in tree and "↔ started_by: POST /prewarm (T1)" in tree
    assert "↔ released: POST /v1/messages (T3)" in tree
    assert "(continues the app's traceparent)" in tree
    assert "specproxy.hold [internal]" in tree and "↔ released_by: warm claude-sonnet-4-6 (T2)" in tree
    assert tree.count("chat claude-sonnet-4-6 [client]") == 2
    assert "cache_warm=held" in tree and "cache_warm=hit" in tree
