"""Screenshot of the ``/status`` page after demo-like traffic, taken with headless Chromium.

    python scripts/status_screenshot.py docs/status.png

Starts the simulator and the proxy in-process on free ports, sends a prewarm and the question that
hits it, a question held behind its in-flight warm, a cold question (a miss) and a streaming call,
then opens ``/status`` in headless Chromium (Debian's ``chromium`` package) at 1200×800 and saves
what it shows as a PNG.

Chromium is driven over the Chrome DevTools Protocol on its websocket with aiohttp, so no browser
automation package is needed. :class:`Chromium` is also what ``tests/test_status_browser.py`` uses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import orjson

if TYPE_CHECKING:
    from specproxy.testing import ProxyHandle, SimHandle

# The flags the headless browser runs with: no sandbox (root in a container), no GPU, and nothing
# that talks to the network on its own (updates, sync, field trials).
FLAGS: Final = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-breakpad", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
    "--remote-debugging-port=0",
)  # fmt: skip
_LISTENING: Final = re.compile(rb"DevTools listening on (ws://\S+)")

# Resolves with the page's refresh count once it reaches at least N (a MutationObserver: no polling).
_WAIT_REFRESHES: Final = """
new Promise(resolve => {
  const el = document.getElementById("updated");
  const count = () => Number(el.dataset.refreshes || 0);
  if (count() >= %d) { resolve(count()); return; }
  new MutationObserver((_, observer) => {
    if (count() >= %d) { observer.disconnect(); resolve(count()); }
  }).observe(el, {attributes: true, attributeFilter: ["data-refreshes"]});
})
"""


def find_chromium() -> str | None:
    """The Chromium executable: ``$CHROMIUM``, else ``chromium`` (Debian) or ``chromium-browser`` on PATH."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class CDPError(RuntimeError):
    """A DevTools command answered with an error, or the browser did not start."""


