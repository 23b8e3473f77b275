"""Soak: mixed traffic through the proxy for minutes (``python -m bench soak --minutes 10``; default 1).

Bounded request loops (WORKERS of them, as many as 2 cores carry with the load generator and the
simulator beside the proxy) stop by themselves at the deadline. Each picks, by weight:

- a warm and two questions on it at once (held), one of them streamed;
- a question on an already-warmed context (hit), JSON or streamed;
- a cacheable question nobody warmed (miss), and one without a breakpoint (bypass);
- an injected upstream fault (``x-sim-fault``: overloaded, rate_limit, api_error, disconnect_mid_stream);
- a client that disconnects: mid-stream after the first chunk, while held on a slow warm, or from
  an upstream that never answers (``stall``).

Hostile traffic runs beside them (``hostile=True``, as ``python -m bench soak`` runs it;
:class:`Hostile`): slowloris sockets that send part of their headers and then a byte now and then,
bodies that stall half-way, a key per request (garbage credentials: questions and ``/prewarm``),
headers over 8,190 bytes and control characters in a key, and gzip-compressed questions (verified
like every other question). What the proxy answered each of them is reported by kind, expected
answers (408, 400, closed) apart from unexpected ones.

Every body carries a unique marker, so its SHA-256 names it. At the end the simulator's request log
(drained as the run goes) is matched against what the clients sent: by ``request-id`` for every
answer that came back (same digest, or it was altered), and by digest for everything the simulator
saw (a digest nobody sent: altered; seen twice: duplicated; a request that got its answer but
never reached the simulator: lost; one whose client left while it was held but that went upstream
anyway: forwarded after disconnect). Also reported: requests served, errors by kind (expected
ones, i.e. the injected faults and deliberate disconnects, apart from unexpected ones), and the
proxy's RSS and open sockets (/proc) at start, peak and end.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import random
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from bench.common import (
    Server,
    Servers,
    client_session,
    context_text,
    dumps,
    get_json,
    headers,
    open_fds,
    question_body,
    rss_mb,
    socket_fds,
    table,
    warm_body,
)

WORKERS: Final = 16
SIM_TIME_SCALE: Final = 0.01  # a cold 2.3k-token prompt: ~8 ms; a 420-token stream: ~70 ms
CONTEXT_BYTES: Final = 9_000
REQUEST_TIMEOUT: Final = 30.0
STALL_TIMEOUT: Final = 0.3
FAULT_STATUS: Final = {"overloaded": 529, "rate_limit": 429, "api_error": 500}
ACTIONS: Final = {"warm_and_ask": 2, "hit": 4, "hit_stream": 3, "miss": 2, "bypass": 1, "fault": 2,
                  "disconnect_stream": 1, "disconnect_held": 1, "stall": 0.5, "compressed": 1, "garbage_key": 1}
SLOW_SOCKETS: Final = 40  # slowloris connections kept open at once
SLOW_BODIES: Final = 4  # requests whose body stalls half-way, at once
# What the proxy should answer each kind of hostile request (anything else is unexpected).
HOSTILE_EXPECTED: Final = {
    "slow_headers": {"http_408", "closed"},
    "slow_body": {"http_408"},
    "oversized_header": {"http_400"},
    "control_char_key": {"http_400"},
    "garbage_prewarm": {"http_202"},
}


@dataclass
class Sent:
    """One request as the client sent it, and what came back."""

    marker: str
    sha256: str
    action: str
    expect_upstream: bool = True  # False: the client left while it was held (nothing should go upstream)
    status: int | None = None
    request_id: str | None = None
    outcome: str | None = None
    error: str | None = None
    complete: bool = False


@dataclass
class Run:
    """What one mixed run produced."""

    sent: dict[str, Sent] = field(default_factory=dict)  # by sha256
    warms: int = 0
    warm_errors: Counter[str] = field(default_factory=Counter)
    sim_log: list[dict[str, Any]] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)
    sockets: list[tuple[float, int]] = field(default_factory=list)
    fds: list[tuple[float, int]] = field(default_factory=list)
    hostile: Counter[str] = field(default_factory=Counter)  # "kind: answer"


class Traffic:
    """The request loops against one proxy (and the simulator behind it)."""

    def __init__(self, session: aiohttp.ClientSession, proxy: str, seed: int) -> None:
        self.session, self.proxy = session, proxy
        # One credential per loop: the proxy's per-tenant warm limits (600 a minute) stay out of the way.
        self.key = f"sk-ant-bench-soak-{seed}"
        self.rng = random.Random(seed)
        self.run = Run()
        self.warmed: list[str] = []  # contexts whose warm was sent
        self.seq = 0

    def _context(self) -> str:
        return f"ctx {uuid.uuid4().hex}\n" + context_text(CONTEXT_BYTES, seed=self.rng.randrange(50))

    def _body(self, action: str, context: str, *, stream: bool, cached: bool = True) -> tuple[bytes, Sent]:
        self.seq += 1
        marker = f"m{self.seq:07d}-{uuid.uuid4().hex[:8]}"
        raw = dumps(question_body(context, f"[{marker}] What does pagerStep7 return?", stream=stream,
                                  max_tokens=512, cached=cached))
        sent = Sent(marker, hashlib.sha256(raw).hexdigest(), action)
        self.run.sent[sent.sha256] = sent
        return raw, sent

    async def _ask(self, raw: bytes, sent: Sent, *, hdrs: dict[str, str] | None = None, stream: bool = False,
                   leave_after_first_chunk: bool = False, timeout: float = REQUEST_TIMEOUT) -> None:
        try:
            async with asyncio.timeout(timeout):
                async with self.session.post(self.proxy + "/v1/messages", data=raw,
                                             headers=hdrs or headers(self.key)) as resp:
                    sent.status = resp.status
                    sent.request_id = resp.headers.get("request-id")
                    sent.outcome = resp.headers.get("X-Cache-Warm")
                    if leave_after_first_chunk:
                        await resp.content.readany()
                        resp.close()  # the client goes away mid-stream
                        sent.error = "client_disconnect"
                        return
                    body = await resp.read()
                    if stream and resp.status == 200 and b"event: message_stop" not in body:
                        sent.error = "stream_incomplete"
                        return
                    sent.complete = resp.status == 200
        except TimeoutError:
            sent.error = "client_timeout"
        except aiohttp.ClientPayloadError:
            sent.error = "broken_stream"
        except aiohttp.ServerDisconnectedError:
            sent.error = "server_disconnected"
        except aiohttp.ClientError as exc:
            sent.error = type(exc).__name__

    async def _prewarm(self, context: str, hdrs: dict[str, str] | None = None) -> None:
        self.run.warms += 1
        try:
            async with self.session.post(self.proxy + "/prewarm", data=dumps(warm_body(context)),
                                         headers=hdrs or headers(self.key)) as resp:
                await resp.read()
                if resp.status != 202:
                    self.run.warm_errors[f"http_{resp.status}"] += 1
        except aiohttp.ClientError as exc:
            self.run.warm_errors[type(exc).__name__] += 1

    async def step(self) -> None:
        action = self.rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
        if action in ("hit", "hit_stream") and not self.warmed:
            action = "warm_and_ask"
        if action == "warm_and_ask":
            context = self._context()
            await self._prewarm(context)
            self.warmed.append(context)
            del self.warmed[:-20]
            a = self._body(action, context, stream=False)
            b = self._body(action, context, stream=True)
            await asyncio.gather(self._ask(*a), self._ask(*b, stream=True))
        elif action in ("hit", "hit_stream"):
            stream = action == "hit_stream"
            await self._ask(*self._body(action, self.rng.choice(self.warmed), stream=stream), stream=stream)
        elif action == "miss":
            await self._ask(*self._body(action, self._context(), stream=False))
        elif action == "bypass":
            await self._ask(*self._body(action, self._context(), stream=False, cached=False))
        elif action == "fault":
            fault = self.rng.choice([*FAULT_STATUS, "disconnect_mid_stream"])
            stream = fault == "disconnect_mid_stream" and self.rng.random() < 0.5
            raw, sent = self._body(f"fault:{fault}", self.rng.choice(self.warmed or [self._context()]), stream=stream)
            await self._ask(raw, sent, hdrs=headers(self.key, x_sim_fault=fault), stream=stream)
        elif action == "disconnect_stream":
            await self._ask(*self._body(action, self._context(), stream=True), stream=True,
                            leave_after_first_chunk=True)
        elif action == "disconnect_held":
            context = self._context()
            await self._prewarm(context, headers(self.key, x_sim_delay_ms="1500"))  # a warm that takes 1.5 s
            raw, sent = self._body(action, context, stream=False)
            sent.expect_upstream = False
            await self._ask(raw, sent, timeout=0.15)
            if sent.error == "client_timeout":
                sent.error = "client_disconnect_while_held"
        elif action == "stall":
            await self._ask(*self._body(action, self._context(), stream=False),
                            hdrs=headers(self.key, x_sim_fault="stall"), timeout=STALL_TIMEOUT)
        elif action == "compressed":
            # gzip on the wire: the simulator inflates it, so its digest is the plain body's.
            raw, sent = self._body(action, self.rng.choice(self.warmed or [self._context()]), stream=False)
            await self._ask(gzip.compress(raw), sent, hdrs=headers(self.key, content_encoding="gzip"))
        elif action == "garbage_key":
            # A key nobody has used before (and nobody will again): a tenant of its own.
            raw, sent = self._body(action, self._context(), stream=False)
            await self._ask(raw, sent, hdrs=headers(f"sk-ant-garbage-{uuid.uuid4().hex}"))

    async def loop(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            await self.step()


class Hostile:
    """Clients that try to cost the proxy something: slow sockets, stalled bodies, bad headers, garbage keys."""

    def __init__(self, session: aiohttp.ClientSession, proxy: str, run: Run, seed: int) -> None:
        self.session, self.proxy, self.run = session, proxy, run
        host, port = proxy.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.rng = random.Random(seed)

    async def _exchange(self, data: bytes, *, trickle: bytes = b"", every: float = 2.0,
                        deadline: float) -> str:
        """Send ``data``, then ``trickle`` a byte at a time; return what the proxy did."""
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            return f"connect_{type(exc).__name__}"
        try:
            writer.write(data)
            await writer.drain()
            read = asyncio.ensure_future(reader.read(65536))
            for byte in trickle:
                done, _ = await asyncio.wait({read}, timeout=every)
                if done or time.monotonic() > deadline:
                    break
                writer.write(bytes([byte]))
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
            try:
                first = await asyncio.wait_for(read, max(0.1, deadline - time.monotonic()) + 60)
            except TimeoutError:
                return "no_answer"
            if not first:
                return "closed"
            status = first.split(b" ", 2)[1].decode("ascii", "replace") if first.startswith(b"HTTP/") else "?"
            return f"http_{status}"
        except (ConnectionError, asyncio.IncompleteReadError):
            return "closed"
        finally:
            writer.close()

    async def slow_headers(self, deadline: float) -> None:
        """A slowloris socket: part of a request's headers, then one byte every couple of seconds."""
        while time.monotonic() < deadline:
            head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: sk-ant-slow\r\nx-slow: "
            outcome = await self._exchange(head, trickle=b"a" * 1000, every=2.0, deadline=deadline)
            self.run.hostile[f"slow_headers: {outcome}"] += 1

    async def slow_body(self, deadline: float) -> None:
        """Headers and half a body, then silence."""
        while time.monotonic() < deadline:
            body = dumps(question_body("slow body " + uuid.uuid4().hex, "?"))
            head = (f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: sk-ant-slowbody\r\n"
                    f"content-type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            outcome = await self._exchange(head + body[: len(body) // 2], deadline=deadline)
            self.run.hostile[f"slow_body: {outcome}"] += 1

    async def bad_headers(self, deadline: float) -> None:
        """Requests the HTTP layer refuses: a header over 8,190 bytes, a control character in the key."""
        while time.monotonic() < deadline:
            if self.rng.random() < 0.5:
                kind = "oversized_header"
                data = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-ant-"
                        + b"A" * self.rng.randrange(8200, 20000) + b"\r\n\r\n")
            else:
                kind = "control_char_key"
                data = (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: sk-ant-\x01bad\r\n"
                        b"Content-Length: 0\r\n\r\n")
            self.run.hostile[f"{kind}: {await self._exchange(data, deadline=deadline)}"] += 1
            await asyncio.sleep(0.05)

    async def garbage_prewarms(self, deadline: float) -> None:
        """``/prewarm`` with a fresh key each time: per-credential state must stay bounded."""
        while time.monotonic() < deadline:
            context = f"garbage {uuid.uuid4().hex}\n" + context_text(CONTEXT_BYTES, seed=self.rng.randrange(50))
            try:
                async with self.session.post(self.proxy + "/prewarm", data=dumps(warm_body(context)),
                                             headers=headers(f"sk-ant-garbage-{uuid.uuid4().hex}")) as resp:
                    await resp.read()
                    outcome = f"http_{resp.status}"
            except aiohttp.ClientError as exc:
                outcome = type(exc).__name__
            self.run.hostile[f"garbage_prewarm: {outcome}"] += 1
            self.run.warms += 1
            await asyncio.sleep(0.1)

    def loops(self, deadline: float) -> list[Any]:
        return ([self.slow_headers(deadline) for _ in range(SLOW_SOCKETS)]
                + [self.slow_body(deadline) for _ in range(SLOW_BODIES)]
                + [self.bad_headers(deadline), self.garbage_prewarms(deadline)])


