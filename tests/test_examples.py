"""The examples run as written against a simulator and a proxy started here, and print ``X-Cache-Warm``.

Each example is a subprocess with only ``SPECPROXY_URL`` and ``ANTHROPIC_API_KEY`` set, exactly as
a newcomer runs it. The JavaScript example needs node, npm and the npm registry (its dependencies
are installed into a temporary copy); the curl example needs bash and curl; each skips with the
reason when its tool is missing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest

from specproxy.serving import running
from specproxy.testing import ProxyHandle, SimHandle, run_proxy, run_sim

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
KEY = "sk-ant-examples-test"
WARM_OUTCOMES = ("hit", "held")  # a question after its warm: at once, or held until the warm wrote


@pytest.fixture
async def stack() -> AsyncIterator[tuple[SimHandle, ProxyHandle]]:
    async with run_sim(time_scale=0.0) as sim, run_proxy(sim.url) as proxy:
        yield sim, proxy


def _env(proxy_url: str) -> dict[str, str]:
    """The caller's environment without any Anthropic or specproxy settings, plus the example's two."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "SPECPROXY_"))}
    env.update(SPECPROXY_URL=proxy_url, ANTHROPIC_API_KEY=KEY, SPECPROXY_TYPING_SECONDS="0.2")
    return env


async def _run(*argv: str, env: dict[str, str], cwd: Path | None = None) -> str:
    """Run an example without blocking the event loop the simulator and proxy live on."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=45)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{out.decode()}\n{err.decode()}"
    return out.decode()


async def _assert_read_the_warm_cache(output: str, sim: SimHandle) -> None:
    match = re.search(r"^X-Cache-Warm: (\S+)$", output, re.M)
    assert match, output
    assert match.group(1) in WARM_OUTCOMES, output
    assert re.search(r"^X-Cache-Warm-Prefix: [0-9a-f]{16}$", output, re.M), output
    reads = re.search(r"cache_read_input_tokens[=:] ?(\d+)", output)
    assert reads and int(reads.group(1)) > 1000, output
    stats = await sim.stats()
    assert stats["requests"] == 2  # the warm and the question
    assert stats["cache_writes"] == 1  # only the warm wrote; the question read


async def test_python_sdk_example_prewarms_then_reads_the_warm_cache(stack: tuple[SimHandle, ProxyHandle]) -> None:
    sim, proxy = stack
    output = await _run(sys.executable, str(EXAMPLES / "python_sdk.py"), env=_env(proxy.url))
    assert "typing starts: POST /prewarm" in output
    await _assert_read_the_warm_cache(output, sim)


@pytest.fixture(scope="session")
def js_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of examples/typescript with its dependencies installed (the tree stays clean)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the JavaScript example")
    copy = tmp_path_factory.mktemp("typescript")
    for name in ("package.json", "example.mjs", ".npmrc"):
        shutil.copy(EXAMPLES / "typescript" / name, copy / name)
    try:
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=copy, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip("npm install timed out: the npm registry is unreachable or slow")
    if done.returncode != 0:
        pytest.skip(f"npm install failed (registry unreachable?): {done.stderr.strip()[-300:]}")
    return copy


@pytest.mark.timeout(180)
async def test_javascript_example_prewarms_then_reads_the_warm_cache(
    js_example: Path, stack: tuple[SimHandle, ProxyHandle]
) -> None:
    sim, proxy = stack
    output = await _run("node", "example.mjs", env=_env(proxy.url), cwd=js_example)
    assert "typing starts: POST /prewarm" in output
    await _assert_read_the_warm_cache(output, sim)


async def test_curl_example_prewarms_then_reads_the_warm_cache(stack: tuple[SimHandle, ProxyHandle]) -> None:
    if shutil.which("curl") is None or shutil.which("bash") is None:
        pytest.skip("bash and curl are needed for the curl example")
    sim, proxy = stack
    output = await _run("bash", str(EXAMPLES / "curl.sh"), env=_env(proxy.url))
    assert "typing starts: POST /prewarm" in output
    await _assert_read_the_warm_cache(output, sim)


def _webpage_server() -> ModuleType:
    spec = importlib.util.spec_from_file_location("specproxy_example_webpage", EXAMPLES / "webpage" / "server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_webpage_backend_prewarms_on_focus_then_answers_from_the_warm_cache(
    stack: tuple[SimHandle, ProxyHandle], capsys: pytest.CaptureFixture[str]
) -> None:
    sim, proxy = stack
    server = _webpage_server()
    async with running(server.make_app(proxy.url, KEY)) as page, aiohttp.ClientSession() as http:
        async with http.get(page.url + "/") as resp:
            html = await resp.text()
            assert resp.status == 200 and "/api/prewarm" in html and 'addEventListener("focus"' in html
        async with http.post(page.url + "/api/prewarm") as resp:
            assert resp.status == 202
            assert (await resp.json())["state"] in ("warming", "warm")
        async with http.post(page.url + "/api/ask", json={"question": "What is a Semaphore for?"}) as resp:
            assert resp.status == 200
            answer = await resp.json()
    assert answer["x_cache_warm"] in WARM_OUTCOMES
    assert answer["usage"]["cache_read_input_tokens"] > 1000
    assert answer["answer"]
    assert "X-Cache-Warm: " in capsys.readouterr().out
    assert (await sim.stats())["cache_writes"] == 1


def test_examples_read_only_the_documented_environment_variables() -> None:
    for path in (EXAMPLES / "python_sdk.py", EXAMPLES / "typescript" / "example.mjs", EXAMPLES / "curl.sh"):
        text = path.read_text(encoding="utf-8")
        assert "SPECPROXY_URL" in text and "ANTHROPIC_API_KEY" in text, path
        assert "http://127.0.0.1:8787" in text, path
        assert "X-Cache-Warm" in text or "x-cache-warm" in text, path
