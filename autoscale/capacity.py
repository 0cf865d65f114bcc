"""One engine replica's speed as a function of its load, calibrated from a benchmark run.

`make bench` / `python -m servegraph.bench.compare` write, per target and load point (`c=N`
concurrent streams), the median time to first token and time per output token. Between the
measured concurrencies the model interpolates linearly; below the lowest it keeps the lowest
point's figures, above the highest it extends the last segment (more load, slower).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LoadPoint:
    concurrency: float
    ttft_s: float
    tpot_s: float


def _interpolate(points: tuple[LoadPoint, ...], concurrency: float, field: str) -> float:
    xs = [p.concurrency for p in points]
    ys = [getattr(p, field) for p in points]
    if len(points) == 1 or concurrency <= xs[0]:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, concurrency), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(ys[0], y0 + (y1 - y0) * (concurrency - x0) / (x1 - x0))


@dataclass(frozen=True)
class EngineCapacity:
    """TTFT and TPOT of one replica at a number of requests in its batch, plus its startup time."""

    points: tuple[LoadPoint, ...]
    startup_s: float
    source: str = ""

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a capacity needs at least one load point")
        object.__setattr__(self, "points", tuple(sorted(self.points, key=lambda p: p.concurrency)))

    def ttft_s(self, batch: float) -> float:
        return _interpolate(self.points, batch, "ttft_s")

    def tpot_s(self, batch: float) -> float:
        return _interpolate(self.points, batch, "tpot_s")

    @classmethod
    def from_bench(cls, path: Path, startup_s: float, target: str = "servegraph") -> EngineCapacity:
        """The load points of one target in a bench JSON (bench/results/bench-*.json)."""
        report = json.loads(path.read_text())
        results = report["results"].get(target)
        if not results:
            raise ValueError(f"{path}: no results for target {target!r} (has {', '.join(report['results'])})")
        points = [
            LoadPoint(float(point.removeprefix("c=")), figures["median_ttft_ms"] / 1e3, figures["median_tpot_ms"] / 1e3)
            for point, figures in results.items()
            if point.startswith("c=") and figures.get("completed")
        ]
        if not points:
            raise ValueError(f"{path}: target {target!r} has no concurrency load points (c=N) with completed requests")
        return cls(tuple(points), startup_s, str(path))

    def describe(self) -> str:
        rows = ", ".join(
            f"c={p.concurrency:g}: TTFT {p.ttft_s * 1e3:.0f} ms, TPOT {p.tpot_s * 1e3:.1f} ms" for p in self.points
        )
        return f"{rows}; startup {self.startup_s:g} s" + (f" (from {self.source})" if self.source else "")


def latest_bench(results_dir: Path) -> Path | None:
    runs = sorted(results_dir.glob("bench-*.json"))
    return runs[-1] if runs else None
