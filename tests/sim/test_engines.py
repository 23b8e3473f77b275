"""Engine dialects: vLLM, SGLang and llama.cpp's /v1/messages, each as its server answers it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import orjson
import pytest

from specproxy.testing import SimHandle, run_sim
from specproxy.upstream_profile import detect

from ..conftest import eventually
from .helpers import MODEL, text

CONTEXT = text(410, "context")  # 410 tokens: 25 full blocks of 16 and 10 tokens more


def body(question: str = "What is it?", **extra: Any) -> dict[str, Any]:
    """A question after the shared context; ``cache_control`` is ignored by every engine."""
    content = [{"type": "text", "text": CONTEXT, "cache_control": {"type": "ephemeral"}},
               {"type": "text", "text": question}]
    return {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": content}], **extra}


async def post(sim: SimHandle, payload: Any, **headers: str) -> tuple[int, Any, Any]:
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    async with sim.session.post(sim.url + "/v1/messages", data=data,
                                headers={"content-type": "application/json", **headers}) as resp:
        raw = await resp.read()
        return resp.status, resp.headers, orjson.loads(raw) if raw and not raw.startswith(b"event:") else raw


@pytest.fixture
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[SimHandle]:
    dialect, report = request.param
    async with run_sim(dialect=dialect, cache_report=report, reply_tokens=12) as sim:
        yield sim


def engines(*names: str, report: bool = True) -> Any:
    return pytest.mark.parametrize("engine", [(n, report) for n in names], indirect=True, ids=list(names))


# --- max_tokens ---------------------------------------------------------------------------------------

@engines("vllm")
async def test_vllm_refuses_max_tokens_zero_in_its_own_shape(engine: SimHandle) -> None:
    status, headers, err = await post(engine, body(max_tokens=0))
    assert status == 400
    assert set(err) == {"error"} and err["error"]["type"] == "Bad Request" and err["error"]["code"] == 400
    assert err["error"]["param"] == "body.max_tokens" and "max_tokens must be positive" in err["error"]["message"]
    assert headers["server"] == "uvicorn"


@engines("sglang")
async def test_sglang_refuses_max_tokens_not_positive(engine: SimHandle) -> None:
    for value in (0, -1):
        status, _, err = await post(engine, body(max_tokens=value))
        assert status == 400
        assert err["object"] == "error" and err["code"] == 400 and err["type"] == "Bad Request"
        assert "max_tokens must be positive" in err["message"]


@engines("llamacpp")
async def test_llamacpp_max_tokens_zero_evaluates_the_prompt_into_the_cache(engine: SimHandle) -> None:
    status, _, warm = await post(engine, body(max_tokens=0))
    assert status == 200 and warm["content"] == [] and warm["usage"]["output_tokens"] == 0
    _, _, again = await post(engine, body("Something else?"))
    assert again["usage"]["cache_read_input_tokens"] == 410  # the context the warm left in the slot
    _, _, raw = await post(engine, body(max_tokens=0, stream=True))
    assert b"message_start" not in raw  # llama.cpp's message_start rides the first generated token
    assert raw.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


# --- caching: automatic, at the engine's granularity ---------------------------------------------------

@engines("vllm")
async def test_vllm_caches_full_16_token_blocks(engine: SimHandle) -> None:
    _, _, first = await post(engine, body())
    total = first["usage"]["input_tokens"]  # 410 context + 3 question tokens
    assert (total, first["usage"]["cache_read_input_tokens"]) == (413, 0)
    _, _, second = await post(engine, body("Which one?"))  # shares the 410 context tokens
    assert second["usage"]["cache_read_input_tokens"] == 400  # full blocks only
    assert second["usage"]["cache_creation_input_tokens"] == 0
    _, _, same = await post(engine, body())  # a full hit still recomputes the last token
    assert same["usage"]["cache_read_input_tokens"] == (413 - 1) // 16 * 16


@engines("sglang")
async def test_sglang_caches_every_shared_token(engine: SimHandle) -> None:
    await post(engine, body())
    _, _, second = await post(engine, body("Which one?"))
    usage = second["usage"]
    assert usage["cache_read_input_tokens"] == 410
    assert usage["input_tokens"] == 413  # SGLang's input_tokens include the cached tokens
    assert "cache_creation_input_tokens" not in usage


@engines("llamacpp")
async def test_llamacpp_reuses_the_prefix_of_a_slots_last_prompt(engine: SimHandle) -> None:
    _, headers, first = await post(engine, body())
    assert headers["server"] == "llama.cpp"
    assert first["usage"] == {"cache_read_input_tokens": 0, "input_tokens": 413, "output_tokens": 12}
    _, _, second = await post(engine, body("Which one?"))
    assert second["usage"]["cache_read_input_tokens"] == 410
    await post(engine, {"model": MODEL, "max_tokens": 4,
                                      "messages": [{"role": "user", "content": "unrelated"}]})
    _, _, back = await post(engine, body("Which one?"))  # one slot: the unrelated prompt replaced it
    assert back["usage"]["cache_read_input_tokens"] == 0


async def test_llamacpp_picks_the_slot_whose_prompt_it_shares() -> None:
    async with run_sim(dialect="llamacpp", engine_slots=2, reply_tokens=4) as sim:
        await post(sim, body())
        await post(sim, {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "unrelated"}]})
        _, _, back = await post(sim, body("Which one?"))
        assert back["usage"]["cache_read_input_tokens"] == 410
        async with sim.session.get(sim.url + "/slots") as resp:
            assert [s["is_processing"] for s in await resp.json()] == [False, False]


async def test_the_block_size_is_an_option() -> None:
    async with run_sim(dialect="vllm", cache_report=True, engine_block_tokens=64, reply_tokens=4) as sim:
        await post(sim, body())
        _, _, second = await post(sim, body("Which one?"))
        assert second["usage"]["cache_read_input_tokens"] == 410 // 64 * 64


# --- usage: reads only, and only with the reporting flag --------------------------------------------------

@engines("vllm", report=False)
async def test_vllm_reports_no_cache_without_its_flag(engine: SimHandle) -> None:
    await post(engine, body())
    _, _, second = await post(engine, body("Which one?"))
    assert second["usage"] == {"input_tokens": 413, "output_tokens": 12}
    assert (await engine.stats())["tokens_read"] == 400  # the engine did reuse the blocks


@engines("sglang", report=False)
async def test_sglang_reports_zero_reads_without_its_flag(engine: SimHandle) -> None:
    await post(engine, body())
    _, _, second = await post(engine, body("Which one?"))
    assert second["usage"]["cache_read_input_tokens"] == 0


@engines("vllm")
async def test_vllm_input_tokens_exclude_the_cached_ones(engine: SimHandle) -> None:
    await post(engine, body())
    _, _, second = await post(engine, body("Which one?"))
    usage = second["usage"]
    assert usage == {"input_tokens": 413 - 400, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 400,
                     "output_tokens": 12}


# --- streaming: headers at once, message_start after prefill, cache written at prefill's end ---------------

@engines("vllm", "sglang", "llamacpp")
async def test_engine_streams_begin_before_prefill_and_message_start_follows_it(engine: SimHandle) -> None:
    data = orjson.dumps(body(stream=True))
    async with engine.session.post(engine.url + "/v1/messages", data=data,
                                   headers={"content-type": "application/json", "x-sim-gate": "prefill"}) as resp:
        assert resp.status == 200  # the headers arrived while the request waits before prefill
        await asyncio.wait_for(engine.state.gates.wait_for_waiters("prefill", 1), 10)
        assert resp.content.at_eof() is False and resp.content.total_bytes == 0
        await engine.open_gate("prefill")
        assert await resp.content.readline() == b"event: message_start\n"
        rest = await resp.read()
    assert b"event: ping" not in rest and rest.endswith(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")


@pytest.mark.parametrize("dialect", ["vllm", "sglang"])
async def test_an_engine_cache_is_readable_once_prefill_ends(dialect: str) -> None:
    """Unlike the API (readable once the response begins), before any byte of a JSON reply."""
    async with run_sim(dialect=dialect, cache_report=True, time_scale=1.0, base_latency_s=0.0,
                       prefill_tokens_per_s=1e12, cached_tokens_per_s=1e12, output_tokens_per_s=0.01,
                       reply_tokens=100) as sim:
        writer = asyncio.create_task(post(sim, body()))  # decodes for 10,000 s after prefill
        await eventually(lambda: sim.state.totals.tokens_written > 0)
        _, _, reader = await post(sim, body("Which one?"), **{"x-sim-reply-tokens": "0"})
        assert reader["usage"]["cache_read_input_tokens"] > 0
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer


async def test_llamacpp_a_request_waits_for_a_busy_slot() -> None:
    async with run_sim(dialect="llamacpp", reply_tokens=4) as sim:
        writer = asyncio.create_task(post(sim, body(), **{"x-sim-gate": "hold"}))
        await asyncio.wait_for(sim.state.gates.wait_for_waiters("hold", 1), 10)
        reader = asyncio.create_task(post(sim, body("Which one?")))
        async with sim.session.get(sim.url + "/slots") as resp:
            assert [s["is_processing"] for s in await resp.json()] == [True]
        assert not reader.done()
        await sim.open_gate("hold")
        (_, _, first), (_, _, second) = await asyncio.gather(writer, reader)
        assert first["usage"]["cache_read_input_tokens"] == 0
        assert second["usage"]["cache_read_input_tokens"] == 410


@engines("vllm", "sglang", "llamacpp")
async def test_the_sdk_reads_an_engine_stream(engine: SimHandle) -> None:
    client = anthropic.AsyncAnthropic(base_url=engine.url, api_key="unused", max_retries=0)
    async with client.messages.stream(**body()) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 12
    assert final.content[0].type == "text"
    await client.close()


# --- discovery ------------------------------------------------------------------------------------------

@engines("vllm", "sglang", "llamacpp")
async def test_the_proxys_detection_names_each_simulated_engine(engine: SimHandle) -> None:
    dialect = engine.state.profile.dialect
    found = await detect(engine.session, engine.url)
    assert found.profile.name == dialect
    if dialect == "llamacpp":
        assert found.slots == 1


@engines("vllm", "sglang", "llamacpp")
async def test_each_engine_answers_its_discovery_endpoints(engine: SimHandle) -> None:
    dialect = engine.state.profile.dialect
    async with engine.session.get(engine.url + "/v1/models") as resp:
        models = await resp.json()
    assert {m["owned_by"] for m in models["data"]} == {dialect}
    path, key = {"vllm": ("/version", "version"), "sglang": ("/get_server_info", "enable_cache_report"),
                 "llamacpp": ("/props", "total_slots")}[dialect]
    async with engine.session.get(engine.url + path) as resp:
        assert resp.status == 200 and key in await resp.json()
        assert resp.headers["server"] == {"llamacpp": "llama.cpp"}.get(dialect, "uvicorn")
    if dialect == "sglang":
        async with engine.session.get(engine.url + "/get_model_info") as resp:
            assert (await resp.json())["is_generation"] is True


@engines("vllm", "sglang", "llamacpp")
async def test_engines_ignore_what_the_api_would_refuse(engine: SimHandle) -> None:
    """No credential, no version header, unknown fields, an assistant-final conversation."""
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi "}]
    status, _, reply = await post(engine, {"model": MODEL, "max_tokens": 4, "messages": messages,
                                           "some_future_field": 1})
    assert status == 200 and reply["type"] == "message"


@engines("vllm")
async def test_vllm_refuses_a_model_it_does_not_serve(engine: SimHandle) -> None:
    status, _, err = await post(engine, {**body(), "model": "llama-3-8b"})
    assert status == 404 and err["error"]["message"] == "The model `llama-3-8b` does not exist."


# --- connections ----------------------------------------------------------------------------------

async def test_llamacpp_closes_its_connection_after_a_stream_though_it_advertises_keep_alive() -> None:
    """As llama-server does: ``Keep-Alive: timeout=5, max=100``, then EOF right after the last chunk
    of a streamed response (a JSON response keeps the connection open)."""
    async with run_sim(dialect="llamacpp", reply_tokens=4) as sim:
        host, port = sim.url.removeprefix("http://").split(":")
        for stream, closes in ((True, True), (False, False)):
            reader, writer = await asyncio.open_connection(host, int(port))
            data = orjson.dumps(body(stream=stream))
            writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
            head = await reader.readuntil(b"\r\n\r\n")
            if stream:
                assert b"Keep-Alive: timeout=5, max=100" in head and b"Connection: close" not in head
                rest = await asyncio.wait_for(reader.read(), 10)  # returns only at EOF
                assert rest.endswith(b"0\r\n\r\n") and b"message_stop" in rest
            else:
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(reader.read(1), 0.3)  # still open: nothing, no EOF
            writer.close()
            assert closes == stream
