"""``python -m bench engine --quick`` against the real llama-server: it runs, and its JSON holds
every comparison with sane counts (a benchmark reports; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine import llama


@pytest.mark.timeout(180)  # the engine benchmark starts its own llama-server and runs every comparison
def test_bench_engine_quick_reports_every_comparison(llama_server: llama.LlamaServer, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "engine", "--quick", "--no-plot", "--out", str(tmp_path)],
        cwd=llama.ROOT, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "== engine" in proc.stdout and "fan-out of 2" in proc.stdout
    data = json.loads((tmp_path / "engine.json").read_text())
    assert data["scenario"] == "engine" and data["quick"] is True
    summary = data["summary"]
    assert summary["cold_vs_prewarmed"]["cold_ttft_s"] > 0
    assert data["cold_vs_prewarmed"]["prewarmed"]["outcome"] == "hit"
    assert data["cold_vs_prewarmed"]["prewarmed"]["cache_read"] > 1000
    during = summary["during_warm"]
    # The question leaves right after the proxy's 202. Whether the tiny model's warm is still
    # computing then is up to the machine; what the proxy answers must follow from it.
    state = during["proxy"]["warm_state_at_question"]
    assert state in ("warming", "warm"), state
    assert during["proxy"]["outcome"] == ("held" if state == "warming" else "hit")
    assert during["straight"]["outcome"] == "-"
    assert during["proxy"]["cache_read_share"] >= 0.9
    fan = summary["fan_out"]
    assert sorted(fan["proxy"]["outcomes"]) == ["held", "miss"]  # one leads, the other follows it
    assert fan["proxy"]["computed_tokens"] > 0 and fan["straight"]["computed_tokens"] > 0
