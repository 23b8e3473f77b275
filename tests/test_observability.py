"""Observability: the Prometheus metrics, the access log line and ``/status.json``, after scripted traffic.

Every count is exact: the traffic is scripted against the simulator, whose usage is deterministic,
so tokens and dollars are compared with the usage the simulator returned. No timing is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from specproxy.logs import JSONFormatter, TextFormatter
from specproxy.metrics import cost
from specproxy.prefix import tenant_digest
from specproxy.testing import ProxyHandle, SimHandle, run_proxy
from specproxy.usage import Usage
from tests.conftest import CONTEXT, KEY_A, KEY_B, MODEL, access_lines, eventually, headers, question_body, warm_body

KINDS = ("input", "cache_read", "cache_write_5m", "cache_write_1h", "output")
QUESTION = "What does function_7 return?"


# --- helpers ---------------------------------------------------------------------------------------


def context(tag: str) -> str:
    """A context of its own (its own prefix), as long as the shared one: above Sonnet 4.6's minimum."""
    return f"# context {tag}\n" + CONTEXT


class Scrape:
    """One ``/metrics`` answer, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[Sample] = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def series(self, name: str, *labels: str) -> dict[tuple[str, ...], float]:
        """``{label values, in the order asked: value}`` of one sample name; its labels must be exactly these."""
        out: dict[tuple[str, ...], float] = {}
        for s in self.samples:
            if s.name == name:
                assert set(s.labels) == set(labels), s.labels
                out[tuple(s.labels[n] for n in labels)] = s.value
        return out

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) == 1, (name, labels, found)
        return found[0]


async def scrape(http: aiohttp.ClientSession, proxy: ProxyHandle) -> Scrape:
    async with http.get(proxy.url + "/metrics") as r:
        assert r.status == 200
        assert r.content_type == "text/plain"
        return Scrape(await r.text())


async def status_json(http: aiohttp.ClientSession, proxy: ProxyHandle, **kw: Any) -> dict[str, Any]:
    async with http.get(proxy.url + "/status.json", **kw) as r:
        assert r.status == 200, await r.text()
        data: dict[str, Any] = await r.json()
        return data


async def prewarm(http: aiohttp.ClientSession, proxy: ProxyHandle, body: dict[str, Any] | None = None, *,
                  wait: bool = True, key: str = KEY_A, **extra: str) -> dict[str, Any]:
    url = proxy.url + "/prewarm" + ("?wait=1" if wait else "")
    async with http.post(url, data=orjson.dumps(body or warm_body()), headers=headers(key, **extra)) as r:
        assert r.status == (200 if wait else 202), await r.text()
        data: dict[str, Any] = await r.json()
        return data


async def ask(http: aiohttp.ClientSession, proxy: ProxyHandle, body: dict[str, Any] | None = None, *,
              key: str = KEY_A, **extra: str) -> tuple[CIMultiDictProxy[str], dict[str, Any]]:
    """A non-streaming call: the response headers and JSON body."""
    async with http.post(proxy.url + "/v1/messages", data=orjson.dumps(body or question_body()),
                         headers=headers(key, **extra)) as r:
        return r.headers, await r.json()


async def ask_stream(http: aiohttp.ClientSession, proxy: ProxyHandle, body: dict[str, Any], *,
                     key: str = KEY_A, **extra: str) -> tuple[CIMultiDictProxy[str], dict[str, Any], dict[str, Any]]:
    """A streaming call: the response headers, and the usage of its message_start and its message_delta."""
    async with http.post(proxy.url + "/v1/messages", data=orjson.dumps({**body, "stream": True}),
                         headers=headers(key, **extra)) as r:
        assert r.status == 200
        text = await r.text()
    events = [orjson.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
    start = next(e for e in events if e["type"] == "message_start")["message"]["usage"]
    delta = next(e for e in events if e["type"] == "message_delta")["usage"]
    return r.headers, start, delta


def kinds(usage: dict[str, Any]) -> dict[str, int]:
    """The API's usage object by the proxy's token kinds (read here independently of specproxy.usage)."""
    one_hour = int((usage.get("cache_creation") or {}).get("ephemeral_1h_input_tokens", 0))
    return {
        "input": usage["input_tokens"],
        "cache_read": usage["cache_read_input_tokens"],
        "cache_write_5m": usage["cache_creation_input_tokens"] - one_hour,
        "cache_write_1h": one_hour,
        "output": usage["output_tokens"],
    }


def stream_kinds(start: dict[str, Any], delta: dict[str, Any]) -> dict[str, int]:
    """A stream's usage: input and cache counters from message_start, the final output count from message_delta."""
    for key in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
        assert delta[key] == start[key], key  # message_delta repeats them, cumulatively
    return {**kinds(start), "output": delta["output_tokens"]}