async def mixed(seconds: float, *, workers: int = WORKERS, sample_every: float = 2.0, seed: int = 1,
                tracemalloc: str | None = None, hostile: bool = False,
                proxy_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run mixed traffic for ``seconds`` against a fresh simulator and proxy; return the report.

    With ``tracemalloc`` (a file path) the proxy traces its allocations and writes the largest live
    ones there at the end of the run.
    """
    with Servers() as servers:
        sim = servers.sim(time_scale=SIM_TIME_SCALE, max_logged_requests=1_000_000)
        proxy = servers.proxy(sim.url, tracemalloc=tracemalloc, **{"max_hold": 30.0, **(proxy_settings or {})})
        await asyncio.sleep(0.5)
        start = {"rss_mb": round(rss_mb(proxy.pid), 1), "sockets": socket_fds(proxy.pid), "fds": open_fds(proxy.pid)}
        async with client_session(limit=0) as session:
            traffic = [Traffic(session, proxy.url, seed * 1000 + i) for i in range(workers)]
            run = traffic[0].run
            for t in traffic[1:]:
                t.run = run
            t0 = time.monotonic()
            deadline = t0 + seconds
            stop = asyncio.Event()
            sampler = asyncio.ensure_future(_sample(session, proxy, sim, run, t0, sample_every, stop))
            loops = [t.loop(deadline) for t in traffic]
            if hostile:
                loops += Hostile(session, proxy.url, run, seed).loops(deadline)
            try:
                await asyncio.gather(*loops)
            finally:
                # Never cancel the sampler: a drain cut short would lose the log entries it took.
                stop.set()
                await sampler
            elapsed = time.monotonic() - t0
            load_end = {"rss_mb": round(rss_mb(proxy.pid), 1), "sockets": socket_fds(proxy.pid),
                        "fds": open_fds(proxy.pid)}
        # The clients are gone: let the proxy finish what it was doing, then read its state.
        await asyncio.sleep(2.0)
        async with client_session() as session:
            health = await get_json(session, proxy.url + "/healthz")
            run.sim_log += await get_json(session, sim.url + "/_sim/bench/drain?older_than=0")
        end = {"rss_mb": round(rss_mb(proxy.pid), 1), "sockets": socket_fds(proxy.pid), "fds": open_fds(proxy.pid)}
        if tracemalloc:
            _dump_allocations(proxy, tracemalloc)
    return _report(run, seconds, elapsed, workers, start, load_end, end, health, hostile)


def _dump_allocations(proxy: Server, path: str) -> None:
    """Ask the proxy (SIGUSR1) for its largest live allocations and wait until they are written.

    Blocking on purpose: the traffic is over, and the proxy needs the CPU to walk its heap.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    proxy.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.2)


