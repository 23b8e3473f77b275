"""Savings: what speculative caching buys on the calibrated simulator (default profile: a ~150k-token
prompt takes ~20.9 s to the first token uncached, ~1.9 s from the cache).

The simulator runs at ``time_scale`` (default 0.05, twenty times faster); every time is scaled back
up by ``1 / time_scale``. The fixed HTTP and JSON cost of a 600 KB request is measured first at time
scale 0 (straight and through the proxy) and subtracted before scaling, so that it is not magnified
(as ``bench/sim_calibration.py`` does). Three flows, each on a fresh context:

- **cookbook**: standard (the question straight to the API, cache cold) vs speculative (``/prewarm``
  when the user starts typing, the question through specproxy after ``typing_s``);
- **halfway**: the question arrives halfway through the warm: held by specproxy vs sent unheld
  straight to the API at the same moment (time to first token, cache-write tokens, dollars);
- **fanout**: N parallel questions on one context: without specproxy (straight to the API, all
  cold at once) vs with it (``/prewarm``, then the N questions): cache writes, reads, dollars (the
  pricing table of ``specproxy.metrics``, the warm's own cost included).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import orjson

from bench.common import MODEL, Servers, Target, client_session, context_text, dumps, get_json, headers, table
from bench.common import question_body as _question_body
from bench.common import warm_body as _warm_body
from specproxy.metrics import cost
from specproxy.sim.state import tenant_digest
from specproxy.usage import Usage

CONTEXT_BYTES: Final = 600_000  # ~150k tokens at the simulator's 4 characters a token
QUESTION: Final = "Explain how the pager decides when to spill dirty pages to disk."
TYPING_S: Final = 25.0  # simulated seconds between /prewarm and the question (the warm takes ~20.9 s)


@dataclass
class Answer:
    """One streamed answer: seconds to the first text delta and to the end, its usage and X-Cache-Warm."""

    ttft: float = 0.0
    total: float = 0.0
    usage: dict[str, Any] = field(default_factory=dict)
    outcome: str = ""
    status: int = 0


async def _ask(session: aiohttp.ClientSession, url: str, body: bytes, key: str) -> Answer:
    answer = Answer()
    t0 = time.perf_counter()
    async with session.post(url + "/v1/messages", data=body, headers=headers(key)) as resp:
        answer.status = resp.status
        answer.outcome = resp.headers.get("X-Cache-Warm", "")
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                _event(answer, event, t0)
    answer.total = time.perf_counter() - t0
    return answer


def _event(answer: Answer, raw: bytes, t0: float) -> None:
    name, data = "", b""
    for line in raw.split(b"\n"):
        if line.startswith(b"event:"):
            name = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data = line[5:].strip()
    if name == "content_block_delta" and not answer.ttft:
        answer.ttft = time.perf_counter() - t0
    elif name == "message_start":
        answer.usage.update(orjson.loads(data)["message"]["usage"])
    elif name == "message_delta":
        answer.usage.update({k: v for k, v in orjson.loads(data).get("usage", {}).items() if v is not None})


def _dollars(usage: dict[str, Any]) -> float:
    return cost(Usage.from_api(usage), MODEL)[0]


class Flows:
    """The three flows against one simulator (and one proxy in front of it)."""

    def __init__(self, session: aiohttp.ClientSession, sim: str, proxy: str, time_scale: float,
                 fixed: dict[str, dict[str, float]]) -> None:
        self.session, self.sim, self.proxy, self.ts, self.fixed = session, sim, proxy, time_scale, fixed

    def scaled(self, seconds: float, path: str, what: str) -> float:
        """Real seconds at ``time_scale`` → simulated seconds, the fixed cost not magnified."""
        fixed = self.fixed[path][what]
        return round(max(0.0, seconds - fixed) / self.ts + fixed, 3)

    def _fresh(self) -> tuple[bytes, bytes, str]:
        tag = uuid.uuid4().hex
        context = f"context {tag}\n" + context_text(CONTEXT_BYTES)
        return (dumps(_question_body(context, QUESTION, stream=True)), dumps(_warm_body(context)),
                f"sk-ant-bench-{tag[:12]}")

    async def _prewarm(self, warm: bytes, key: str) -> None:
        async with self.session.post(self.proxy + "/prewarm", data=warm, headers=headers(key)) as resp:
            if resp.status != 202:
                raise RuntimeError(f"/prewarm answered {resp.status}: {await resp.text()}")

    async def _tenant_stats(self, key: str) -> dict[str, int]:
        stats = await get_json(self.session, self.sim + "/_sim/stats")
        counters: dict[str, int] = stats["by_tenant"].get(tenant_digest(key), {})
        return counters

    async def _tenant_dollars(self, key: str) -> float:
        log = await get_json(self.session, self.sim + "/_sim/requests")
        tenant = tenant_digest(key)
        return round(sum(_dollars(e["usage"]) for e in log if e.get("tenant") == tenant and e.get("usage")), 4)

    def _answer(self, a: Answer, path: str) -> dict[str, Any]:
        return {"ttft_s": self.scaled(a.ttft, path, "ttft"), "total_s": self.scaled(a.total, path, "total"),
                "outcome": a.outcome or "(direct)", "cache_write_tokens": a.usage.get("cache_creation_input_tokens", 0),
                "cache_read_tokens": a.usage.get("cache_read_input_tokens", 0), "dollars": round(_dollars(a.usage), 4)}

    async def cookbook(self) -> dict[str, Any]:
        question, _, key = self._fresh()
        standard = await _ask(self.session, self.sim, question, key)
        question, warm, key = self._fresh()
        await self._prewarm(warm, key)
        await asyncio.sleep(TYPING_S * self.ts)
        speculative = await _ask(self.session, self.proxy, question, key)
        return {"standard": self._answer(standard, "direct"), "speculative": self._answer(speculative, "proxy")}

    async def halfway(self) -> dict[str, Any]:
        profile_warm_s = 0.45 + (CONTEXT_BYTES / 4) / 7350.0  # the default profile's uncached TTFT
        out: dict[str, Any] = {"arrives_after_s": round(profile_warm_s / 2, 3)}
        for variant, target in (("held", self.proxy), ("unheld", self.sim)):
            question, warm, key = self._fresh()
            await self._prewarm(warm, key)
            await asyncio.sleep(profile_warm_s / 2 * self.ts)
            answer = await _ask(self.session, target, question, key)
            out[variant] = self._answer(answer, "proxy" if variant == "held" else "direct")
            out[variant]["tenant_dollars_incl_warm"] = await self._tenant_dollars(key)
        return out

    async def fanout(self, n: int) -> dict[str, Any]:
        out: dict[str, Any] = {"n": n}
        for variant in ("without", "with"):
            question, warm, key = self._fresh()
            t0 = time.perf_counter()
            if variant == "with":
                await self._prewarm(warm, key)
                target, path = self.proxy, "proxy"
            else:
                target, path = self.sim, "direct"
            answers = await asyncio.gather(*(_ask(self.session, target, question, key) for _ in range(n)))
            elapsed = time.perf_counter() - t0
            stats = await self._tenant_stats(key)
            out[variant] = {
                "cache_writes": stats.get("cache_writes", 0),
                "cache_reads": stats.get("cache_reads", 0),
                "tokens_written": stats.get("tokens_written", 0),
                "tokens_read": stats.get("tokens_read", 0),
                "upstream_requests": stats.get("requests", 0),
                "dollars": await self._tenant_dollars(key),
                "last_answer_s": self.scaled(elapsed, path, "total"),
                "outcomes": {o: [a.outcome or "(direct)" for a in answers].count(o)
                             for o in sorted({a.outcome or "(direct)" for a in answers})},
            }
        return out


async def _fixed_costs(reps: int) -> dict[str, dict[str, float]]:
    """The HTTP/JSON cost of a 600 KB streamed request at time scale 0: straight and through the proxy."""
    out: dict[str, dict[str, float]] = {}
    with Servers() as servers:
        sim = servers.sim(time_scale=0.0, max_logged_requests=100)
        proxy = servers.proxy(sim.url)
        body = dumps(_question_body(context_text(CONTEXT_BYTES), QUESTION, stream=True))
        async with client_session() as session:
            for path, url in (("direct", sim.url), ("proxy", proxy.url)):
                answers = [await _ask(session, url, body, "sk-ant-bench-fixed") for _ in range(reps + 1)][1:]
                out[path] = {"ttft": statistics.median(a.ttft for a in answers),
                             "total": statistics.median(a.total for a in answers)}
    return out


def _median_answers(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per key, the median of the runs' numbers (the first run's value for anything else)."""
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        if isinstance(first, dict):
            out[key] = _median_answers([r[key] for r in runs])
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            out[key] = round(statistics.median(r[key] for r in runs), 4)
        else:
            out[key] = first
    return out


