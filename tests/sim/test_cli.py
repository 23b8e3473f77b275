"""``specproxy sim`` starts a real server from the command line."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]


async def test_the_sim_command_serves_until_terminated() -> None:
    # Port 0 and the printed banner, rather than a guessed free port: no race with other processes.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "specproxy.cli", "sim", "--port", "0", "--time-scale", "0",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        banner = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        match = re.search(r"listening on (http://\S+)", banner)
        assert match, banner
        async with aiohttp.ClientSession() as session, session.get(match.group(1) + "/healthz") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok"}
    finally:
        if proc.returncode is None:
            proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) is not None


async def _start(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "specproxy.cli", "sim", "--port", "0", "--time-scale", "0", *args,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    banner = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    match = re.search(r"listening on (http://\S+)", banner)
    assert match, banner
    return proc, match.group(1)


async def test_the_sim_command_takes_a_dialect_and_the_cache_report_flag() -> None:
    proc, url = await _start("--dialect", "sglang", "--cache-report")
    try:
        async with aiohttp.ClientSession() as session, session.get(url + "/get_server_info") as resp:
            assert resp.headers["server"] == "uvicorn"
            info = await resp.json()
            assert (info["enable_cache_report"], info["page_size"]) == (True, 1)
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) is not None


async def test_the_sim_command_extends_the_model_table_from_a_file(tmp_path: Path) -> None:
    models = tmp_path / "models.json"
    models.write_text('{"claude-local": {"prefill": false, "max_output_tokens": 100}}')
    proc, url = await _start("--models", str(models))
    try:
        headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
        async with aiohttp.ClientSession() as session, session.get(url + "/v1/models/claude-local",
                                                                    headers=headers) as resp:
            assert (await resp.json())["max_tokens"] == 100
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) is not None


def test_a_bad_models_file_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    from specproxy.cli import main

    models = tmp_path / "models.toml"
    models.write_text('[models."claude-x"]\nprefill = "no"\n')
    assert main(["sim", "--models", str(models)]) == 2
