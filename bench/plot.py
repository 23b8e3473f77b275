"""PNG plots next to the JSON: the overhead distributions and the savings. matplotlib is an optional,
bench-only dependency (``pip install matplotlib``); without it the plots are skipped with a note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"direct": "#4c72b0", "proxy": "#dd8452", "hop": "#55a868"}


def plot(results: dict[str, dict[str, Any]], out: Path) -> str:
    """Write ``overhead.png`` and ``savings.png`` for the scenarios present; return what was done."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    written = []
    if "overhead" in results:
        written.append(_overhead(plt, results["overhead"], out / "overhead.png"))
    if "savings" in results:
        written.append(_savings(plt, results["savings"], out / "savings.png"))
    return "plots: " + (", ".join(p.name for p in written) if written else "none (no overhead or savings results)")


def _overhead(plt: Any, result: dict[str, Any], path: Path) -> Path:
    cases = result["cases"]
    fig, axes = plt.subplots(3, 3, figsize=(13, 10), constrained_layout=True)
    qs = list(range(1, 100))
    for ax, (key, case) in zip(axes.flat, cases.items(), strict=False):
        for variant, cdf in case["cdf_ms"].items():
            added = case["added_ms"].get(variant, {}).get("p50")
            label = variant if added is None else f"{variant} (+{added:.2f} ms p50)"
            ax.plot(cdf, qs, label=label, color=COLORS.get(variant))
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("ms")
        ax.set_ylabel("percentile")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Overhead: latency distributions (p1-p99), direct vs specproxy vs minimal hop")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _savings(plt: Any, result: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5), constrained_layout=True)
    cook = result["cookbook"]
    ax = axes[0]
    labels = ["TTFT", "total"]
    std = [cook["standard"]["ttft_s"], cook["standard"]["total_s"]]
    spec = [cook["speculative"]["ttft_s"], cook["speculative"]["total_s"]]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], std, 0.4, label="standard", color=COLORS["direct"])
    ax.bar([x + 0.2 for x in xs], spec, 0.4, label="speculative (specproxy)", color=COLORS["proxy"])
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("seconds (scaled to real time)")
    ax.set_title("Cookbook flow")
    ax.legend(fontsize=8)

    half = result["halfway"]
    ax = axes[1]
    ax.bar(["held (specproxy)", "unheld"], [half["held"]["ttft_s"], half["unheld"]["ttft_s"]],
           color=[COLORS["proxy"], COLORS["direct"]])
    ax.set_ylabel("TTFT, seconds")
    ax.set_title(f"Question halfway through the warm\ncache-write tokens: held {half['held']['cache_write_tokens']}, "
                 f"unheld {half['unheld']['cache_write_tokens']}", fontsize=10)

    fan = result["fanout"]
    ax = axes[2]
    ax.bar(["without", "with specproxy"], [fan["without"]["dollars"], fan["with"]["dollars"]],
           color=[COLORS["direct"], COLORS["proxy"]])
    ax.set_ylabel("dollars")
    ax.set_title(f"Fan-out of {fan['n']} questions\ncache writes: without {fan['without']['cache_writes']}, "
                 f"with {fan['with']['cache_writes']}", fontsize=10)
    fig.suptitle("Savings on the calibrated simulator")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
