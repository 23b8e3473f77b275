"""Smoke tests of the benchmarks: each scenario runs in its tiny ``--quick`` mode and writes JSON with
the expected keys and sane counts. Timings are never asserted (a benchmark reports, it does not judge).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_bench(scenario: str, out: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", scenario, "--quick", "--no-plot", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=55,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"== {scenario}" in proc.stdout
    data: dict[str, Any] = json.loads((out / f"{scenario}.json").read_text())
    assert data["scenario"] == scenario
    assert data["quick"] is True
    assert {"env", "seconds", "loadavg_1m"} <= data.keys()
    for target in data.get("targets", []):
        assert {"name", "measured", "limit", "pass"} <= target.keys()
    return data


def test_overhead_reports_added_latency_for_every_case_and_variant(tmp_path: Path) -> None:
    data = run_bench("overhead", tmp_path)
    assert len(data["cases"]) == 9
    for key, case in data["cases"].items():
        assert set(case["ms"]) == {"direct", "proxy", "hop"}, key
        assert set(case["added_ms"]) == {"proxy", "hop"}, key
        assert {"p50", "p90", "p99"} <= case["added_ms"]["proxy"].keys()
        assert case["ms"]["proxy"]["n"] == case["ms"]["direct"]["n"] > 0
        assert len(case["cdf_ms"]["direct"]) == 99
    assert len(data["targets"]) == 3


def test_release_forwards_every_held_request_once(tmp_path: Path) -> None:
    data = run_bench("release", tmp_path)
    for n, result in data["results"].items():
        assert result["held_seen"] == [int(n)] * result["trials"]
        assert result["forwarded"] == [int(n)] * result["trials"]
        assert result["outcomes"] == {"held": int(n) * result["trials"]}
        assert result["lag_ms"]["n"] == int(n) * result["trials"]


def test_throughput_measures_each_variant_without_failures(tmp_path: Path) -> None:
    data = run_bench("throughput", tmp_path)
    assert set(data["rps_median"]) == {"direct", "proxy", "hop"}
    assert all(rate > 0 for rate in data["rps_median"].values())
    assert data["failed"] == {"direct": 0, "proxy": 0, "hop": 0}
    assert data["proxy_over_hop"] > 0


def test_savings_fanout_writes_the_cache_once_with_the_proxy(tmp_path: Path) -> None:
    data = run_bench("savings", tmp_path)
    fan = data["fanout"]
    assert fan["n"] == 10
    assert fan["with"]["cache_writes"] == 1
    assert fan["with"]["cache_reads"] == 10
    assert fan["without"]["cache_writes"] > 1  # all cold at once (how many overlap depends on the machine)
    assert fan["with"]["dollars"] < fan["without"]["dollars"]
    assert data["cookbook"]["speculative"]["outcome"] in ("hit", "held")  # "held" if the warm ran late
    assert data["cookbook"]["speculative"]["cache_write_tokens"] == 0
    assert data["halfway"]["held"]["outcome"] == "held"
    assert data["halfway"]["unheld"]["cache_write_tokens"] > 0


def test_memory_reads_rss_idle_with_streams_and_after_a_mixed_run(tmp_path: Path) -> None:
    data = run_bench("memory", tmp_path)
    streams = data["streams"]
    assert streams["completed"] == streams["streams"] == 50
    assert streams["idle"]["rss_mb"] > 0
    assert streams["with_streams"]["rss_mb_peak"] >= streams["idle"]["rss_mb"] * 0.9
    assert data["mixed"]["requests_sent"] > 0
    assert isinstance(data["mixed"]["grew"], bool)


def test_soak_loses_and_alters_nothing(tmp_path: Path) -> None:
    data = run_bench("soak", tmp_path)
    assert data["requests_sent"] > 0
    assert data["requests_served"] > 0
    verification = data["verification"]
    assert verification["lost"] == 0
    assert verification["altered"] == 0
    assert verification["duplicated"] == 0
    assert data["errors_unexpected"] == {}
    assert data["proxy"]["held_after"] == 0
    # Hostile traffic was mixed in, and each kind got the answer it should.
    assert data["hostile"] is True and data["hostile_unexpected"] == {}
    kinds = {key.split(": ")[0] for key in data["hostile_expected"]}
    assert {"slow_headers", "oversized_header", "control_char_key", "garbage_prewarm"} <= kinds
    assert data["actions"].get("compressed", 0) > 0 and data["actions"].get("garbage_key", 0) > 0
