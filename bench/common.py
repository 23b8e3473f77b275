"""What every scenario shares: starting the servers as processes, request bodies, statistics,
process readings (/proc), targets and the printed table.

The load generator is the ``python -m bench`` process itself; every server it measures runs in a
process of its own (``python -m bench.servers``), so nothing under test shares its event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import orjson

ROOT: Final = Path(__file__).resolve().parent.parent
MODEL: Final = "claude-sonnet-4-6"
API_KEY: Final = "sk-ant-bench-0001"
ANTHROPIC_VERSION: Final = "2023-06-01"
START_TIMEOUT: Final = 30.0


def headers(key: str = API_KEY, **extra: str) -> dict[str, str]:
    """Request headers a Messages client sends (``extra`` adds e.g. ``x-sim-gate``)."""
    out = {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
    out.update({k.replace("_", "-"): v for k, v in extra.items()})
    return out


# --- processes ------------------------------------------------------------------------------------
@dataclass
class Server:
    """A server process started by :func:`spawn`: its kind, URL and pid."""

    kind: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a graceful stop), then SIGKILL if it does not exit in ``timeout`` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Servers:
    """The servers of one scenario: started in order, all stopped on exit (even on error)."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="specproxy-bench-"))
        self._servers: list[Server] = []

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        for server in reversed(self._servers):
            server.stop()
            if exc_type is not None:  # the scenario failed: show what each server said last
                print(f"--- {server.kind} log (last lines) ---\n{server.log_tail()}", file=sys.stderr)
        for path in self._dir.iterdir():
            path.unlink()
        self._dir.rmdir()

    def sim(self, time_scale: float = 0.0, **profile: Any) -> Server:
        """The simulator (``profile`` overrides SimProfile fields)."""
        return self._spawn("sim", "--time-scale", str(time_scale), "--profile", json.dumps(profile))

    def proxy(self, upstream: str, cprofile: str | None = None, tracemalloc: str | None = None,
              root: Path = ROOT, **settings: Any) -> Server:
        """specproxy in front of ``upstream`` (``settings`` as in ``config/specproxy.toml``); ``root``:
        the checkout whose code runs (another one to compare two versions side by side)."""
        extra = ["--cprofile", cprofile] if cprofile else []
        extra += ["--tracemalloc", tracemalloc] if tracemalloc else []
        return self._spawn("proxy", "--upstream", upstream, "--settings", json.dumps(settings), *extra, root=root)

    def hop(self, upstream: str) -> Server:
        """The minimal pass-through hop in front of ``upstream``."""
        return self._spawn("hop", "--upstream", upstream)

    def _spawn(self, kind: str, *args: str, root: Path = ROOT) -> Server:
        root = root.resolve()
        log_path = self._dir / f"{kind}-{len(self._servers)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPECPROXY_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "bench.servers", kind, *args], cwd=root, env=env,
                                    stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        server = Server(kind, "", proc, log_path)
        self._servers.append(server)
        server.url = _await_banner(server)
        return server


def _await_banner(server: Server) -> str:
    """Read the ``... listening on URL`` line a server prints once it accepts connections."""
    assert server.proc.stdout is not None
    fd = server.proc.stdout.fileno()
    deadline = time.monotonic() + START_TIMEOUT
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or server.proc.poll() is not None:
            raise RuntimeError(f"{server.kind} did not start:\n{server.log_tail()}")
        ready, _, _ = select.select([fd], [], [], min(left, 0.2))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk and server.proc.poll() is not None:
                continue
            buf += chunk
    line = buf.split(b"\n", 1)[0].decode()
    return line.rsplit(" ", 1)[-1]


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (``VmRSS`` of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc/PID/stat (clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    """Open file descriptors of a process (entries of /proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_fds(pid: int) -> int:
    """Open sockets of a process: entries of /proc/PID/fd that link to ``socket:[…]``."""
    count = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            if os.readlink(entry).startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


def raise_nofile() -> int:
    """Raise this process's open-files limit (the load generator opens 1,000+ connections)."""
    from bench.servers import raise_nofile as _raise

    return _raise()


def client_session(limit: int = 0, **kwargs: Any) -> aiohttp.ClientSession:
    """A keep-alive client session; ``limit`` 0 lets any number of connections open."""
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, force_close=False)
    return aiohttp.ClientSession(connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None),
                                 **kwargs)


async def get_json(session: aiohttp.ClientSession, url: str, method: str = "GET") -> Any:
    async with session.request(method, url) as resp:
        resp.raise_for_status()
        return await resp.json()


# --- request bodies -------------------------------------------------------------------------------
_UTF8_WORDS: Final = ("café", "naïve", "résumé", "Zürich", "smörgåsbord", "数据库", "页面缓存", "ページ", "키보드",
                      "🚀", "🙂", "Ελληνικά", "кэш", "δ→ε", "—", "emoji✨")


