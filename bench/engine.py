"""``python -m bench engine``: specproxy in front of a real llama.cpp ``llama-server``.

The engine is the one the tests use (``scripts/build_llama_server.sh``), 2 slots, with a
random-weight llama model of 8 layers and 128 dimensions (``--quick``: the tests' 4 x 64) and a
document of about 9k tokens (``--quick``: about 1.4k). specproxy runs as its own process with
``upstream_profile = "llamacpp"``. Three comparisons, side by side in one run, each on a document
no earlier request has seen, every question streamed with 16 tokens of output:

1. **cold vs prewarmed** (through the proxy): the question on a new document, then on another
   document after ``POST /prewarm?wait=1`` (the user typed long enough for the warm to finish);
2. **a question during the warm**: the warm starts, the question follows ``typing`` seconds
   later (1 s), either sent **straight** to the engine (it takes the other slot and prefills the
   same prompt in parallel) or **through the proxy** (held until the warm is done, then given the
   warm's slot); TTFT from the question's send, when the warm finished, and the prompt tokens the
   engine computed (``llamacpp:prompt_tokens_total``);
3. **a fan-out** of N questions on one new document at once, straight or through the proxy
   (coalescing: the first leads, the rest wait for its first token); tokens computed and each
   question's completion time.

Rounds alternate which variant goes first. Times are wall-clock seconds on a shared 2-core
machine: read the ratios, not the digits.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from typing import Any, Final

import aiohttp
import orjson

from bench.common import Servers, Target, headers, table
from tests.engine import llama

BENCH_MODEL: Final = {"layers": 8, "dim": 128, "heads": 4, "ff": 384}
MODEL: Final = "tiny-llama"
SLOTS: Final = 2
_docs = itertools.count()


def document(lines: int) -> str:
    """A new document (unique from its first token), about 22 tokens a line."""
    return f"Document {next(_docs)} of the engine benchmark.\n" + "".join(
        f"def function_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(lines))


def body(doc: str, question: str | None, *, max_tokens: int, stream: bool) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = [{"type": "text", "text": doc, "cache_control": {"type": "ephemeral"}}]
    if question:
        blocks.append({"type": "text", "text": question})
    out: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": blocks}]}
    if stream:
        out["stream"] = True
    return out


async def ask(http: aiohttp.ClientSession, url: str, doc: str, question: str, t0: float) -> dict[str, Any]:
    """One streamed question: TTFT (to ``message_start``, which llama.cpp sends with the first
    token) and completion, both from its send; and what its usage and headers said."""
    sent = time.monotonic()
    ttft: float | None = None
    usage: dict[str, Any] = {}
    buf = b""
    async with http.post(url + "/v1/messages", data=orjson.dumps(body(doc, question, max_tokens=16, stream=True)),
                         headers=headers()) as r:
        outcome = r.headers.get("x-cache-warm", "-")
        async for chunk in r.content.iter_any():
            buf += chunk
            if ttft is None and b"message_start" in buf:
                ttft = time.monotonic() - sent
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if line.startswith(b"data:") and b'"message_start"' in line:
                        usage = orjson.loads(line[5:]).get("message", {}).get("usage", {})
    done = time.monotonic()
    return {"outcome": outcome, "ttft_s": round(ttft if ttft is not None else done - sent, 3),
            "done_s": round(done - sent, 3), "done_at_s": round(done - t0, 3),
            "cache_read": int(usage.get("cache_read_input_tokens") or 0),
            "computed": int(usage.get("input_tokens") or 0)}


async def computed(engine: llama.LlamaServer) -> int:
    return await asyncio.to_thread(engine.computed)


async def cold_vs_prewarmed(http: aiohttp.ClientSession, engine: llama.LlamaServer, proxy: str,
                            lines: int) -> dict[str, Any]:
    before = await computed(engine)
    cold = await ask(http, proxy, document(lines), "What does function_7 return?", time.monotonic())
    doc = document(lines)
    async with http.post(proxy + "/prewarm?wait=1", data=orjson.dumps(body(doc, None, max_tokens=0, stream=False)),
                         headers=headers()) as r:
        answer = await r.json()
    state = answer["state"]
    if state != "warm":  # nothing below means anything then: stop, and show what the proxy said
        async with http.get(f"{proxy}/prewarm/{answer['prefix']}", headers=headers()) as r:
            raise RuntimeError(f"the prewarm of the cold-vs-prewarmed document ended {state}: {await r.text()}")
    warm = await ask(http, proxy, doc, "What does function_7 return?", time.monotonic())
    return {"cold": cold, "prewarmed": {**warm, "warm_state": state},
            "computed_tokens": await computed(engine) - before}


async def during_warm(http: aiohttp.ClientSession, engine: llama.LlamaServer, proxy: str, lines: int,
                      typing: float, via_proxy: bool) -> dict[str, Any]:
    """The warm goes first; the question follows ``typing`` seconds after the warm was accepted
    (the proxy's 202, or the straight warm's send). Through the proxy, the warm's state as the
    question leaves is recorded: ``warming`` means the question must be ``held``, ``warm`` that
    the warm beat it (a fast engine) and the question must be a ``hit``."""
    doc = document(lines)
    before = await computed(engine)
    t0 = time.monotonic()
    warm_done: dict[str, float] = {}
    accepted = asyncio.Event()
    prefix: dict[str, str] = {}

    async def warm() -> None:
        data = orjson.dumps(body(doc, None, max_tokens=0, stream=False))
        if via_proxy:
            async with http.post(proxy + "/prewarm", data=data, headers=headers()) as r:
                assert r.status == 202, await r.text()
                prefix["id"] = (await r.json())["prefix"]
            accepted.set()
            # A second /prewarm?wait=1 of the same prefix sends nothing and answers once it has settled.
            async with http.post(proxy + "/prewarm?wait=1", data=data, headers=headers()) as r:
                await r.read()
        else:
            accepted.set()
            async with http.post(engine.url + "/v1/messages", headers=headers(), data=data) as r:
                await r.read()
        warm_done["at"] = time.monotonic() - t0

    task = asyncio.create_task(warm())
    await accepted.wait()
    await asyncio.sleep(typing)
    state = "-"
    if via_proxy:
        async with http.get(f"{proxy}/prewarm/{prefix['id']}", headers=headers()) as r:
            state = (await r.json())["state"]
    question = await ask(http, proxy if via_proxy else engine.url, doc, "What does function_3 return?", t0)
    await task
    return {**question, "warm_state_at_question": state, "warm_done_at_s": round(warm_done["at"], 3),
            "computed_tokens": await computed(engine) - before}


async def fan_out(http: aiohttp.ClientSession, engine: llama.LlamaServer, proxy: str, lines: int, n: int,
                  via_proxy: bool) -> dict[str, Any]:
    doc = document(lines)
    before = await computed(engine)
    t0 = time.monotonic()
    url = proxy if via_proxy else engine.url
    answers = await asyncio.gather(*(ask(http, url, doc, f"What does function_{i} return?", t0) for i in range(n)))
    done = [a["done_at_s"] for a in answers]
    return {"answers": answers, "computed_tokens": await computed(engine) - before,
            "done_mean_s": round(statistics.fmean(done), 3), "done_max_s": round(max(done), 3),
            "outcomes": sorted(a["outcome"] for a in answers)}


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


async def run(quick: bool = False) -> dict[str, Any]:
    """Run the scenario; return its JSON document."""
    if llama.binary() is None:
        return {"scenario": "engine", "quick": quick,
                "skipped": "llama-server is not built: run scripts/build_llama_server.sh"}
    dims = llama.TINY if quick else BENCH_MODEL
    lines, rounds, n, typing = (60, 1, 2, 0.0) if quick else (400, 2, 4, 1.0)
    model_path = await asyncio.to_thread(llama.model, **dims)
    result: dict[str, Any] = {"scenario": "engine", "quick": quick, "model": dims, "slots": SLOTS,
                              "document_lines": lines, "typing_s": typing, "fan_out": n, "rounds": []}
    with llama.serving(model_path, slots=SLOTS, ctx_per_slot=12288) as engine, Servers() as servers:
        proxy = servers.proxy(engine.url, upstream_profile="llamacpp", max_hold=600.0, warm_timeout=600.0,
                              upstream_read_timeout=600.0).url
        timeout = aiohttp.ClientTimeout(total=900)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as http:
            await ask(http, engine.url, "warm-up", "hi", time.monotonic())  # the engine's first request
            result["cold_vs_prewarmed"] = await cold_vs_prewarmed(http, engine, proxy, lines)
            for r in range(rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                one: dict[str, Any] = {"during_warm": {}, "fan_out": {}}
                for via in order:
                    key = "proxy" if via else "straight"
                    one["during_warm"][key] = await during_warm(http, engine, proxy, lines, typing, via)
                for via in order:
                    key = "proxy" if via else "straight"
                    one["fan_out"][key] = await fan_out(http, engine, proxy, lines, n, via)
                result["rounds"].append(one)
    result["summary"] = summarise(result)
    result["_targets"] = [
        Target("held question reads the warm (cache-read tokens / warm's prompt)",
               result["summary"]["during_warm"]["proxy"]["cache_read_share"], 0.9, "", at_least=True),
    ]
    result["targets"] = [t.as_json() for t in result["_targets"]]
    return result


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Means over rounds, and the ratios the README quotes."""
    def mean(path: tuple[str, ...]) -> float:
        values = []
        for rnd in result["rounds"]:
            v: Any = rnd
            for k in path:
                v = v[k]
            values.append(float(v))
        return round(statistics.fmean(values), 3)

    cvp = result["cold_vs_prewarmed"]
    out: dict[str, Any] = {"cold_vs_prewarmed": {"cold_ttft_s": cvp["cold"]["ttft_s"],
                                                 "prewarmed_ttft_s": cvp["prewarmed"]["ttft_s"],
                                                 "ratio": _ratio(cvp["cold"]["ttft_s"], cvp["prewarmed"]["ttft_s"])}}
    dw: dict[str, Any] = {}
    for key in ("straight", "proxy"):
        dw[key] = {m: mean(("during_warm", key, m)) for m in
                   ("ttft_s", "done_at_s", "warm_done_at_s", "computed_tokens", "cache_read", "computed")}
        dw[key]["outcome"] = result["rounds"][0]["during_warm"][key]["outcome"]
        dw[key]["warm_state_at_question"] = result["rounds"][0]["during_warm"][key]["warm_state_at_question"]
    warm_prompt = dw["proxy"]["computed_tokens"] - dw["proxy"]["computed"]  # what the warm computed
    dw["proxy"]["cache_read_share"] = round(dw["proxy"]["cache_read"] / max(1.0, warm_prompt), 3)
    dw["ratios"] = {"ttft": _ratio(dw["straight"]["ttft_s"], dw["proxy"]["ttft_s"]),
                    "computed_tokens": _ratio(dw["straight"]["computed_tokens"], dw["proxy"]["computed_tokens"]),
                    "warm_done": _ratio(dw["straight"]["warm_done_at_s"], dw["proxy"]["warm_done_at_s"])}
    out["during_warm"] = dw
    fo: dict[str, Any] = {}
    for key in ("straight", "proxy"):
        fo[key] = {m: mean(("fan_out", key, m)) for m in ("computed_tokens", "done_mean_s", "done_max_s")}
        fo[key]["outcomes"] = result["rounds"][0]["fan_out"][key]["outcomes"]
    fo["ratios"] = {"computed_tokens": _ratio(fo["straight"]["computed_tokens"], fo["proxy"]["computed_tokens"]),
                    "done_mean": _ratio(fo["straight"]["done_mean_s"], fo["proxy"]["done_mean_s"]),
                    "done_max": _ratio(fo["straight"]["done_max_s"], fo["proxy"]["done_max_s"])}
    out["fan_out"] = fo
    return out