async def run(quick: bool = False, time_scale: float | None = None, reps: int | None = None,
              fanout_n: int = 10) -> dict[str, Any]:
    """Run the scenario; return its JSON document."""
    ts = time_scale or (0.01 if quick else 0.05)
    reps = reps or (1 if quick else 3)
    fixed = await _fixed_costs(2 if quick else 5)
    with Servers() as servers:
        sim = servers.sim(time_scale=ts)
        proxy = servers.proxy(sim.url, max_hold=600.0)
        async with client_session() as session:
            flows = Flows(session, sim.url, proxy.url, ts, fixed)
            cookbook = _median_answers([await flows.cookbook() for _ in range(reps)])
            halfway = _median_answers([await flows.halfway() for _ in range(reps)])
            fanout = _median_answers([await flows.fanout(fanout_n) for _ in range(reps)])
    targets = [Target(f"fan-out of {fanout_n}: cache writes with specproxy", fanout["with"]["cache_writes"], 1,
                      "writes", note=f"without: {fanout['without']['cache_writes']}; "
                                     f"${fanout['with']['dollars']:.3f} vs ${fanout['without']['dollars']:.3f}")]
    return {
        "scenario": "savings",
        "quick": quick,
        "method": (f"simulator default profile at time_scale {ts}; times scaled back by 1/time_scale after "
                   "subtracting the fixed HTTP/JSON cost measured at time scale 0 (fixed_cost_s); standard and "
                   "unheld requests go straight to the simulator, speculative and held ones through specproxy; "
                   f"median of {reps} runs, each on a fresh context"),
        "time_scale": ts,
        "typing_s": TYPING_S,
        "context_tokens": CONTEXT_BYTES // 4,
        "fixed_cost_s": {p: {k: round(v, 5) for k, v in d.items()} for p, d in fixed.items()},
        "cookbook": cookbook,
        "halfway": halfway,
        "fanout": fanout,
        "targets": [t.as_json() for t in targets],
        "_targets": targets,
    }