def total(*usages: dict[str, int]) -> Counter[str]:
    out: Counter[str] = Counter()
    for u in usages:
        out.update(u)
    return out


def token_series(tokens: Counter[str], *extra: str) -> dict[tuple[str, ...], float]:
    """What ``specproxy_tokens_total`` must hold: one series per non-zero kind."""
    return {(kind, MODEL, *extra): float(n) for kind, n in tokens.items() if n}


async def warm_usages(sim: SimHandle) -> list[dict[str, Any]]:
    """The usage of every ``max_tokens: 0`` warm the simulator answered, oldest first."""
    return [e["usage"] for e in await sim.requests() if e["path"] == "/v1/messages" and e["max_tokens"] == 0]


# --- requests by outcome ----------------------------------------------------------------------------


async def test_each_outcome_is_counted_once_by_path_and_status(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    # hit: its warm finished before the question
    await prewarm(http, proxy, warm_body(context("hit")))
    h, _ = await ask(http, proxy, question_body(context=context("hit")))
    assert h["X-Cache-Warm"] == "hit"
    # held: the question arrives while its warm is in flight
    await prewarm(http, proxy, warm_body(context("held")), wait=False, **{"x-sim-gate": "held"})
    held = asyncio.create_task(ask(http, proxy, question_body(context=context("held"))))
    await proxy.until_held(1)
    await sim.open_gate("held")
    h, _ = await held
    assert h["X-Cache-Warm"] == "held"
    # miss: cacheable, never warmed
    h, _ = await ask(http, proxy, question_body(context=context("miss")))
    assert h["X-Cache-Warm"] == "miss"
    # bypass: no breakpoint; once answered 200, once 400 by the upstream
    plain = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    h, _ = await ask(http, proxy, plain)
    assert h["X-Cache-Warm"] == "bypass"
    h, body = await ask(http, proxy, {**plain, "max_tokens": -1})
    assert h["X-Cache-Warm"] == "bypass" and body["error"]["type"] == "invalid_request_error"
    # uncacheable: the warm wrote nothing (a prompt under the model's minimum)
    short = "a short context, far under the minimum"
    await prewarm(http, proxy, warm_body(short))
    h, _ = await ask(http, proxy, question_body(context=short))
    assert h["X-Cache-Warm"] == "uncacheable"
    # failed: the warm got an upstream error
    await prewarm(http, proxy, warm_body(context("failed")), **{"x-sim-fault": "api_error"})
    h, _ = await ask(http, proxy, question_body(context=context("failed")))
    assert h["X-Cache-Warm"] == "failed"
    # not a Messages call: passed through, and the proxy's own 401
    async with http.get(proxy.url + "/v1/models", headers=headers()) as r:
        assert r.status == 200
    async with http.post(proxy.url + "/prewarm", data=orjson.dumps(warm_body())) as r:
        assert r.status == 401

    m = await scrape(http, proxy)
    assert m.series("specproxy_requests_total", "path", "status", "outcome") == {
        ("/v1/messages", "200", "hit"): 1,
        ("/v1/messages", "200", "held"): 1,
        ("/v1/messages", "200", "miss"): 1,
        ("/v1/messages", "200", "bypass"): 1,
        ("/v1/messages", "400", "bypass"): 1,
        ("/v1/messages", "200", "uncacheable"): 1,
        ("/v1/messages", "200", "failed"): 1,
        ("/prewarm", "200", "prewarm-sent"): 3,
        ("/prewarm", "202", "prewarm-sent"): 1,
        ("/prewarm", "401", "none"): 1,
        ("passthrough", "200", "none"): 1,
    }
    # Every relayed Messages call is timed upstream, once.
    assert m.value("specproxy_upstream_ttfb_seconds_count", path="/v1/messages") == 7
    assert m.value("specproxy_upstream_seconds_count", path="/v1/messages") == 7
    assert m.value("specproxy_warm_mismatch_total") == 0
    # The scrape itself is counted once it has been answered.
    again = await scrape(http, proxy)
    assert again.value("specproxy_requests_total", path="/metrics", status="200", outcome="none") == 1


async def test_a_request_still_held_when_max_hold_passes_is_counted_as_timeout(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    async with run_proxy(sim.url, max_hold=0.0) as proxy:
        await prewarm(http, proxy, wait=False, **{"x-sim-gate": "warm"})
        h, _ = await ask(http, proxy)
        assert h["X-Cache-Warm"] == "timeout"
        await sim.open_gate("warm")
        await prewarm(http, proxy)  # deduplicated: answers once the warm has settled
        m = await scrape(http, proxy)
        assert m.series("specproxy_requests_total", "path", "status", "outcome") == {
            ("/prewarm", "202", "prewarm-sent"): 1,
            ("/v1/messages", "200", "timeout"): 1,
            ("/prewarm", "200", "prewarm-deduplicated"): 1,
        }
        assert m.series("specproxy_warms_total", "result", "mode") == {("warm", "0"): 1}


# --- warms ----------------------------------------------------------------------------------------


async def test_warms_are_counted_by_result_and_max_tokens_mode(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    await prewarm(http, proxy, warm_body(context("zero")))
    thinking = {**warm_body(context("thinking")), "thinking": {"type": "enabled", "budget_tokens": 1024}}
    assert (await prewarm(http, proxy, thinking))["state"] == "warm"
    assert (await prewarm(http, proxy, warm_body("too short to cache")))["state"] == "uncacheable"
    failing = await prewarm(http, proxy, warm_body(context("fault")), **{"x-sim-fault": "overloaded"})
    assert failing["state"] == "failed"

    m = await scrape(http, proxy)
    assert m.series("specproxy_warms_total", "result", "mode") == {
        ("warm", "0"): 1,
        ("warm", "1"): 1,  # thinking enabled refuses max_tokens 0: one token, streamed
        ("uncacheable", "0"): 1,
        ("failed", "0"): 1,
    }
    sent = [(e["max_tokens"], e["stream"]) for e in await sim.requests()]
    assert sorted(sent) == [(0, False), (0, False), (0, False), (1025, True)]
    assert (await status_json(http, proxy))["warms"] == {"warm": 2, "uncacheable": 1, "failed": 1}


async def test_a_warm_nobody_used_before_its_ttl_ran_out_is_counted_as_wasted(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    # A TTL scale this small makes the 5-minute TTL pass in about 30 ms.
    async with run_proxy(sim.url, cache_ttl_scale=0.0001) as proxy:
        await prewarm(http, proxy)

        async def wasted() -> bool:
            return (await scrape(http, proxy)).value("specproxy_warms_wasted_total") == 1

        await eventually(wasted)
        data = await status_json(http, proxy)
        assert data["warms_wasted"] == 1
        assert data["warms"] == {"warm": 1}


# --- tokens and dollars --------------------------------------------------------------------------------


async def test_tokens_by_kind_equal_the_usage_of_a_json_and_a_streaming_response(
    proxy: ProxyHandle, http: aiohttp.ClientSession
) -> None:
    _, body = await ask(http, proxy, question_body(context=context("json")))
    json_usage = kinds(body["usage"])
    assert json_usage["cache_write_5m"] > 0 and json_usage["cache_write_1h"] == 0

    # A 1-hour breakpoint on the context, a 5-minute one after it: the write splits between the TTLs.
    streamed = question_body(context=context("stream"), extra_blocks=1)
    streamed["messages"][0]["content"][0]["cache_control"]["ttl"] = "1h"
    streamed["messages"][0]["content"][1]["cache_control"] = {"type": "ephemeral"}
    h, start, delta = await ask_stream(http, proxy, streamed)
    assert h["X-Cache-Warm"] == "miss"
    stream_usage = stream_kinds(start, delta)
    assert stream_usage["cache_write_1h"] > 0 and stream_usage["cache_write_5m"] > 0

    m = await scrape(http, proxy)
    assert m.series("specproxy_tokens_total", "kind", "model") == token_series(total(json_usage, stream_usage))
    assert (await status_json(http, proxy))["tokens"] == {k: n for k, n in total(json_usage, stream_usage).items() if n}


async def test_a_hit_counts_the_warm_and_the_read_and_dollars_follow_the_pricing_table(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    await prewarm(http, proxy)
    _, hit = await ask(http, proxy)
    _, start, delta = await ask_stream(http, proxy, question_body(context=context("cold")))
    [warm] = await warm_usages(sim)
    usages = [kinds(warm), kinds(hit["usage"]), stream_kinds(start, delta)]
    assert usages[1]["cache_read"] > 0 and usages[1]["cache_read"] == usages[0]["cache_write_5m"]

    m = await scrape(http, proxy)
    assert m.series("specproxy_tokens_total", "kind", "model") == token_series(total(*usages))
    costs = [cost(Usage(**u), MODEL) for u in usages]
    spent = sum(s for s, _ in costs)
    saved = [uncached - s for s, uncached in costs]
    assert saved[0] < 0 < saved[1] and saved[2] < 0  # writes cost more than no caching; the read saves
    assert m.value("specproxy_dollars_spent_total") == pytest.approx(spent, rel=1e-9)
    assert m.value("specproxy_dollars_saved_total") == pytest.approx(saved[1], rel=1e-9)  # savings only
    assert m.value("specproxy_dollars_saved_net") == pytest.approx(sum(saved), rel=1e-9)
    data = await status_json(http, proxy)
    assert data["dollars_spent"] == pytest.approx(spent, abs=1e-6)
    assert data["dollars_saved"] == pytest.approx(sum(saved), abs=1e-6)


def test_cost_prices_each_kind_by_the_table_and_its_cache_multipliers() -> None:
    usage = Usage(input=1_000_000, cache_read=1_000_000, cache_write_5m=1_000_000, cache_write_1h=1_000_000,
                  output=1_000_000)
    # Sonnet 4.6: $3 in, $15 out; writes x1.25 (5m) and x2 (1h), reads x0.1.
    assert cost(usage, MODEL) == pytest.approx((3 + 0.3 + 3.75 + 6 + 15, 4 * 3 + 15))
    # Dated ids match their family; an unknown model is priced like Sonnet.
    assert cost(Usage(input=1_000_000), "claude-opus-4-1-20250805") == pytest.approx((15, 15))
    assert cost(Usage(output=1_000_000), "claude-haiku-4-5-20251001") == pytest.approx((5, 5))
    assert cost(Usage(input=1_000_000), "some-other-model") == pytest.approx((3, 3))


async def test_a_pricing_override_changes_the_dollars(sim: SimHandle, http: aiohttp.ClientSession) -> None:
    async with run_proxy(sim.url, pricing=[[MODEL, 1.0, 2.0]]) as proxy:
        _, body = await ask(http, proxy)
        u = kinds(body["usage"])
        expected = (u["input"] + 1.25 * u["cache_write_5m"] + 2 * u["output"]) / 1e6
        assert (await scrape(http, proxy)).value("specproxy_dollars_spent_total") == pytest.approx(expected)


# --- what the proxy said versus what the upstream did ----------------------------------------------


async def test_a_hit_whose_response_read_no_cache_is_counted_as_a_mismatch_and_logged(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession, records: list[logging.LogRecord]
) -> None:
    warm = await prewarm(http, proxy)
    await sim.reset()  # the upstream forgets its cache; the proxy still believes the prefix warm
    h, body = await ask(http, proxy)
    assert h["X-Cache-Warm"] == "hit"
    assert body["usage"]["cache_read_input_tokens"] == 0

    m = await scrape(http, proxy)
    assert m.value("specproxy_warm_mismatch_total") == 1
    assert (await status_json(http, proxy))["warm_mismatches"] == 1
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].name == "specproxy.accounting"
    assert warm["prefix"] in warnings[0].getMessage() and "hit" in warnings[0].getMessage()
    [line] = [line for line in access_lines(records) if line["path"] == "/v1/messages"]
    assert line["mismatch"] is True and line["outcome"] == "hit"


async def test_a_hit_that_read_the_cache_is_no_mismatch(
    proxy: ProxyHandle, http: aiohttp.ClientSession, records: list[logging.LogRecord]
) -> None:
    await prewarm(http, proxy)
    h, _ = await ask(http, proxy)
    assert h["X-Cache-Warm"] == "hit"
    assert (await scrape(http, proxy)).value("specproxy_warm_mismatch_total") == 0
    assert not [r for r in records if r.levelno >= logging.WARNING]


# --- held, coalesced, injected -------------------------------------------------------------------------


async def test_the_held_gauge_counts_requests_waiting_for_a_warm(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    warm = await prewarm(http, proxy, wait=False, **{"x-sim-gate": "warm"})
    questions = [asyncio.create_task(ask(http, proxy, question_body(f"question {i}?"))) for i in range(2)]
    await proxy.until_held(2)
    assert (await scrape(http, proxy)).value("specproxy_held_requests") == 2
    data = await status_json(http, proxy, headers={"x-api-key": KEY_A})  # the tenant's own view
    assert data["held"] == 2 and data["warms_in_flight"] == 1
    assert [(row["prefix"], row["state"]) for row in data["registry"]] == [(warm["prefix"], "warming")]
    await sim.open_gate("warm")
    assert [h["X-Cache-Warm"] for h, _ in await asyncio.gather(*questions)] == ["held", "held"]
    m = await scrape(http, proxy)
    assert m.value("specproxy_held_requests") == 0
    assert m.value("specproxy_hold_seconds_count") == 2
    assert m.value("specproxy_coalesced_total") == 0  # held behind an app's /prewarm, not a request


async def test_a_held_request_whose_client_left_is_counted_as_499_and_leaves_the_gauge(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    await prewarm(http, proxy, wait=False, **{"x-sim-gate": "warm"})
    question = asyncio.create_task(ask(http, proxy))
    await proxy.until_held(1)
    question.cancel()  # the client gives up while held: its connection closes
    with contextlib.suppress(asyncio.CancelledError):
        await question

    async def counted() -> bool:
        requests = (await scrape(http, proxy)).series("specproxy_requests_total", "path", "status", "outcome")
        return requests.get(("/v1/messages", "499", "abandoned")) == 1

    await eventually(counted)
    assert (await scrape(http, proxy)).value("specproxy_held_requests") == 0
    await sim.state.gates.wait_for_waiters("warm", 1)
    await sim.open_gate("warm")
    assert [e["max_tokens"] for e in await sim.requests()] == [0]  # nothing was sent for the question


async def test_an_injected_breakpoint_is_counted(sim: SimHandle, http: aiohttp.ClientSession) -> None:
    async with run_proxy(sim.url, inject_breakpoints=True) as proxy:
        await prewarm(http, proxy)
        body = question_body()
        del body["messages"][0]["content"][0]["cache_control"]
        h, answer = await ask(http, proxy, body)
        assert h["X-Cache-Warm"] == "hit" and h["X-Cache-Warm-Injected"] == "1"
        assert answer["usage"]["cache_read_input_tokens"] > 0
        assert (await scrape(http, proxy)).value("specproxy_breakpoints_injected_total") == 1


# --- tenant label -------------------------------------------------------------------------------------


async def test_metrics_carry_no_tenant_label_by_default(proxy: ProxyHandle, http: aiohttp.ClientSession) -> None:
    await prewarm(http, proxy)
    await ask(http, proxy)
    m = await scrape(http, proxy)
    assert m.samples and not [s for s in m.samples if "tenant" in s.labels]
    assert tenant_digest(KEY_A)[:16] not in m.text


async def test_the_tenant_label_is_the_credential_digest_prefix_never_the_credential(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    async with run_proxy(sim.url, metrics_tenant_label=True) as proxy:
        await prewarm(http, proxy)
        await ask(http, proxy)
        await ask(http, proxy, question_body(context=context("b")), key=KEY_B)
        m = await scrape(http, proxy)
    a, b = tenant_digest(KEY_A)[:16], tenant_digest(KEY_B)[:16]
    assert len(a) == 16 and int(a, 16) >= 0
    assert m.series("specproxy_requests_total", "path", "status", "outcome", "tenant") == {
        ("/prewarm", "200", "prewarm-sent", a): 1,
        ("/v1/messages", "200", "hit", a): 1,
        ("/v1/messages", "200", "miss", b): 1,
    }
    assert m.series("specproxy_warms_total", "result", "mode", "tenant") == {("warm", "0", a): 1}
    assert {labels[2] for labels in m.series("specproxy_tokens_total", "kind", "model", "tenant")} == {a, b}
    for secret in (KEY_A, KEY_B, tenant_digest(KEY_A), tenant_digest(KEY_B)):
        assert secret not in m.text


# --- the access log ---------------------------------------------------------------------------------------


async def test_one_access_line_per_request_with_ids_states_and_counts(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession, records: list[logging.LogRecord]
) -> None:
    warm = await prewarm(http, proxy)
    hit_headers, hit = await ask(http, proxy)
    stream_headers, start, delta = await ask_stream(http, proxy, question_body(context=context("s")))
    async with http.get(proxy.url + "/v1/models", headers=headers()) as r:
        assert r.status == 200
    await eventually(lambda: len(access_lines(records)) == 4)
    lines = access_lines(records)
    assert [(x["method"], x["path"], x["status"], x.get("outcome")) for x in lines] == [
        ("POST", "/prewarm", 200, "prewarm-sent"),
        ("POST", "/v1/messages", 200, "hit"),
        ("POST", "/v1/messages", 200, "miss"),
        ("GET", "/v1/models", 200, None),
    ]
    for line in lines:
        assert {"time", "level", "logger", "msg"} <= line.keys()
        assert (line["level"], line["logger"], line["msg"]) == ("info", "specproxy.access", "request")
        assert isinstance(line["ms"], float | int) and line["ms"] >= 0
        assert "tenant" not in line
    assert lines[0]["prefix"] == warm["prefix"]
    hit_line, stream_line = lines[1], lines[2]
    assert hit_line["prefix"] == warm["prefix"] and hit_line["wait_ms"] == 0
    assert hit_line["model"] == MODEL
    assert hit_line["usage"] == kinds(hit["usage"])
    assert hit_line["upstream_request_id"] == hit_headers["request-id"]
    assert stream_line["prefix"] is None and stream_line["wait_ms"] == 0
    assert stream_line["usage"] == stream_kinds(start, delta)
    assert stream_line["upstream_request_id"] == stream_headers["request-id"]
    for line in (hit_line, stream_line):
        assert {"upstream_ttfb_ms", "upstream_ms"} <= line.keys()
        assert "mismatch" not in line


async def test_log_lines_carry_no_credential_body_or_prompt_text(
    proxy: ProxyHandle, sim: SimHandle, http: aiohttp.ClientSession, records: list[logging.LogRecord]
) -> None:
    await prewarm(http, proxy)
    await sim.reset()  # makes the next hit a mismatch: its warning line is checked too
    await ask(http, proxy)
    await ask_stream(http, proxy, question_body(context=context("s")))
    await ask(http, proxy, {"model": MODEL, "max_tokens": -1, "messages": [{"role": "user", "content": "secret?"}]})
    async with http.post(proxy.url + "/prewarm", data=b"{not json", headers=headers(KEY_B)) as r:
        assert r.status == 400
    await eventually(lambda: len(access_lines(records)) == 5)
    assert any(r.levelno == logging.WARNING for r in records)
    forbidden = (KEY_A, KEY_B, tenant_digest(KEY_A)[:16], tenant_digest(KEY_B)[:16], "function_", QUESTION,
                 "secret?", "not json", CONTEXT[:40])
    for fmt in (JSONFormatter(), TextFormatter()):
        for record in records:
            line = fmt.format(record)
            for text in forbidden:
                assert text not in line, (text, line)


async def test_the_json_formatter_writes_one_parseable_line_and_the_text_one_key_values(
    proxy: ProxyHandle, http: aiohttp.ClientSession, records: list[logging.LogRecord]
) -> None:
    await prewarm(http, proxy)
    await ask(http, proxy)
    await eventually(lambda: len(access_lines(records)) == 2)
    access = [r for r in records if r.name == "specproxy.access"]
    json_line = JSONFormatter().format(access[1])
    assert "\n" not in json_line
    parsed = orjson.loads(json_line)
    assert parsed["outcome"] == "hit" and parsed["time"].endswith("Z")
    text_line = TextFormatter().format(access[1])
    assert "\n" not in text_line
    assert " specproxy.access: request " in text_line
    assert "method=POST" in text_line and "path=/v1/messages" in text_line and "outcome=hit" in text_line


# --- /status.json ---------------------------------------------------------------------------------------


ROW_KEYS = {"prefix", "state", "breakpoints", "age_s", "uses", "expires_in_s", "mode", "error"}


async def test_status_json_shows_outcomes_tokens_and_the_registry_without_content(
    proxy: ProxyHandle, http: aiohttp.ClientSession
) -> None:
    warm = await prewarm(http, proxy)
    _, hit = await ask(http, proxy)
    await ask(http, proxy, question_body(context=context("miss")))
    async with http.get(proxy.url + "/status.json", headers={"x-api-key": KEY_A}) as r:  # its own rows
        assert r.status == 200
        raw = await r.text()
    data = orjson.loads(raw)
    assert data["outcomes"] == {"prewarm-sent": 1, "hit": 1, "miss": 1}
    assert data["held"] == 0 and data["warms_in_flight"] == 0 and data["uptime_s"] >= 0
    m = await scrape(http, proxy)
    tokens = {kind: int(n) for (kind, _), n in m.series("specproxy_tokens_total", "kind", "model").items()}
    assert data["tokens"] == tokens
    assert tokens["cache_read"] == hit["usage"]["cache_read_input_tokens"]
    assert data["registry_size"] == len(data["registry"]) == 2  # the prewarm, and the miss that led its prefix
    assert m.value("specproxy_registry_entries") == 2  # one entry per breakpoint: one each here
    assert m.value("specproxy_registry_degraded") == 0
    rows = {row["prefix"]: row for row in data["registry"]}
    prewarmed = rows[warm["prefix"]]
    assert (prewarmed["state"], prewarmed["uses"], prewarmed["mode"]) == ("warm", 1, "max_tokens 0")
    assert prewarmed["age_s"] >= 0 and prewarmed["expires_in_s"] > 0
    for row in data["registry"]:
        assert {"prefix", "state", "age_s", "uses", "expires_in_s"} <= row.keys() <= ROW_KEYS
        assert len(row["prefix"]) == 16 and int(row["prefix"], 16) >= 0
    for text in (KEY_A, tenant_digest(KEY_A)[:16], "function_", QUESTION):
        assert text not in raw


@pytest.mark.parametrize("path", ["/status", "/status.json"])
async def test_the_admin_token_guards_the_status_page_and_its_json(
    sim: SimHandle, http: aiohttp.ClientSession, path: str, records: list[logging.LogRecord]
) -> None:
    async with run_proxy(sim.url, admin_token="let-me-see") as proxy:
        url = proxy.url + path
        async with http.get(url) as r:
            assert r.status == 401
            assert (await r.json())["error"]["type"] == "authentication_error"
        async with http.get(url, headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with http.get(url, params={"token": "wrong"}) as r:
            assert r.status == 401
        async with http.get(url, headers={"Authorization": "Bearer let-me-see"}) as r:
            assert r.status == 200
        async with http.get(url, params={"token": "let-me-see"}) as r:
            assert r.status == 200
            assert r.headers["Cache-Control" if path == "/status" else "Content-Type"]
        await eventually(lambda: len(access_lines(records)) == 5)
    assert [(line["path"], line["status"]) for line in access_lines(records)] == [(path, 401)] * 3 + [(path, 200)] * 2
    for record in records:
        assert "let-me-see" not in JSONFormatter().format(record)  # the query string is never logged


async def test_without_an_admin_token_the_status_page_is_open(proxy: ProxyHandle, http: aiohttp.ClientSession) -> None:
    async with http.get(proxy.url + "/status") as r:
        assert r.status == 200 and r.content_type == "text/html"
        page = await r.text()
    assert "<title>specproxy status</title>" in page and "status.json" in page
