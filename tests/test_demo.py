"""``specproxy demo``: both flows run end to end against the simulator, and the report says what happened.

The demo runs at a tiny time scale and a small context. Assertions are on structure and counts
(headers, token counters, upstream requests), never on timings.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from specproxy.demo import CHARS_PER_TOKEN, FlowResult, load_context, report, run_demo

pytestmark = pytest.mark.timeout(90)


def _run_cli(*flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPECPROXY_", "ANTHROPIC_"))}
    return subprocess.run(
        [sys.executable, "-m", "specproxy.cli", "demo", *flags],
        capture_output=True,
        text=True,
        timeout=80,
        env=env,
        check=False,
    )


def _table(output: str) -> dict[str, tuple[str, str]]:
    """The report's rows: label → (standard, speculative)."""
    rows: dict[str, tuple[str, str]] = {}
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^\s+standard\s+speculative$", line))
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        label, std, spec = re.split(r"\s{2,}", line.strip())
        rows[label] = (std, spec)
    return rows


def _count(text: str) -> int:
    return int(text.replace(",", ""))


@pytest.fixture(scope="module")
def demo_output() -> str:
    done = _run_cli("--time-scale", "0.005", "--context-tokens", "20000", "--typing-seconds", "100")
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_demo_runs_the_standard_flow_then_the_speculative_flow(demo_output: str) -> None:
    assert demo_output.index("[1/2] standard") < demo_output.index("[2/2] speculative")
    assert "POST /prewarm -> 202" in demo_output
    assert demo_output.count("question sent:") == 2


def test_standard_flow_writes_the_cache_and_speculative_flow_reads_it(demo_output: str) -> None:
    rows = _table(demo_output)
    std_write, spec_write = (_count(v) for v in rows["cache-write tokens"])
    std_read, spec_read = (_count(v) for v in rows["cache-read tokens"])
    assert std_write >= 20_000 and std_read == 0
    assert spec_read == std_write and spec_write == 0


def test_speculative_question_reports_a_hit_on_the_warmed_prefix(demo_output: str) -> None:
    rows = _table(demo_output)
    assert rows["X-Cache-Warm"] == ("miss", "hit")
    assert rows["X-Cache-Warm-Wait-Ms"] == ("0", "0")
    assert re.fullmatch(r"[0-9a-f]{16}", rows["X-Cache-Warm-Prefix"][1])
    assert f"prefix={rows['X-Cache-Warm-Prefix'][1]}" in demo_output


def test_speculative_flow_sends_exactly_one_warm_and_one_question_upstream(demo_output: str) -> None:
    assert _table(demo_output)["upstream requests"] == ("1", "2")


def test_report_states_the_improvements_and_labels_scaled_times(demo_output: str) -> None:
    rows = _table(demo_output)
    assert {"time to first token (simulated)", "time to first token (measured)", "total time (simulated)"} <= set(rows)
    assert re.search(r"^TTFT improvement: +-?\d+\.\d% \(", demo_output, re.M)
    assert re.search(r"^Total improvement: +-?\d+\.\d% \(", demo_output, re.M)
    assert "time scale 0.005" in demo_output


def test_question_asked_while_the_warm_is_in_flight_still_reads_the_cache() -> None:
    done = _run_cli("--time-scale", "0.02", "--context-tokens", "20000", "--typing-seconds", "0")
    assert done.returncode == 0, done.stderr
    rows = _table(done.stdout)
    assert rows["X-Cache-Warm"][1] in ("held", "hit")
    assert _count(rows["cache-write tokens"][1]) == 0  # never a second write
    assert _count(rows["cache-read tokens"][1]) >= 20_000


def test_real_upstream_without_an_api_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    args = argparse.Namespace(
        time_scale=1.0, upstream="http://127.0.0.1:9", model=None, context_tokens=1000, typing_seconds=None
    )
    out, err = io.StringIO(), io.StringIO()
    assert run_demo(args, out, err) == 2
    assert "ANTHROPIC_API_KEY" in err.getvalue()


def test_context_is_deterministic_standard_library_source_of_the_asked_size() -> None:
    a = load_context(20_000, "salt-a")
    b = load_context(20_000, "salt-a")
    c = load_context(20_000, "salt-b")
    assert a == b
    assert a.text != c.text and a.text.splitlines()[1:] == c.text.splitlines()[1:]
    assert len(a.text) == 20_000 * CHARS_PER_TOKEN
    assert "# ===== Lib/asyncio/" in a.text and a.files > 1


def test_context_falls_back_to_filler_when_the_sources_are_missing(tmp_path: Path) -> None:
    ctx = load_context(5_000, "s", stdlib=tmp_path)
    assert ctx.files == 0 and ctx.source == "generated filler"
    assert len(ctx.text) == 5_000 * CHARS_PER_TOKEN


def test_report_explains_a_held_question() -> None:
    usage = {"input": 10, "cache_read": 0, "cache_write": 100, "output": 5}
    std = FlowResult("standard", 2.0, 3.0, usage, "miss", 0, "-")
    spec = FlowResult("speculative", 1.0, 2.0, {**usage, "cache_read": 100, "cache_write": 0}, "held", 700, "ab" * 8)
    lines = report(std, spec, 1.0, simulated=True)
    assert any("held 700 ms" in line for line in lines)
    assert any(line.startswith("TTFT improvement:  50.0%") for line in lines)
    assert not any("(simulated)" in line for line in lines)


def test_readme_opens_with_the_demo_command_then_the_test_command() -> None:
    root = Path(__file__).resolve().parents[1]
    readme = next((p for p in (root / "README.md", root / "docs" / "README-draft.md") if p.is_file()), None)
    if readme is None:
        pytest.skip("no README.md (nor docs/README-draft.md) yet")
    blocks = re.findall(r"```\w*\n(.*?)```", readme.read_text(encoding="utf-8"), re.S)
    assert blocks[0].strip().startswith("python -m pip install -e '.[demo]' && specproxy demo")
    assert blocks[1].strip() == (
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
    )


def test_simulated_seconds_scale_only_what_the_simulator_slept() -> None:
    from specproxy.demo import FlowResult

    flow = FlowResult(name="f", ttft=0.05, total=0.2, usage={}, header="hit", wait_ms=0, prefix="-",
                      fixed_ttft=0.01, fixed_total=0.02)
    ttft, total = flow.simulated(0.02)
    assert round(ttft, 6) == 2.01 and round(total, 6) == 9.02  # 0.01 + 0.04 / 0.02; 0.02 + 0.18 / 0.02
    assert FlowResult(name="f", ttft=0.005, total=0.01, usage={}, header="hit", wait_ms=0, prefix="-",
                      fixed_ttft=0.01, fixed_total=0.02).simulated(0.5) == (0.01, 0.02)  # never below the fixed
