"""``/_sim/*`` endpoints, the request log, and the plain endpoints (/, /healthz, models, 404)."""

from __future__ import annotations

import hashlib
import time

import orjson

from specproxy.sim import tenant_digest
from specproxy.testing import SimHandle

from .helpers import KEY, MODEL, OTHER_KEY, Api, cached, text

SECRET_TEXT = text(3000, "do-not-log-this-prompt")


async def test_the_request_log_records_the_sha256_of_the_exact_bytes(api: Api, sim: SimHandle) -> None:
    body = orjson.dumps({"model": MODEL, "max_tokens": 3, "system": [cached(SECRET_TEXT)],
                         "messages": [{"role": "user", "content": "hi"}]}) + b"  \n"
    before = time.monotonic()
    await api.post("/v1/messages?beta=true", body)
    entry = (await sim.requests())[-1]
    assert entry["sha256"] == hashlib.sha256(body).hexdigest() and entry["size"] == len(body)
    assert entry["method"] == "POST" and entry["path"] == "/v1/messages" and entry["query"] == "beta=true"
    assert before <= entry["received_at"] <= entry["response_started_at"] <= time.monotonic()
    assert entry["tenant"] == hashlib.sha256(KEY.encode()).hexdigest()[:16] == tenant_digest(KEY)
    assert (entry["max_tokens"], entry["stream"], entry["status"]) == (3, False, 200)
    assert entry["usage"]["cache_creation_input_tokens"] == 3000


async def test_the_request_log_never_holds_a_key_or_prompt_text(api: Api, sim: SimHandle) -> None:
    await api.messages({"system": [cached(SECRET_TEXT)], "messages": [{"role": "user", "content": "hi"}]})
    dump = orjson.dumps(await sim.requests()) + orjson.dumps(await sim.stats())
    assert KEY.encode() not in dump and b"do-not-log-this-prompt" not in dump


async def test_stats_count_writes_and_reads_per_tenant(api: Api, sim: SimHandle) -> None:
    body = {"system": [cached(SECRET_TEXT)], "messages": [{"role": "user", "content": "hi"}]}
    for key in (KEY, KEY, KEY, OTHER_KEY):
        await api.messages(body, key=key)
    stats = await sim.stats()
    assert {k: stats[k] for k in ("requests", "cache_writes", "cache_reads", "tokens_written", "tokens_read")} == {
        "requests": 4, "cache_writes": 2, "cache_reads": 2, "tokens_written": 6000, "tokens_read": 6000}
    mine = stats["by_tenant"][tenant_digest(KEY)]
    assert (mine["requests"], mine["cache_writes"], mine["cache_reads"]) == (3, 1, 2)
    assert stats["by_path"]["/v1/messages"] == 4
    assert sim.state.totals.cache_writes == 2  # the same numbers, in-process


async def test_reset_clears_cache_counters_and_log(api: Api, sim: SimHandle) -> None:
    body = {"system": [cached(SECRET_TEXT)], "messages": [{"role": "user", "content": "hi"}]}
    await api.messages(body)
    await sim.reset()
    assert (await sim.stats())["requests"] == 0 and await sim.requests() == []
    assert (await api.messages(body)).usage["cache_read_input_tokens"] == 0


async def test_every_response_carries_a_request_id(api: Api) -> None:
    for reply in (await api.get("/healthz"), await api.get("/v1/models"), await api.get("/nowhere"),
                  await api.post("/v1/messages", b"{}")):
        assert reply.headers["request-id"].startswith("req_")


async def test_an_unknown_path_is_a_404_in_the_api_error_shape(api: Api) -> None:
    reply = await api.get("/v1/nowhere")
    assert reply.status == 404 and reply.body["error"]["type"] == "not_found_error"


async def test_root_answers_head_and_get_and_healthz_is_ok(api: Api, sim: SimHandle) -> None:
    async with api.session.head(sim.url + "/") as head:
        assert head.status == 200
    assert (await api.get("/", headers={})).status == 200
    assert (await api.get("/healthz", headers={})).body == {"status": "ok"}


async def test_models_are_listed_in_pages(api: Api) -> None:
    first = (await api.get("/v1/models?limit=2")).body
    assert len(first["data"]) == 2 and first["has_more"] is True
    assert first["first_id"] == first["data"][0]["id"] and first["last_id"] == first["data"][1]["id"]
    assert set(first["data"][0]) >= {"type", "id", "display_name", "created_at"}
    rest = (await api.get(f"/v1/models?limit=1000&after_id={first['last_id']}")).body
    assert rest["has_more"] is False and first["last_id"] not in [m["id"] for m in rest["data"]]


async def test_count_tokens_needs_no_max_tokens(api: Api) -> None:
    reply = await api.post("/v1/messages/count_tokens",
                           {"model": MODEL, "messages": [{"role": "user", "content": text(10, "c")}]})
    assert reply.status == 200 and reply.body == {"input_tokens": 10}
