"""Release lag across replicas: a warm settled on one replica releases requests held on the others.

    python -m bench.replicas [--quick] [--held 100] [--trials 5] [--mode auto|cli|process|inprocess]

Per trial (as in :mod:`bench.release`): a /prewarm on replica 0 carries ``x-sim-gate``, so the warm
waits at the simulator while N questions with its prefix are held, spread round-robin over three
replicas sharing one ``redis-server``; once every replica's ``/healthz`` shows its share held, the
gate opens. A held request's lag is its ``received_at`` in the simulator's log minus the warm's
``response_started_at`` (one monotonic clock, the simulator's). For a replica other than the warm's
it spans the warm's response reaching replica 0, replica 0 settling it and publishing the settle,
Redis delivering it, the other replica waking its holders and forwarding each one, and the
simulator's event loop reaching each request. The same N held on one replica with the in-process
(memory) registry, measured in the same run and the same way, is the baseline.

Replicas run as separate processes: ``--mode cli`` runs ``python -m specproxy.cli serve`` with
``SPECPROXY_REGISTRY=redis`` (needs ``create_app`` to build the Redis registry from settings;
``auto`` picks it when it does), ``--mode process`` runs this module's own replica entry
(``RedisRegistry`` passed to ``create_app``; works either way), ``--mode inprocess`` runs all
replicas in this process's event loop. The simulator is always a process of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import aiohttp

from bench.common import (
    ROOT,
    Server,
    Servers,
    _await_banner,
    client_session,
    context_text,
    dumps,
    environment,
    get_json,
    headers,
    question_body,
    release_gate,
    summary,
    table,
    warm_body,
    write_json,
)

REPLICAS: Final = 3
CONTEXT_BYTES: Final = 9_000  # ~2,250 tokens: above claude-sonnet-4-6's 2,048-token minimum
SETTINGS: Final = {"max_hold": 120.0, "max_held_total": 100_000, "max_held_per_tenant": 100_000,
                   "upstream_max_connections": 0, "log_level": "warning"}


def app_builds_redis_registry() -> bool:
    """True once ``create_app`` builds a Redis registry from ``registry = "redis"`` (the lead's wiring)."""
    import specproxy.app

    return "RedisRegistry" in Path(specproxy.app.__file__).read_text(encoding="utf-8")


# --- replicas -------------------------------------------------------------------------------------
def _spawn(argv: list[str], env: dict[str, str], log_dir: Path, name: str) -> Server:
    """A replica process (cwd: an empty dir, so no ./config/specproxy.toml is read) and its URL."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SPECPROXY_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH", "")]))
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, *argv], cwd=log_dir, env={**base, **env},
                                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    server = Server(name, "", proc, log_path)
    try:
        server.url = _await_banner(server)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.asynccontextmanager
async def replicas(mode: str, sim: str, redis_url: str | None, n: int) -> AsyncIterator[list[str]]:
    """``n`` replicas in front of ``sim``, sharing ``redis_url`` (None: one memory registry each)."""
    if mode == "inprocess":
        from specproxy.registry import MemoryRegistry
        from specproxy.registry_redis import RedisRegistry
        from tests.redis_server import run_replica

        opts: dict[str, Any] = {"max_entries": 100_000, "warm_timeout": 300.0, "failed_ttl": 10.0,
                                "rewarm_margin": 30.0}
        async with contextlib.AsyncExitStack() as stack:
            urls = []
            for _ in range(n):
                reg = RedisRegistry(redis_url, **opts) if redis_url else MemoryRegistry(**opts)
                urls.append((await stack.enter_async_context(run_replica(sim, reg, **SETTINGS))).url)
            yield urls
        return
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="specproxy-replicas-") as tmp:
        try:
            for i in range(n):
                if mode == "cli":
                    env = {f"SPECPROXY_{k.upper()}": str(v) for k, v in SETTINGS.items()}
                    env["SPECPROXY_REGISTRY"] = "redis" if redis_url else "memory"
                    if redis_url:
                        env["SPECPROXY_REDIS_URL"] = redis_url
                    argv = ["-m", "specproxy.cli", "serve", "--port", "0", "--upstream", sim]
                else:
                    env = {}
                    argv = ["-m", "bench.replicas", "serve-replica", "--upstream", sim, "--redis", redis_url or ""]
                servers.append(await asyncio.to_thread(_spawn, argv, env, Path(tmp), f"replica-{i}"))
            yield [s.url for s in servers]
        finally:
            for server in servers:
                await asyncio.to_thread(server.stop)


def serve_replica(upstream: str, redis_url: str) -> None:
    """One replica process for ``--mode process``: the app with a Redis registry started before serving."""
    from specproxy.app import create_app
    from specproxy.config import load_settings
    from specproxy.registry_redis import RedisRegistry
    from specproxy.serving import serve_forever

    shared = {"registry": "redis", "redis_url": redis_url} if redis_url else {}
    settings = load_settings(None, env={}, overrides={"upstream": upstream, **SETTINGS, **shared},
                             read_default_file=False)

    def make() -> Any:
        registry = RedisRegistry.from_settings(settings) if redis_url else None
        app = create_app(settings, registry=registry)
        if registry is not None:
            app.on_startup.append(lambda _app: registry.start())
        return app

    serve_forever(make, "127.0.0.1", 0, banner="specproxy")


# --- one trial ------------------------------------------------------------------------------------
async def _until(check: Any, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)  # the harness polls the servers' state; the proxy never does


async def _ask(session: aiohttp.ClientSession, url: str, body: bytes) -> str:
    async with session.post(url + "/v1/messages", data=body, headers=headers(x_sim_reply_tokens="1")) as resp:
        await resp.read()
        return resp.headers.get("X-Cache-Warm", "none") if resp.status == 200 else f"http-{resp.status}"


async def trial(session: aiohttp.ClientSession, urls: list[str], sim: str, n: int) -> dict[str, Any]:
    """N held requests spread over ``urls``, the warm sent through ``urls[0]``; lags by replica."""
    tag = uuid.uuid4().hex[:12]
    gate = f"replicas-{tag}"
    context = f"trial {tag}\n" + context_text(CONTEXT_BYTES, seed=n)
    await get_json(session, sim + "/_sim/reset", "POST")
    async with session.post(urls[0] + "/prewarm", data=dumps(warm_body(context)),
                            headers=headers(x_sim_gate=gate)) as r:
        if r.status != 202:
            raise RuntimeError(f"/prewarm answered {r.status}: {await r.text()}")
        prefix = (await r.json())["prefix"]

    async def known_everywhere() -> bool:  # GET /prewarm/{id} also pulls the warm from Redis into the mirror
        for url in urls:
            async with session.get(f"{url}/prewarm/{prefix}", headers=headers()) as resp:
                if resp.status != 200 or (await resp.json())["state"] != "warming":
                    return False
        return True

    await _until(known_everywhere)
    bodies = [dumps(question_body(context, f"Question {i}: what does pagerStep7 return?", max_tokens=16))
              for i in range(n)]
    replica_of = {}
    tasks = []
    for i, body in enumerate(bodies):
        replica_of[_sha256(body)] = i % len(urls)
        tasks.append(asyncio.ensure_future(_ask(session, urls[i % len(urls)], body)))
    share = [len(range(r, n, len(urls))) for r in range(len(urls))]

    async def all_held() -> bool:
        held = [int((await get_json(session, url + "/healthz"))["held"]) for url in urls]
        return held == share

    await _until(all_held)
    outcomes, log, started = await release_gate(session, sim, gate, tasks)
    lags: dict[str, list[float]] = {"origin": [], "other": []}
    for e in log:
        replica = replica_of.get(e.get("sha256"))
        if e["path"] == "/v1/messages" and replica is not None:
            lags["origin" if replica == 0 else "other"].append((e["received_at"] - started) * 1000)
    return {"outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))}, "lags_ms": lags}


def _sha256(body: bytes) -> str:
    import hashlib

    return hashlib.sha256(body).hexdigest()


async def measure(mode: str, sim: str, redis_url: str | None, n_replicas: int, held: int,
                  trials: int) -> dict[str, Any]:
    async with replicas(mode, sim, redis_url, n_replicas) as urls, client_session(limit=0) as session:
        await trial(session, urls, sim, held)  # untimed: opens every connection pool
        runs = [await trial(session, urls, sim, held) for _ in range(trials)]
    origin = [x for r in runs for x in r["lags_ms"]["origin"]]
    other = [x for r in runs for x in r["lags_ms"]["other"]]
    outcomes: dict[str, int] = {}
    for r in runs:
        for k, v in r["outcomes"].items():
            outcomes[k] = outcomes.get(k, 0) + v
    out: dict[str, Any] = {"replicas": n_replicas, "held": held, "trials": trials, "outcomes": outcomes,
                           "lag_ms": summary(origin + other), "lag_max_ms": round(max(origin + other), 4)}
    if n_replicas > 1:
        out["lag_ms_warm_replica"] = summary(origin)
        out["lag_ms_other_replicas"] = summary(other)
    return out


async def registry_hop(redis_url: str, n: int) -> dict[str, float]:
    """Registry level, one process, no HTTP: ms from ``settle`` on one registry to a waiter woken on another."""
    from specproxy.prefix import compute, tenant_digest
    from specproxy.registry import State
    from specproxy.registry_redis import RedisRegistry

    tenant = tenant_digest("bench-hop")
    opts: dict[str, Any] = {"max_entries": 10_000, "warm_timeout": 60.0, "failed_ttl": 10.0, "rewarm_margin": 30.0,
                            "op_timeout": 1.0}
    a, b = RedisRegistry(redis_url, **opts), RedisRegistry(redis_url, **opts)
    await a.start()
    await b.start()
    lags = []
    try:
        for i in range(n):
            block = {"type": "text", "text": f"hop {i}", "cache_control": {"type": "ephemeral"}}
            prefix = compute({"model": "m", "messages": [{"role": "user", "content": [block]}]}, tenant)
            warm, _ = await a.begin(tenant, prefix)

            async def announced(prefix: Any = prefix) -> bool:
                return await b.match(prefix) is not None

            await _until(announced)
            match = await b.match(prefix)
            assert match is not None
            woken: list[float] = []

            async def wait(warm: Any = match.warm, woken: list[float] = woken) -> None:
                await warm.wait(5.0)
                woken.append(time.perf_counter())

            waiter = asyncio.ensure_future(wait())
            await asyncio.sleep(0)  # the waiter is parked on the warm's event
            t0 = time.perf_counter()
            await a.settle(warm, State.WARM)
            await waiter
            lags.append((woken[0] - t0) * 1000)
    finally:
        await a.close()
        await b.close()
    return summary(lags)


async def run(quick: bool = False, held: int | None = None, trials: int | None = None,
              mode: str = "auto") -> dict[str, Any]:
    """Run the scenario; return its JSON document."""
    from tests.redis_server import RedisServer

    held = held or (12 if quick else 100)
    trials = trials or (1 if quick else 5)
    if mode == "auto":
        mode = "cli" if app_builds_redis_registry() else "process"
    redis = RedisServer()
    await redis.start()
    try:
        with Servers() as servers:
            sim = servers.sim(time_scale=0.0, max_logged_requests=20_000).url
            single = await measure(mode, sim, None, 1, held, trials)
            shared = await measure(mode, sim, redis.url, REPLICAS, held, trials)
        hop = await registry_hop(redis.url, 50 if quick else 500)
    finally:
        await redis.close()
    return {
        "scenario": "replicas",
        "quick": quick,
        "mode": mode,
        "method": ("lag = simulator received_at of each held request - simulator response_started_at of the warm "
                   "(one monotonic clock); the warm goes through replica 0, the held requests round-robin over "
                   "the replicas; baseline: the same held on one replica with the memory registry, same run"),
        "results": {"single_memory": single, "replicas_redis": shared, "registry_hop_ms": hop},
    }


def render(result: dict[str, Any]) -> str:
    single, shared = result["results"]["single_memory"], result["results"]["replicas_redis"]

    def row(name: str, r: dict[str, Any], lag: dict[str, float], n: int) -> list[Any]:
        return [name, n, lag["p50"], lag["p99"], ",".join(f"{k}={v}" for k, v in r["outcomes"].items())]

    rows = [
        row("1 replica, memory registry", single, single["lag_ms"], single["lag_ms"]["n"]),
        row(f"{shared['replicas']} replicas, Redis: all", shared, shared["lag_ms"], shared["lag_ms"]["n"]),
        row("  on the warm's replica", shared, shared["lag_ms_warm_replica"], shared["lag_ms_warm_replica"]["n"]),
        row("  on the other replicas", shared, shared["lag_ms_other_replicas"], shared["lag_ms_other_replicas"]["n"]),
    ]
    hop = result["results"]["registry_hop_ms"]
    rows.append(["registry hop: settle -> remote waiter", hop["n"], hop["p50"], hop["p99"], "-"])
    head = f"mode {result['mode']}: {shared['held']} held per trial, {shared['trials']} trials"
    if "loadavg_1m" in result:
        head += f"; load average {result['loadavg_1m']['before']} → {result['loadavg_1m']['after']}"
    head += "\n"
    return head + table(rows, ["setup", "samples", "lag p50 ms", "lag p99 ms", "outcomes"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve-replica", help="(internal) one replica process for --mode process")
    serve.add_argument("--upstream", required=True)
    serve.add_argument("--redis", default="")
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds), not a measurement")
    parser.add_argument("--held", type=int, default=None, help="held requests per trial (default 100)")
    parser.add_argument("--trials", type=int, default=None, help="timed trials (default 5)")
    parser.add_argument("--mode", choices=("auto", "cli", "process", "inprocess"), default="auto")
    parser.add_argument("--out", default=None, help="where replicas.json goes (default bench/results)")
    args = parser.parse_args(argv)
    if args.command == "serve-replica":
        serve_replica(args.upstream, args.redis)
        return 0
    from bench.common import raise_nofile
    from specproxy.serving import install_uvloop
    from tests.redis_server import REDIS_SERVER

    if REDIS_SERVER is None:
        print("bench.replicas needs redis-server on PATH (apt-get install redis-server)", file=sys.stderr)
        return 2
    raise_nofile()
    install_uvloop()
    load_before = os.getloadavg()[0]
    result = asyncio.run(run(args.quick, args.held, args.trials, args.mode))
    result["env"] = environment()
    result["loadavg_1m"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / ("quick" if args.quick else "")
    path = write_json(out, "replicas", result)
    print(render(result))
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
