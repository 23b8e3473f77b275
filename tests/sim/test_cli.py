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
