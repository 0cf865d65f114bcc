"""Tables, ratios and the plot of a side-by-side benchmark."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

OURS = "servegraph"
COLUMNS = [
    ("tok/s", "output_throughput", "{:.0f}"),
    ("req/s", "request_throughput", "{:.2f}"),
    ("TTFT p50", "median_ttft_ms", "{:.0f}"),
    ("TTFT p99", "p99_ttft_ms", "{:.0f}"),
    ("TPOT p50", "median_tpot_ms", "{:.1f}"),
    ("E2E p50", "median_e2el_ms", "{:.0f}"),
    ("failed", "failed", "{}"),
]
PLOTS = [
    ("output_throughput", "output tokens/s"),
    ("median_ttft_ms", "TTFT p50 (ms)"),
    ("median_tpot_ms", "TPOT p50 (ms)"),
    ("median_e2el_ms", "end-to-end p50 (ms)"),
]

Results = dict[str, dict[str, dict[str, Any]]]  # target -> load point label -> summary
COUNTS = ("completed", "failed", "total_output_tokens")  # summed over rounds; every other figure: median


def median_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of several rounds of a load point: the median of each figure (and of each
    stage's CPU per 1,000 requests, the peak of its RSS), request counts summed."""
    summary: dict[str, Any] = {"rounds": len(runs)}
    for key, value in runs[0].items():
        if key in COUNTS:
            summary[key] = sum(run[key] for run in runs)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            summary[key] = statistics.median(run[key] for run in runs if run.get(key) is not None)
    stages = dict.fromkeys(stage for run in runs for stage in run.get("processes", {}))
    summary["processes"] = {
        stage: {
            "cpu_s_per_1k": statistics.median(run["processes"].get(stage, {}).get("cpu_s_per_1k", 0.0) for run in runs),
            "peak_rss_mib": max(run["processes"].get(stage, {}).get("peak_rss_mib", 0) for run in runs),
        }
        for stage in stages
    }
    return summary


def markdown(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def table(results: Results) -> str:
    """One row per target and load point; times in ms."""
    rows = [["target", "load", *(label for label, _, _ in COLUMNS)]]
    for target, points in results.items():
        for point, summary in points.items():
            rows.append([target, point, *(fmt.format(summary[key]) for _, key, fmt in COLUMNS)])
    return markdown(rows)


def process_table(results: Results) -> str:
    """Per target and load point, each stage's CPU seconds per 1,000 requests and peak RSS."""
    rows = [["target", "load", "stage", "CPU s / 1k req", "peak RSS MiB"]]
    for target, points in results.items():
        for point, summary in points.items():
            for stage, usage in summary.get("processes", {}).items():
                rows.append([target, point, stage, f"{usage['cpu_s_per_1k']:.1f}", str(usage["peak_rss_mib"])])
    return markdown(rows)


def ratios(results: Results) -> dict[str, dict[str, dict[str, float]]]:
    """Ours against every other target at every load point: tok/s ratio and TTFT p50 gap in ms."""
    ours = results.get(OURS, {})
    return {
        other: {
            point: {
                "throughput_ratio": ours[point]["output_throughput"] / summary["output_throughput"],
                "ttft_p50_gap_ms": ours[point]["median_ttft_ms"] - summary["median_ttft_ms"],
            }
            for point, summary in points.items()
            if point in ours and summary["output_throughput"]
        }
        for other, points in results.items()
        if other != OURS
    }


def ratio_table(ratios_by_peer: dict[str, dict[str, dict[str, Any]]]) -> str:
    """ratios_by_peer: what ratios() gives, with each round's ratio where known."""
    rows = [["ours vs", "load", "tok/s ratio", "TTFT p50 gap ms", "tok/s ratio by round"]]
    for other, points in ratios_by_peer.items():
        for point, r in points.items():
            by_round = ", ".join(f"{value:.2f}" for value in r.get("throughput_ratio_by_round", []))
            rows.append([other, point, f"{r['throughput_ratio']:.2f}x", f"{r['ttft_p50_gap_ms']:+.0f}", by_round])
    return markdown(rows) if len(rows) > 1 else ""


def plot(results: Results, xs: dict[str, float], x_label: str, title: str, path: Path) -> None:
    """A 2x2 grid (throughput, TTFT, TPOT, E2E) against the load, one line per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, label) in zip(axes.flat, PLOTS, strict=True):
        for target, points in results.items():
            ax.plot([xs[p] for p in points], [s[key] for s in points.values()], marker="o", label=target)
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