async def _sample(session: aiohttp.ClientSession, proxy: Server, sim: Server, run: Run, t0: float,
                  every: float, stop: asyncio.Event) -> None:
    """Every ``every`` seconds until ``stop``: the proxy's RSS and sockets; every 5 s, drain the simulator's log."""
    last_drain = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
            return
        now = time.monotonic()
        run.rss.append((round(now - t0, 1), round(rss_mb(proxy.pid), 1)))
        run.sockets.append((round(now - t0, 1), socket_fds(proxy.pid)))
        run.fds.append((round(now - t0, 1), open_fds(proxy.pid)))
        if now - last_drain >= 5.0:
            last_drain = now
            run.sim_log += await get_json(session, sim.url + "/_sim/bench/drain?older_than=10")


def _verify(run: Run) -> dict[str, Any]:
    """Match the simulator's log against what the clients sent."""
    by_rid = {e["request_id"]: e for e in run.sim_log if e.get("request_id")}
    seen: Counter[str] = Counter()
    altered = unknown_warm_like = 0
    for e in run.sim_log:
        if e["path"] != "/v1/messages":
            continue
        if e.get("max_tokens") == 0:  # a warm: its body is the proxy's own rewrite of /prewarm
            continue
        if e["sha256"] in run.sent:
            seen[e["sha256"]] += 1
        elif e.get("max_tokens") == 1 and e.get("stream"):
            unknown_warm_like += 1  # the one-token warm fallback
        else:
            altered += 1
    lost = altered_by_rid = own_answers = forwarded_after_disconnect = 0
    for sha, s in run.sent.items():
        entry = by_rid.get(s.request_id) if s.request_id is not None else None
        if entry is not None and entry["sha256"] != sha:
            altered_by_rid += 1
        elif entry is None and s.status is not None:
            own_answers += 1  # answered by the proxy itself (e.g. 502 when the upstream dropped the connection)
        if (s.complete or (entry is None and s.status == 200)) and seen[sha] == 0:
            lost += 1
        if not s.expect_upstream and seen[sha] and s.error == "client_disconnect_while_held":
            forwarded_after_disconnect += 1
    return {
        "simulator_log_entries": len(run.sim_log),
        "warms_upstream": sum(1 for e in run.sim_log if e["path"] == "/v1/messages" and e.get("max_tokens") == 0),
        "lost": lost,
        "altered": altered + altered_by_rid,
        "duplicated": sum(1 for n in seen.values() if n > 1),
        "forwarded_after_client_left_while_held": forwarded_after_disconnect,
        "answered_by_proxy_itself": own_answers,
        "warm_fallbacks_upstream": unknown_warm_like,
    }


