"""The status page in a real headless browser: it renders, shows the warm it was sent, and refreshes.

Chromium (Debian's ``chromium`` package) is started by the test and driven over the DevTools
Protocol with aiohttp, by the same :class:`Chromium` that ``scripts/status_screenshot.py`` uses.
Skipped where Chromium is not installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import orjson
import pytest

from specproxy.testing import SimHandle, run_proxy
from tests.conftest import headers, question_body, warm_body

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "status_screenshot.py"
TOKEN = "status-page-token"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("status_screenshot", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclass-like introspection looks modules up by name
    spec.loader.exec_module(module)
    return module


screenshot = _load_script()
CHROMIUM = screenshot.find_chromium()
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)"),
    pytest.mark.timeout(45),
]

# The page's state as a person sees it: title, cards (label → value), outcome cards, table rows.
READ_PAGE = """
(() => {
  const cards = sel => Object.fromEntries([...document.querySelectorAll(sel + " .card")]
    .map(c => [c.lastChild.textContent, c.querySelector("b").textContent]));
  return {
    title: document.title,
    heading: document.querySelector("h1").textContent,
    cards: cards("#cards"),
    outcomes: cards("#outcomes"),
    rows: [...document.querySelectorAll("#rows tr")].map(tr => [...tr.children].map(td => td.textContent)),
    stateClasses: [...document.querySelectorAll("#rows tr")].map(tr => tr.children[1].className),
  };
})()
"""
CARD_LABELS = ["uptime (s)", "held now", "warms in flight", "cache-read tokens", "cache-write tokens", "$ spent",
               "$ saved", "warms wasted", "mismatches"]


async def test_status_page_renders_shows_the_warm_and_refreshes_in_a_browser(
    sim: SimHandle, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with run_proxy(sim.url, admin_token=TOKEN) as proxy:
        async with http.post(proxy.url + "/prewarm?wait=1", data=orjson.dumps(warm_body()), headers=headers()) as r:
            warm: dict[str, Any] = await r.json()
        assert warm["state"] == "warm"

        async with screenshot.Chromium(CHROMIUM, tmp_path / "chromium") as browser, asyncio.timeout(30):
            page = await browser.new_page(1200, 800)
            # The token rides in the query: the page passes it on to its status.json requests.
            await page.navigate(f"{proxy.url}/status?token={TOKEN}")
            first = await page.wait_refreshes(1)
            shown = await page.evaluate(READ_PAGE)
            assert (shown["title"], shown["heading"]) == ("specproxy status", "specproxy")
            assert list(shown["cards"]) == CARD_LABELS
            assert shown["cards"]["mismatches"] == "0"
            assert shown["outcomes"]["prewarm-sent"] == "1"
            assert len(shown["rows"]) == 1
            prefix, state, _age, uses, _expires = shown["rows"][0]
            assert (prefix, state, uses) == (warm["prefix"], "warm", "0")
            assert shown["stateClasses"] == ["warm"]

            # A question hits the warm; two refreshes later the page shows it without a reload.
            async with http.post(proxy.url + "/v1/messages", data=orjson.dumps(question_body()),
                                 headers=headers()) as r:
                assert r.headers["X-Cache-Warm"] == "hit"
            later = await page.wait_refreshes(first + 2)
            assert later >= first + 2
            shown = await page.evaluate(READ_PAGE)
            assert shown["outcomes"]["hit"] == "1"
            assert [(row[0], row[1], row[3]) for row in shown["rows"]] == [(warm["prefix"], "warm", "1")]
            assert int(shown["cards"]["cache-read tokens"]) > 0
