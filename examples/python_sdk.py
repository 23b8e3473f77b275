"""The official Anthropic Python SDK through specproxy: prewarm while the user types, then ask.

    SPECPROXY_URL=http://127.0.0.1:8787 ANTHROPIC_API_KEY=sk-ant-... python examples/python_sdk.py

Nothing changes in the SDK call but ``base_url``. When "typing starts", one plain HTTP call to
``/prewarm`` sends the shared context upstream with ``cache_control`` and ``max_tokens: 0``; the
question then reads the warm cache (or, if it comes early, is held until the warm has written it).
Against the simulator (``specproxy sim``) any API key works.
"""

from __future__ import annotations

import asyncio.tasks
import json
import os
import time
import urllib.request
from pathlib import Path

import anthropic

PROXY = os.environ.get("SPECPROXY_URL", "http://127.0.0.1:8787").rstrip("/")
API_KEY = os.environ.get("ANTHROPIC_API_KEY", "any-key-works-with-the-simulator")
MODEL = "claude-sonnet-4-6"
TYPING_SECONDS = float(os.environ.get("SPECPROXY_TYPING_SECONDS", "3"))

# A large shared context: CPython's asyncio/tasks.py (~10k tokens), with the cache breakpoint on it.
CONTEXT = {
    "type": "text",
    "text": Path(asyncio.tasks.__file__).read_text(encoding="utf-8"),
    "cache_control": {"type": "ephemeral"},
}
SYSTEM = "You are an expert Python programmer. Answer questions about the source code you are given."


def prewarm() -> dict[str, object]:
    """POST /prewarm with the prefix the question will share: same model, system and context block."""
    body = {"model": MODEL, "system": SYSTEM, "messages": [{"role": "user", "content": [CONTEXT]}]}
    request = urllib.request.Request(
        f"{PROXY}/prewarm",
        data=json.dumps(body).encode(),
        headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # 202 at once: the warm runs in the background
        return json.load(response)


def main() -> None:
    client = anthropic.Anthropic(base_url=PROXY, api_key=API_KEY)

    print("typing starts: POST /prewarm ->", prewarm())
    time.sleep(TYPING_SECONDS)  # the user types; the proxy warms the cache meanwhile
    question = "What does asyncio.shield() protect against, in one sentence?"
    print("question:", question)

    raw = client.messages.with_raw_response.create(
        model=MODEL,
        max_tokens=300,
        system=SYSTEM,
        messages=[{"role": "user", "content": [CONTEXT, {"type": "text", "text": question}]}],
    )
    message = raw.parse()
    print("X-Cache-Warm:", raw.headers.get("x-cache-warm"))
    print("X-Cache-Warm-Wait-Ms:", raw.headers.get("x-cache-warm-wait-ms"))
    print("X-Cache-Warm-Prefix:", raw.headers.get("x-cache-warm-prefix"))
    usage = message.usage
    print(
        f"usage: input_tokens={usage.input_tokens} "
        f"cache_read_input_tokens={usage.cache_read_input_tokens} "
        f"cache_creation_input_tokens={usage.cache_creation_input_tokens} "
        f"output_tokens={usage.output_tokens}"
    )
    text = "".join(block.text for block in message.content if block.type == "text")
    print("answer:", text[:200] + ("…" if len(text) > 200 else ""))


if __name__ == "__main__":
    main()