_EXPECTED: Final = {"client_disconnect", "client_disconnect_while_held"}


def _errors(run: Run) -> tuple[dict[str, int], dict[str, int]]:
    """(expected errors by kind, unexpected ones by kind)."""
    expected: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    for s in run.sent.values():
        kind = s.error or (f"http_{s.status}" if s.status != 200 else None)
        if kind is None:
            continue
        ok = kind in _EXPECTED
        if s.action.startswith("fault:"):
            fault = s.action.split(":", 1)[1]
            ok = kind == f"http_{FAULT_STATUS.get(fault)}" or (
                fault == "disconnect_mid_stream" and kind in ("broken_stream", "server_disconnected", "http_502",
                                                              "stream_incomplete"))
        elif s.action == "stall":
            ok = kind == "client_timeout"
        (expected if ok else unexpected)[f"{s.action}: {kind}"] += 1
    return dict(sorted(expected.items())), dict(sorted(unexpected.items()))


def _hostile(run: Run) -> tuple[dict[str, int], dict[str, int]]:
    """(expected hostile answers by kind, unexpected ones)."""
    expected: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    for key, n in run.hostile.items():
        kind, outcome = key.split(": ", 1)
        (expected if outcome in HOSTILE_EXPECTED.get(kind, ()) else unexpected)[key] += n
    return dict(sorted(expected.items())), dict(sorted(unexpected.items()))