def render(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    s = result["summary"]
    c, d, f = s["cold_vs_prewarmed"], s["during_warm"], s["fan_out"]
    m = result["model"]
    lines = [f"llama-server, {result['slots']} slots, random {m['layers']}x{m['dim']} llama model, "
             f"{result['document_lines']}-line document, {len(result['rounds'])} round(s)",
             "", table([["TTFT (s)", c["cold_ttft_s"], c["prewarmed_ttft_s"], c["ratio"]]],
                       ["cold vs prewarmed (proxy)", "cold", "prewarmed", "ratio"]), ""]
    rows = [[name, d["straight"][k], d["proxy"][k], d["ratios"].get(r, "")] for name, k, r in (
        ("question TTFT (s)", "ttft_s", "ttft"), ("question done at (s)", "done_at_s", ""),
        ("warm done at (s)", "warm_done_at_s", "warm_done"), ("prompt tokens computed", "computed_tokens",
                                                              "computed_tokens"),
        ("question cache-read tokens", "cache_read", ""))]
    rows.append(["X-Cache-Warm", d["straight"]["outcome"], d["proxy"]["outcome"], ""])
    lines += [table(rows, [f"question {result['typing_s']} s into the warm", "straight", "proxy",
                           "straight/proxy"]), ""]
    rows = [[name, f["straight"][k], f["proxy"][k], f["ratios"][r]] for name, k, r in (
        ("prompt tokens computed", "computed_tokens", "computed_tokens"),
        ("mean completion (s)", "done_mean_s", "done_mean"), ("last completion (s)", "done_max_s", "done_max"))]
    rows.append(["X-Cache-Warm", ",".join(f["straight"]["outcomes"]), ",".join(f["proxy"]["outcomes"]), ""])
    lines.append(table(rows, [f"fan-out of {result['fan_out']}", "straight", "proxy", "straight/proxy"]))
    return "\n".join(lines)