def render(result: dict[str, Any]) -> str:
    c, h, f = result["cookbook"], result["halfway"], result["fanout"]
    rows = [
        ["cookbook: standard", c["standard"]["ttft_s"], c["standard"]["total_s"], c["standard"]["cache_write_tokens"],
         c["standard"]["dollars"], c["standard"]["outcome"]],
        ["cookbook: speculative", c["speculative"]["ttft_s"], c["speculative"]["total_s"],
         c["speculative"]["cache_write_tokens"], c["speculative"]["dollars"], c["speculative"]["outcome"]],
        [f"halfway ({h['arrives_after_s']} s in): held", h["held"]["ttft_s"], h["held"]["total_s"],
         h["held"]["cache_write_tokens"], h["held"]["dollars"], h["held"]["outcome"]],
        ["halfway: unheld", h["unheld"]["ttft_s"], h["unheld"]["total_s"], h["unheld"]["cache_write_tokens"],
         h["unheld"]["dollars"], h["unheld"]["outcome"]],
    ]
    text = table(rows, ["flow (simulated seconds)", "TTFT s", "total s", "cache-write tok", "question $",
                        "X-Cache-Warm"])
    fan = [[variant, f[variant]["cache_writes"], f[variant]["cache_reads"], f[variant]["tokens_written"],
            f[variant]["tokens_read"], f[variant]["dollars"], f[variant]["last_answer_s"]]
           for variant in ("without", "with")]
    text += "\n\n" + table(fan, [f"fan-out of {f['n']}", "cache writes", "cache reads", "tokens written",
                                 "tokens read", "dollars (incl. warm)", "last answer s"])
    return text