class Page:
    """One tab, attached over the browser's websocket (a flattened CDP session)."""

    def __init__(self, browser: Chromium, session_id: str) -> None:
        self._browser = browser
        self._session = session_id

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._browser.send(method, params, session_id=self._session)

    async def navigate(self, url: str) -> None:
        """Open ``url`` and return once its load event has fired."""
        loaded = self._browser.expect("Page.loadEventFired", self._session)
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigation failed: {result['errorText']}")
        await loaded

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = await self.send(
            "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}
        )
        if "exceptionDetails" in result:
            raise CDPError(f"script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    async def wait_refreshes(self, at_least: int) -> int:
        """Wait until the status page has refreshed ``at_least`` times; its count then."""
        count: int = await self.evaluate(_WAIT_REFRESHES % (at_least, at_least))
        return count

    async def screenshot(self) -> bytes:
        """The viewport as PNG bytes."""
        result = await self.send("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(result["data"])


class Chromium:
    """Headless Chromium in its own process group, driven over the DevTools Protocol.

        async with Chromium(path, user_data_dir) as browser:
            page = await browser.new_page(1200, 800)
            await page.navigate(url)

    On exit the browser is asked to close, then its whole process group is killed: no leftovers.
    """

    def __init__(self, executable: str, user_data_dir: Path, *, start_timeout: float = 30.0) -> None:
        self._exe = executable
        self._dir = user_data_dir
        self._start_timeout = start_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: list[tuple[str, str | None, asyncio.Future[dict[str, Any]]]] = []
        self._stderr_tail: list[bytes] = []

    async def __aenter__(self) -> Chromium:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            self._exe, *FLAGS, f"--user-data-dir={self._dir}", "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group, so its helpers die with it
        )
        try:
            async with asyncio.timeout(self._start_timeout):
                ws_url = await self._read_ws_url()
        except TimeoutError:
            raise CDPError("Chromium did not open its DevTools port: " + self._tail()) from None
        self._tasks.append(asyncio.create_task(self._drain_stderr()))
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(ws_url, max_msg_size=0)
        self._tasks.append(asyncio.create_task(self._read()))

    async def _read_ws_url(self) -> str:
        assert self._proc is not None and self._proc.stderr is not None
        while line := await self._proc.stderr.readline():
            self._keep(line)
            found = _LISTENING.search(line)
            if found:
                return found.group(1).decode()
        raise CDPError("Chromium exited before opening its DevTools port: " + self._tail())

    def _keep(self, line: bytes) -> None:
        self._stderr_tail = [*self._stderr_tail[-9:], line]

    def _tail(self) -> str:
        return b"".join(self._stderr_tail).decode(errors="replace").strip()

    async def _drain_stderr(self) -> None:
        # Chromium keeps logging to stderr; an unread pipe would fill up and stall it.
        assert self._proc is not None and self._proc.stderr is not None
        while line := await self._proc.stderr.readline():
            self._keep(line)

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            data = orjson.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            for waiter in list(self._waiters):
                method, session, future = waiter
                if data.get("method") == method and (session is None or data.get("sessionId") == session):
                    self._waiters.remove(waiter)
                    if not future.done():
                        future.set_result(data.get("params", {}))
        gone = CDPError("the DevTools connection closed: " + self._tail())
        for future in [*self._pending.values(), *(w[2] for w in self._waiters)]:
            if not future.done():
                future.set_exception(gone)

    async def send(self, method: str, params: dict[str, Any] | None = None, *,
                   session_id: str | None = None) -> dict[str, Any]:
        """One DevTools command; its result."""
        assert self._ws is not None
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        await self._ws.send_str(orjson.dumps(message).decode())
        answer = await future
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error'].get('message')}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    def expect(self, method: str, session_id: str | None = None) -> asyncio.Future[dict[str, Any]]:
        """A future for the next ``method`` event (register it before the command that causes it)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((method, session_id, future))
        return future

    async def new_page(self, width: int = 1200, height: int = 800) -> Page:
        """A new tab with a ``width``×``height`` viewport."""
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        await page.send("Page.enable")
        await page.send("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        return page

    async def close(self) -> None:
        """Close the browser (politely, then by killing its process group) and everything opened for it."""
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.send("Browser.close")
            await self._ws.close()
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await proc.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group we started: renderer, GPU and zygote helpers
            await proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()


# --- the screenshot -----------------------------------------------------------------------------------
MODEL: Final = "claude-sonnet-4-6"
KEY: Final = "sk-ant-screenshot-0001"  # the simulator hashes it and never checks it


def _context(name: str, functions: int = 2000) -> str:
    """A source-like context of about 20k tokens (the simulator counts 4 characters a token)."""
    return f"# module {name}\n" + "".join(f"def {name}_{i}(x):\n    return x * {i} + {i % 7}\n\n"
                                          for i in range(functions))


def _body(context: str, question: str | None = None) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = [{"type": "text", "text": context, "cache_control": {"type": "ephemeral"}}]
    if question is not None:
        blocks.append({"type": "text", "text": question})
    return {"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": blocks}]}


def _headers(**extra: str) -> dict[str, str]:
    return {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json", **extra}


async def _until(check: Callable[[], bool]) -> None:
    """Wait for a state another task reaches (the proxy exposes no event for "a request is held")."""
    while True:
        if check():
            return
        await asyncio.sleep(0.01)


async def demo_traffic(http: aiohttp.ClientSession, proxy: ProxyHandle, sim: SimHandle) -> None:
    """Prewarm + hit, held, miss, and a streaming call (which hits the first warm)."""

    async def post(path: str, body: dict[str, Any], **extra: str) -> str:
        async with http.post(proxy.url + path, data=orjson.dumps(body), headers=_headers(**extra)) as r:
            await r.read()
            r.raise_for_status()
            return r.headers.get("X-Cache-Warm", "")

    await post("/prewarm?wait=1", _body(_context("billing")))
    await post("/v1/messages", _body(_context("billing"), "Which function adds 3?"))
    await post("/prewarm", _body(_context("search")), **{"x-sim-gate": "typing"})  # still "typing"
    held = asyncio.create_task(post("/v1/messages", _body(_context("search"), "What does search_7 return?")))
    async with asyncio.timeout(10):
        await _until(lambda: proxy.held == 1)  # the question is held behind its warm
    await sim.open_gate("typing")
    await held
    await post("/v1/messages", _body(_context("reports"), "Summarise reports_1."))
    await post("/v1/messages", {**_body(_context("billing"), "And billing_12?"), "stream": True})


async def take(width: int = 1200, height: int = 800) -> bytes:
    """Run the servers and the traffic, then take the status page as a PNG."""
    from specproxy.testing import run_proxy, run_sim

    executable = find_chromium()
    if executable is None:
        raise SystemExit("Chromium is not installed (Debian: apt-get install chromium; or set CHROMIUM)")
    async with run_sim(time_scale=0.0) as sim, run_proxy(sim.url) as proxy, aiohttp.ClientSession() as http:
        await demo_traffic(http, proxy, sim)
        with tempfile.TemporaryDirectory(prefix="specproxy-chromium-") as profile:
            async with Chromium(executable, Path(profile)) as browser:
                page = await browser.new_page(width, height)
                await page.navigate(proxy.url + "/status")
                async with asyncio.timeout(20):
                    await page.wait_refreshes(1)
                return await page.screenshot()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "docs/status.png")
    png = asyncio.run(take())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    print(f"saved {out} ({len(png)} bytes)")


if __name__ == "__main__":
    main()
