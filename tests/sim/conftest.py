"""Fixtures for the simulator tests: a running simulator, a manual clock, and a raw HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from specproxy.testing import ManualClock, SimHandle, run_sim

from .helpers import Api


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def sim(clock: ManualClock) -> AsyncIterator[SimHandle]:
    async with run_sim(clock=clock, reply_tokens=12) as handle:
        yield handle


@pytest.fixture
async def api(sim: SimHandle) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(sim, session)