def _report(run: Run, seconds: float, elapsed: float, workers: int, start: dict[str, Any], load_end: dict[str, Any],
            end: dict[str, Any], health: dict[str, Any], hostile: bool = True) -> dict[str, Any]:
    expected, unexpected = _errors(run)
    hostile_expected, hostile_unexpected = _hostile(run)
    served = sum(1 for s in run.sent.values() if s.complete)
    return {
        "seconds": round(elapsed, 1),
        "workers": workers,
        "sim_time_scale": SIM_TIME_SCALE,
        "requests_sent": len(run.sent),
        "requests_served": served,
        "warms_sent": run.warms,
        "warm_errors": dict(run.warm_errors),
        "per_second": round(len(run.sent) / elapsed, 1) if elapsed else None,
        "actions": dict(sorted(Counter(s.action for s in run.sent.values()).items())),
        "outcomes": dict(sorted(Counter(s.outcome or "-" for s in run.sent.values()).items())),
        "errors_expected": expected,
        "errors_unexpected": unexpected,
        "hostile": hostile,
        "hostile_expected": hostile_expected,
        "hostile_unexpected": hostile_unexpected,
        "verification": _verify(run),
        "proxy": {
            "start": start,
            "end_of_load": load_end,
            "end_idle": end,
            "peak_rss_mb": max((r for _, r in run.rss), default=None),
            "peak_sockets": max((n for _, n in run.sockets), default=None),
            "peak_fds": max((n for _, n in run.fds), default=None),
            "connections": health.get("connections"),
            "held_after": health.get("held"),
            "warms_in_flight_after": health.get("warms_in_flight"),
        },
        "rss_mb_series": run.rss,
        "sockets_series": run.sockets,
        "fds_series": run.fds,
    }


