"""A real llama.cpp ``llama-server`` for the engine tests and ``python -m bench engine``.

``scripts/build_llama_server.sh`` builds the binary into the cache directory (``.ci/run`` does it
when it is missing); ``scripts/make_tiny_gguf.py`` writes the random-weight model next to it.
:func:`start` runs the server on a free loopback port with the flags that let a warm's KV be
reused by the question that follows it:

- ``--parallel N`` slots, ``--ctx-size N*CTX`` (each slot gets ``CTX``; the KV is not unified
  when ``--parallel`` is given, so a slot keeps its prompt until it is reused);
- ``--slot-prompt-similarity 0.1`` (the default, stated): an idle slot whose cached prompt shares
  more than 10% of a new request's tokens is given that request, so the question lands in the
  slot that holds its warm, and reads it (``cache_read_input_tokens``);
- ``--cache-reuse 256``: chunks of 256+ tokens that match after a difference are shifted and
  reused instead of recomputed (a changed block in the middle of the prompt);
- the RAM prompt cache (``--cache-ram``, on by default) keeps idle slots' prompts when a slot is
  reused, so a prefix can come back into another slot;
- ``--metrics``: ``llamacpp:prompt_tokens_total`` counts the prompt tokens the engine computed.

:class:`Gate` is a loopback hop in front of the server that holds any request carrying
``x-test-gate: NAME`` until :meth:`Gate.open` and logs, in order, when each labelled request
(``x-test-label``) reached the engine and when its response ended: orderings, never times.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from specproxy.serving import running

ROOT = Path(__file__).resolve().parents[2]
SESSION = web.AppKey("gate_session", aiohttp.ClientSession)
TINY = {"layers": 4, "dim": 64, "heads": 4, "ff": 192}  # prefill of a few thousand tokens: about a second


def _script(name: str) -> Any:
    """A module of ``scripts/`` (not a package), loaded by path: one definition of what it shares."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_specproxy_scripts_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llama_dir() -> Path:
    """Where scripts/build_llama_server.sh builds (``SPECPROXY_LLAMA_DIR`` overrides it)."""
    found: Path = _script("make_tiny_gguf").llama_dir()
    return found


def binary() -> Path | None:
    path = llama_dir() / "bin" / "llama-server"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def model(*, layers: int = 4, dim: int = 64, heads: int = 4, ff: int = 192, context: int = 16384) -> Path:
    """The random-weight model with these dimensions, written on first use (needs ``gguf``)."""
    path = llama_dir() / "models" / f"tiny-{layers}x{dim}-h{heads}-ff{ff}-c{context}.gguf"
    if not path.is_file():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_tiny_gguf.py"), str(path), "--layers", str(layers),
             "--dim", str(dim), "--heads", str(heads), "--kv-heads", str(heads), "--ff", str(ff),
             "--context", str(context)],
            check=True, stdout=subprocess.DEVNULL,
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(slots=True)
class LlamaServer:
    """A running llama-server: its URL, its slots, and its process."""

    url: str
    slots: int
    proc: subprocess.Popen[bytes]
    log: Path
    args: Sequence[str] = field(default_factory=tuple)

    def metrics(self) -> dict[str, float]:
        """``GET /metrics`` (``--metrics``): ``prompt_tokens_total`` (computed),
        ``prompt_tokens_cached_total``, ``tokens_predicted_total``, ``requests_processing``, ..."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^llamacpp:(\w+)\s+([-+0-9.eE]+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def computed(self) -> int:
        """Prompt tokens the engine has computed (not read from a slot's cache) since it started."""
        return int(self.metrics().get("prompt_tokens_total", 0))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


def start(
    model_path: Path, *, slots: int = 2, ctx_per_slot: int = 8192, threads: int | None = None,
    log_dir: Path | None = None, extra: Sequence[str] = (),
) -> LlamaServer:
    """Start llama-server on a free port and wait until it has loaded the model."""
    exe = binary()
    if exe is None:
        raise FileNotFoundError("llama-server is not built: run scripts/build_llama_server.sh")
    port = free_port()
    args = [
        str(exe), "-m", str(model_path), "--host", "127.0.0.1", "--port", str(port),
        "--parallel", str(slots), "--ctx-size", str(slots * ctx_per_slot),
        "--slot-prompt-similarity", "0.1", "--cache-reuse", "256", "--metrics", "--no-webui",
        *(["--threads", str(threads)] if threads else []), *extra,
    ]
    log = (log_dir or llama_dir()) / f"llama-server-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    server = LlamaServer(f"http://127.0.0.1:{port}", slots, proc, log, args)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
                if r.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"llama-server did not become healthy; see {log}")
        time.sleep(0.1)


@contextlib.contextmanager
def serving(model_path: Path, **kwargs: Any) -> Iterator[LlamaServer]:
    server = start(model_path, **kwargs)
    try:
        yield server
    finally:
        server.stop()


# --- the gate -------------------------------------------------------------------------------------
_HOP: frozenset[str] = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade", "te", "trailer",
    "x-test-gate",
})


class Gate:
    """A loopback hop in front of an upstream that holds gated requests and logs arrivals in order."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.events: list[tuple[str, str]] = []  # ("start" | "end", label), in the order they happened
        self.waiting: dict[str, int] = {}
        self._gates: dict[str, asyncio.Event] = {}
        self._changed = asyncio.Event()
        self.url = ""

    def _gate(self, name: str) -> asyncio.Event:
        return self._gates.setdefault(name, asyncio.Event())

    def open(self, name: str) -> None:
        self._gate(name).set()

    async def until_waiting(self, name: str, n: int = 1) -> None:
        """Return once ``n`` requests wait at gate ``name``."""
        while self.waiting.get(name, 0) < n:
            self._changed.clear()
            await self._changed.wait()

    def order(self, *labels: str) -> list[tuple[str, str]]:
        """The logged events of these labels, in order."""
        return [e for e in self.events if e[1] in labels]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.headers.get("x-test-gate")
        label = request.headers.get("x-test-label", request.path)
        body = await request.read()
        if name:
            self.waiting[name] = self.waiting.get(name, 0) + 1
            self._changed.set()
            try:
                await self._gate(name).wait()
            finally:
                self.waiting[name] -= 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        session = request.app[SESSION]
        self.events.append(("start", label))
        async with session.request(request.method, self.upstream + request.path_qs, data=body,
                                   headers=headers) as up:
            response = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in _HOP and k.lower() != "content-encoding"})
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        self.events.append(("end", label))
        return response


@contextlib.asynccontextmanager
async def gate(upstream: str) -> AsyncIterator[Gate]:
    """Run a :class:`Gate` in front of ``upstream`` on a free loopback port."""
    g = Gate(upstream)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", g.handle)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        app[SESSION] = session
        async with running(app) as r:
            g.url = r.url
            try:
                yield g
            finally:
                for event in g._gates.values():
                    event.set()
