"""``/openapi.json``: served as committed, valid, and in step with the routes ``create_app`` registers.

The route check reads ``app.router`` itself, so an endpoint added later without documentation (or
documented and then removed) fails here by name.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from specproxy import outcome as hold
from specproxy.admin import OPENAPI_PATH
from specproxy.app import create_app
from specproxy.config import Settings
from specproxy.registry import State
from specproxy.testing import ProxyHandle, run_proxy, run_sim

RAW = Path(OPENAPI_PATH).read_bytes()
DOC: dict[str, Any] = json.loads(RAW)
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# The pass-through: every other path goes upstream untouched; /v1/messages is documented on its own.
CATCH_ALL = re.compile(r"^/\{\w+\}$")
HEADERS = {"x-api-key": "sk-ant-openapi-test", "anthropic-version": "2023-06-01"}
WARM = {
    "model": "claude-sonnet-4-6",
    "messages": [{"role": "user", "content": [{"type": "text", "text": "def f(x):\n    return x\n" * 400}]}],
}


def _routes() -> set[tuple[str, str]]:
    """(method, path template) of every route the app registers, HEAD and the catch-all aside."""
    app = create_app(Settings())
    out: set[tuple[str, str]] = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method == "HEAD" or (route.method == "*" and CATCH_ALL.match(path)):
            continue
        out.add((route.method.lower(), path))
    return out


def _documented() -> set[tuple[str, str]]:
    return {(m, path) for path, item in DOC["paths"].items() for m in item if m in METHODS}


def _schema(name: str) -> dict[str, Any]:
    """A component schema with its ``$ref``s resolvable (the whole document rides along)."""
    return {"$ref": f"#/components/schemas/{name}", "components": DOC["components"]}


def _validate(instance: Any, name: str) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    jsonschema.Draft202012Validator(_schema(name)).validate(instance)


@pytest.fixture
async def proxy() -> AsyncIterator[ProxyHandle]:
    async with run_sim(time_scale=0.0) as sim, run_proxy(sim.url) as p:
        yield p


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# --- the document and the routes ---------------------------------------------------------------
def test_every_registered_route_is_documented() -> None:
    missing = _routes() - _documented()
    assert not missing, f"routes missing from specproxy/openapi.json: {sorted(missing)}"


def test_every_documented_operation_is_a_registered_route() -> None:
    extra = _documented() - _routes()
    assert not extra, f"documented but not registered by create_app: {sorted(extra)}"


def test_the_catch_all_pass_through_is_still_registered() -> None:
    app = create_app(Settings())
    assert any(r.method == "*" and CATCH_ALL.match(r.resource.canonical) for r in app.router.routes() if r.resource)


def test_document_is_valid_openapi_3_1() -> None:
    assert DOC["openapi"].startswith("3.1.")
    validator = pytest.importorskip("openapi_spec_validator", reason="openapi-spec-validator is not installed")
    validator.validate(DOC)


def test_document_version_is_the_package_version() -> None:
    from specproxy import __version__

    assert DOC["info"]["version"] == __version__


def test_x_cache_warm_values_are_exactly_the_proxy_outcomes() -> None:
    outcomes = {str(o) for o in hold.Outcome}
    headers = DOC["components"]["headers"]
    assert set(headers["XCacheWarm"]["schema"]["enum"]) == outcomes
    for value in outcomes:
        assert f"`{value}`" in headers["XCacheWarm"]["description"]


def test_messages_responses_document_the_three_x_cache_warm_headers() -> None:
    documented = DOC["paths"]["/v1/messages"]["post"]["responses"]["200"]["headers"]
    assert {hold.HEADER, hold.HEADER_WAIT, hold.HEADER_PREFIX} <= set(documented)


def test_warm_states_are_exactly_the_registry_states() -> None:
    assert set(DOC["components"]["schemas"]["WarmStateName"]["enum"]) == {str(s) for s in State}


def test_a_rate_limited_prewarm_documents_retry_after() -> None:
    assert "retry-after" in DOC["paths"]["/prewarm"]["post"]["responses"]["429"]["headers"]


# --- what the running proxy serves -----------------------------------------------------------------
async def test_served_document_is_the_committed_file(proxy: ProxyHandle, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{proxy.url}/openapi.json") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.read() == RAW


async def test_prewarm_and_state_answers_match_their_schemas(proxy: ProxyHandle, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{proxy.url}/prewarm", json=WARM, headers=HEADERS) as resp:
        assert resp.status == 202
        accepted = await resp.json()
    _validate(accepted, "PrewarmAccepted")
    async with http.post(f"{proxy.url}/prewarm?wait=1", json=WARM, headers=HEADERS) as resp:
        assert resp.status == 200
        _validate(await resp.json(), "PrewarmAccepted")
    async with http.get(f"{proxy.url}/prewarm/{accepted['prefix']}", headers=HEADERS) as resp:
        assert resp.status == 200
        _validate(await resp.json(), "WarmState")


async def test_error_answers_match_the_error_schema(proxy: ProxyHandle, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{proxy.url}/prewarm", json=WARM) as resp:  # no credential
        assert resp.status == 401
        _validate(await resp.json(), "Error")
    async with http.get(f"{proxy.url}/prewarm/0123456789abcdef", headers=HEADERS) as resp:
        assert resp.status == 404
        _validate(await resp.json(), "Error")


async def test_health_and_status_answers_match_their_schemas(proxy: ProxyHandle, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{proxy.url}/healthz") as resp:
        assert resp.status == 200
        _validate(await resp.json(), "Health")
    async with http.post(f"{proxy.url}/prewarm?wait=1", json=WARM, headers=HEADERS) as resp:
        assert resp.status == 200
    async with http.get(f"{proxy.url}/status.json") as resp:
        assert resp.status == 200
        _validate(await resp.json(), "Status")
    async with http.get(f"{proxy.url}/metrics") as resp:
        assert resp.status == 200
        assert "text/plain" in DOC["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
        assert resp.content_type == "text/plain"
    async with http.get(f"{proxy.url}/status") as resp:
        assert resp.status == 200
        assert resp.content_type in DOC["paths"]["/status"]["get"]["responses"]["200"]["content"]