async def run(quick: bool = False, seconds: float | None = None) -> dict[str, Any]:
    """Run the scenario; return its JSON document."""
    seconds = seconds or (4.0 if quick else 60.0)
    # Quick runs last seconds: shorter client timeouts, so the slow sockets are answered within the run.
    quick_timeouts = {"client_header_timeout": 1.0, "client_body_timeout": 1.0} if quick else {}
    result = await mixed(seconds, workers=8 if quick else WORKERS, sample_every=1.0 if quick else 5.0,
                         hostile=True, proxy_settings=quick_timeouts)
    return {"scenario": "soak", "quick": quick, **result, "_targets": []}


def render(result: dict[str, Any]) -> str:
    v, p = result["verification"], result["proxy"]
    rows = [
        ["duration s / workers", f"{result['seconds']} / {result['workers']}"],
        ["requests sent / served (200, complete)", f"{result['requests_sent']} / {result['requests_served']}"],
        ["warms sent / reached upstream", f"{result['warms_sent']} / {v['warms_upstream']}"],
        ["X-Cache-Warm outcomes", " ".join(f"{k}={n}" for k, n in result["outcomes"].items())],
        ["warms refused by the proxy", " ".join(f"{k}={n}" for k, n in result["warm_errors"].items()) or "0"],
        ["errors, expected (injected or deliberate)", sum(result["errors_expected"].values())],
        ["errors, unexpected", " ".join(f"{k}={n}" for k, n in result["errors_unexpected"].items()) or "0"],
        ["hostile requests, as expected", " ".join(f"{k}={n}" for k, n in result.get("hostile_expected", {}).items())
         or "-"],
        ["hostile requests, unexpected", " ".join(f"{k}={n}" for k, n in result.get("hostile_unexpected", {}).items())
         or "0"],
        ["lost / altered / duplicated", f"{v['lost']} / {v['altered']} / {v['duplicated']}"],
        ["went upstream after client left while held", v["forwarded_after_client_left_while_held"]],
        ["proxy RSS MB start / peak / end", f"{p['start']['rss_mb']} / {p['peak_rss_mb']} / {p['end_idle']['rss_mb']}"],
        ["proxy sockets start / peak / end of load / idle end",
         f"{p['start']['sockets']} / {p['peak_sockets']} / {p['end_of_load']['sockets']} / {p['end_idle']['sockets']}"],
        ["proxy descriptors start / peak / end of load / idle end",
         f"{p['start'].get('fds')} / {p.get('peak_fds')} / {p['end_of_load'].get('fds')} / {p['end_idle'].get('fds')}"],
        ["held / warms in flight after", f"{p['held_after']} / {p['warms_in_flight_after']}"],
    ]
    return table(rows, ["soak", "value"])
