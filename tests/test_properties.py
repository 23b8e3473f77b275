"""Property tests: the prefix chain's invariants, and arbitrary bodies against every endpoint.

The endpoint properties run the simulator and the proxy in a background thread (their own event
loop) so hypothesis can drive plain synchronous HTTP at them, one example after another.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import http.client
import json
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from specproxy.prefix import PrefixError, compute, tenant_digest
from specproxy.testing import run_proxy, run_sim
from tests.conftest import KEY_A, MODEL, question_body

T = tenant_digest("property-tenant")

text = st.text(min_size=1, max_size=40)
block = st.fixed_dictionaries({"type": st.just("text"), "text": text})
blocks = st.lists(block, min_size=1, max_size=12)


def as_body(bs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": bs}]}


@given(blocks, blocks)
def test_appending_blocks_never_changes_earlier_chain_values(first: list[Any], more: list[Any]) -> None:
    a = compute(as_body(first), T).chain
    b = compute(as_body(first + more), T).chain
    assert b[: len(a)] == a


@given(blocks, st.data())
def test_key_order_and_cache_control_placement_do_not_change_identity(bs: list[Any], data: st.DataObject) -> None:
    shuffled = [dict(reversed(list(b.items()))) for b in bs]
    marked = copy.deepcopy(bs)
    for i in data.draw(st.sets(st.integers(0, len(bs) - 1), max_size=4)):
        marked[i]["cache_control"] = {"type": "ephemeral"}
    base = compute(as_body(bs), T).chain
    assert compute(as_body(shuffled), T).chain == base
    assert compute(as_body(marked), T).chain == base


@given(blocks, st.data())
def test_any_change_to_an_earlier_block_changes_every_later_value(bs: list[Any], data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(bs) - 1))
    changed = copy.deepcopy(bs)
    changed[i]["text"] = data.draw(text.filter(lambda t: t != bs[i]["text"]))
    a, b = compute(as_body(bs), T).chain, compute(as_body(changed), T).chain
    assert a[:i] == b[:i]
    assert all(x != y for x, y in zip(a[i:], b[i:], strict=True))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_compute_raises_only_prefix_error_on_any_json(value: Any) -> None:
    body = value if isinstance(value, dict) else {"model": MODEL, "messages": value}
    with contextlib.suppress(PrefixError):
        compute(body, T)


# --- arbitrary bodies against the running proxy ---------------------------------------------------

class Servers:
    """A simulator and a proxy on their own event loop in a background thread."""

    def __init__(self, **settings: Any) -> None:
        self.settings = {"max_hold": 0.2, **settings}
        self.proxy = self.sim = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with run_sim(time_scale=0.0) as sim, run_proxy(sim.url, **self.settings) as proxy:
            self.sim, self.proxy = sim.url, proxy.url
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> Servers:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def request(base: str, method: str, path: str, body: bytes | None, hdrs: dict[str, str]) -> tuple[int, bytes]:
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    with Servers() as s:
        yield s


HEADERS = {"x-api-key": KEY_A, "anthropic-version": "2023-06-01", "content-type": "application/json"}
VALID = json.dumps(question_body()).encode()

bodies = st.one_of(
    st.binary(max_size=300),
    st.integers(0, len(VALID)).map(lambda n: VALID[:n]),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["model", "messages", "system", "tools", "cache_control", "max_tokens"]),
                    json_values, max_size=6).map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_any_body_to_messages_is_forwarded_byte_for_byte_and_never_crashes(servers: Servers, body: bytes) -> None:
    marker = hashlib.sha256(body).hexdigest()
    status, payload = request(servers.proxy, "POST", "/v1/messages?probe=" + marker[:12], body, HEADERS)
    assert status < 500, payload[:200]
    _, log_raw = request(servers.sim, "GET", "/_sim/requests", None, {})
    log = [e for e in json.loads(log_raw) if e["path"] == "/v1/messages" and marker[:12] in e["query"]]
    assert log
    # An empty body has no bytes to read: the simulator logs no digest for it.
    assert log[-1]["sha256"] == (marker if body else None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from(["/prewarm", "/prewarm?wait=1", "/v1/messages/count_tokens"]))
def test_any_body_to_the_other_endpoints_gets_an_answer_never_a_crash(servers: Servers, body: bytes, path: str) -> None:
    status, payload = request(servers.proxy, "POST", path, body, HEADERS)
    assert status < 500, payload[:200]
    if status >= 400:
        error = json.loads(payload)
        assert error["type"] == "error" and error["error"]["type"]
    status, _ = request(servers.proxy, "GET", "/healthz", None, {})
    assert status == 200


# --- Messages-shaped bodies whose every field may be any JSON ---------------------------------------
# Random dictionaries rarely look like a Messages request, so they never reach the prefix chain's
# corners; these do: a block's ``type``, its ``cache_control`` and ``ttl``, a message's ``role`` and
# ``content`` are each either a plausible value or arbitrary JSON.

http_request = request  # the module's HTTP helper (the tests below take pytest's ``request``)
anything = json_values | st.integers(min_value=2**63, max_value=2**70)  # beyond 64 bits, too
shaped_ttl = st.sampled_from(["5m", "1h"]) | anything
shaped_cc = st.fixed_dictionaries({"type": st.just("ephemeral") | anything}, optional={"ttl": shaped_ttl}) | anything
shaped_block = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "document", "tool_use", "tool_result", "thinking"]) | anything},
    optional={"text": text | anything, "cache_control": shaped_cc, "content": anything, "source": anything,
              "input": anything, "id": anything, "tool_use_id": anything},
)
shaped_content = st.text(max_size=30) | st.lists(shaped_block | anything, max_size=5) | anything
shaped_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]) | anything,
                                        "content": shaped_content})
shaped_bodies = st.fixed_dictionaries(
    {"model": st.just(MODEL) | anything, "messages": st.lists(shaped_message, min_size=1, max_size=4) | anything},
    optional={
        "system": st.text(max_size=30) | st.lists(shaped_block, max_size=3) | anything,
        "tools": st.lists(st.fixed_dictionaries({"name": text, "input_schema": anything},
                                                optional={"cache_control": shaped_cc}), max_size=3) | anything,
        "max_tokens": st.integers(0, 64) | anything,
        "stream": st.booleans() | anything,
        "cache_control": shaped_cc,
    },
).map(lambda d: json.dumps(d).encode())


@given(shaped_bodies)
def test_compute_raises_only_prefix_error_on_messages_shaped_json(raw: bytes) -> None:
    try:
        body = orjson.loads(raw)  # parsed as the proxy parses them (big integers become floats)
    except orjson.JSONDecodeError:
        assume(False)  # infinities: not JSON, never identified
    with contextlib.suppress(PrefixError):
        compute(body, T)


@pytest.fixture(scope="module")
def speculative() -> Iterator[Servers]:
    """Every speculation behaviour on: coalescing, breakpoint injection, next-turn and keep-warm."""
    with Servers(coalesce=True, inject_breakpoints=True, next_turn=True, keep_warm=True) as s:
        yield s


def _upstream_status(servers: Servers, marker: str) -> int | None:
    _, log_raw = http_request(servers.sim, "GET", "/_sim/requests", None, {})
    found = [e for e in json.loads(log_raw) if e["path"] == "/v1/messages" and marker in e["query"]]
    return found[-1]["status"] if found else None


@pytest.mark.parametrize("which", ["servers", "speculative"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=shaped_bodies)
def test_a_messages_shaped_body_is_forwarded_and_never_answered_5xx_by_the_proxy(
    request: pytest.FixtureRequest, which: str, body: bytes
) -> None:
    servers: Servers = request.getfixturevalue(which)
    marker = hashlib.sha256(body).hexdigest()[:12]
    status, payload = http_request(servers.proxy, "POST", "/v1/messages?probe=" + marker, body, HEADERS)
    upstream = _upstream_status(servers, marker)
    assert upstream is not None, "it went upstream"
    assert status < 500 or status == upstream, payload[:200]  # a 5xx only ever the upstream's own
    if which == "servers":  # nothing rewrites it (injection is off): the upstream got the client's bytes
        _, log_raw = http_request(servers.sim, "GET", "/_sim/requests", None, {})
        entry = [e for e in json.loads(log_raw) if marker in e["query"]][-1]
        assert entry["sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("which", ["servers", "speculative"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=shaped_bodies, path=st.sampled_from(["/prewarm", "/prewarm?wait=1", "/v1/messages/count_tokens"]))
def test_a_messages_shaped_body_to_the_other_endpoints_gets_an_answer_never_a_crash(
    request: pytest.FixtureRequest, which: str, body: bytes, path: str
) -> None:
    servers: Servers = request.getfixturevalue(which)
    status, payload = http_request(servers.proxy, "POST", path, body, HEADERS)
    assert status < 500, payload[:200]
    if status >= 400:
        error = json.loads(payload)
        assert error["type"] == "error" and error["error"]["type"]
    for probe in ("/healthz", "/status.json"):
        assert http_request(servers.proxy, "GET", probe, None, {})[0] == 200
