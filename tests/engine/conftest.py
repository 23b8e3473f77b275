"""Fixtures of the engine tests: one real llama-server for the session, a gate in front of it, and
specproxy (``upstream_profile = llamacpp``) in front of the gate.

    client ─► specproxy ─► gate ─► llama-server (2 slots, tiny random-weight model)

The tests skip, with the reason, when llama-server is not built (``scripts/build_llama_server.sh``;
``.ci/run`` builds it) or the ``gguf`` package is missing.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from specproxy.testing import ProxyHandle, run_proxy
from tests.engine import llama

SLOTS = 2
_count = itertools.count()


def _unavailable(reason: str) -> None:
    """Skip, or fail where the engine is required (``SPECPROXY_REQUIRE_ENGINE=1``, as .ci/run sets)."""
    if os.environ.get("SPECPROXY_REQUIRE_ENGINE") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[llama.LlamaServer]:
    if llama.binary() is None:
        _unavailable("llama-server is not built in the cache directory: run scripts/build_llama_server.sh "
                     "(.ci/run builds it)")
    if importlib.util.find_spec("gguf") is None:
        _unavailable("the gguf package is missing (pip install -e '.[test]')")
    path = llama.model(**llama.TINY)
    with llama.serving(path, slots=SLOTS, ctx_per_slot=8192, log_dir=tmp_path_factory.mktemp("llama")) as server:
        yield server


@pytest.fixture
async def gate(llama_server: llama.LlamaServer) -> AsyncIterator[llama.Gate]:
    async with llama.gate(llama_server.url) as g:
        yield g


@pytest.fixture
async def engine_proxy(gate: llama.Gate) -> AsyncIterator[ProxyHandle]:
    async with run_proxy(gate.url, upstream_profile="llamacpp", max_hold=120.0, warm_timeout=120.0,
                         upstream_read_timeout=120.0) as p:
        yield p


def context(tag: str, lines: int = 120) -> str:
    """A context of about 20 tokens a line, unique from its first token on (no two tests share a
    prefix in the engine's slots beyond the chat template's opening)."""
    unique = f"Document {tag}-{next(_count)}.\n"
    return unique + "".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(lines))


def messages(ctx: str, question: str | None = None, *, cache_control: bool = True) -> list[dict[str, Any]]:
    block: dict[str, Any] = {"type": "text", "text": ctx}
    if cache_control:
        block["cache_control"] = {"type": "ephemeral"}
    blocks = [block]
    if question is not None:
        blocks.append({"type": "text", "text": question})
    return [{"role": "user", "content": blocks}]