async def release_gate(
    session: aiohttp.ClientSession, sim: str, gate: str, tasks: Sequence[Awaitable[Any]]
) -> tuple[list[Any], list[dict[str, Any]], float]:
    """Open ``gate`` on the simulator (its warm answers), await the held ``tasks``, and read the log.

    Returns the tasks' results, the simulator's request log, and when the warm's response began
    (simulator clock): what release lag is measured from.
    """
    await get_json(session, sim + f"/_sim/gates/{gate}/open", "POST")
    outcomes = list(await asyncio.gather(*tasks))
    log: list[dict[str, Any]] = await get_json(session, sim + "/_sim/requests")
    warms = [e for e in log if e.get("gate") == gate]
    if len(warms) != 1 or warms[0]["response_started_at"] is None:
        raise RuntimeError(f"expected one warm with a response in the simulator log, got {len(warms)}")
    return outcomes, log, float(warms[0]["response_started_at"])


def context_text(n_bytes: int, kind: str = "ascii", seed: int = 0) -> str:
    """Deterministic prompt text of ``n_bytes`` UTF-8 bytes: C-like ASCII, or mixed UTF-8 prose."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    i = 0
    while size < n_bytes:
        if kind == "ascii":
            line = f"static int pagerStep{seed:03d}_{i:06d}(Pager *p, int n) {{ return p->nRef * {i % 97} + n; }}\n"
        else:
            words = [rng.choice(_UTF8_WORDS) if rng.random() < 0.35 else f"word{rng.randrange(1000)}"
                     for _ in range(12)]
            line = f"{seed:03d}.{i:06d} " + " ".join(words) + ".\n"
        parts.append(line)
        size += len(line.encode())
        i += 1
    text = "".join(parts)
    data = text.encode()[:n_bytes]
    return data.decode(errors="ignore")


def question_body(context: str, question: str, *, stream: bool = False, max_tokens: int = 1024,
                  cached: bool = True) -> dict[str, Any]:
    """The cookbook's shape: the context as a system block with a breakpoint, then the question."""
    block: dict[str, Any] = {"type": "text", "text": context}
    if cached:
        block["cache_control"] = {"type": "ephemeral"}
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "system": [block],
                            "messages": [{"role": "user", "content": question}]}
    if stream:
        body["stream"] = True
    return body


def warm_body(context: str) -> dict[str, Any]:
    """What an app sends to ``/prewarm``: the same system block, and a placeholder turn."""
    return {"model": MODEL, "system": [{"type": "text", "text": context, "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "."}]}


def dumps(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body)


# --- statistics -----------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: Sequence[float], qs: Iterable[int] = (50, 90, 99)) -> dict[str, float]:
    """``{"p50": …, "p90": …, "p99": …, "n": …}``, values rounded to 4 decimals."""
    out: dict[str, float] = {f"p{q}": round(percentile(values, q), 4) for q in qs}
    out["n"] = len(values)
    return out


def rotated(items: Sequence[Any], round_no: int) -> list[Any]:
    """``items`` rotated by the round number: each variant takes each slot in turn."""
    k = round_no % len(items)
    return list(items[k:]) + list(items[:k])


# --- targets and the table ------------------------------------------------------------------------
@dataclass
class Target:
    """A target to report against: the benchmark reports PASS or MISS, it never asserts."""

    name: str
    measured: float | None
    limit: float
    unit: str
    at_least: bool = False
    note: str = ""
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        m = self.measured
        self.passed = m is not None and m == m and (m >= self.limit if self.at_least else m <= self.limit)

    def line(self) -> str:
        op = "≥" if self.at_least else "≤"
        value = "n/a" if self.measured is None else f"{self.measured:.3f}".rstrip("0").rstrip(".")
        note = f"  ({self.note})" if self.note else ""
        verdict = "PASS" if self.passed else "MISS"
        return f"{verdict}  {self.name}: {value} {self.unit} (target {op} {self.limit:g}){note}"

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "measured": self.measured, "limit": self.limit, "unit": self.unit,
                "at_least": self.at_least, "pass": self.passed, "note": self.note}


def table(rows: Sequence[Sequence[Any]], head: Sequence[str]) -> str:
    """A plain-text table (right-aligned numbers)."""
    cells = [[str(h) for h in head]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                 strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def write_json(out_dir: Path, name: str, data: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    return path


def environment() -> dict[str, Any]:
    """What the numbers were measured on (no paths, no host names)."""
    import platform

    import aiohttp as _aiohttp

    try:
        import uvloop

        loop = f"uvloop {getattr(uvloop, '__version__', '?')}"
    except ImportError:
        loop = "asyncio"
    return {"python": platform.python_version(), "aiohttp": _aiohttp.__version__, "loop": loop,
            "cpus": os.cpu_count(), "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
