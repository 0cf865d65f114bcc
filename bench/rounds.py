"""Targets loaded in rounds, in turns, all but the one under load stopped: figures that share
the machine's drift. bench.compare pairs our graph with each peer; bench.ab pairs two checkouts."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servegraph.bench.hosting import Runner
from servegraph.bench.processes import measured
from servegraph.bench.report import OURS, median_summary, ratios
from servegraph.bench.workload import LoadPoint, Workload


def round_order(sides: list[Any], round_index: int) -> list[Any]:
    """ABBA: each side goes first as often as the other, so a steady drift favours neither."""
    return sides if round_index % 2 == 0 else sides[::-1]


@dataclass
class Figures:
    """Everything one benchmark run measured: every round of every target at every load point,
    one-token latencies, and what failed."""

    rounds: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def add(self, target: str, point: str, run: dict[str, Any], pair: str) -> None:
        """pair: the peer whose rounds this run shared (ours runs in every pair)."""
        self.rounds.setdefault(target, {}).setdefault(point, []).append({**run, "pair": pair})

    def results(self, pair: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """Medians over rounds per target and load point; only the rounds of one pair if given."""
        return {
            target: {point: median_summary(chosen) for point, runs in points.items() if (chosen := select(runs, pair))}
            for target, points in self.rounds.items()
            if any(select(runs, pair) for runs in points.values())
        }

    def ratios(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Ours against each peer, over the rounds the two shared: ratio of medians, and the
        ratio within each round (the two turns of a round ran back to back), to show the spread."""
        peers = [target for target in self.rounds if target != OURS]
        by_peer = {peer: ratios(self.results(pair=peer)).get(peer, {}) for peer in peers}
        for peer, points in by_peer.items():
            for point, figures in points.items():
                pairs = zip(select(self.rounds[OURS][point], peer), self.rounds[peer][point], strict=False)
                figures["throughput_ratio_by_round"] = [
                    round(ours["output_throughput"] / theirs["output_throughput"], 3)
                    for ours, theirs in pairs
                    if theirs["output_throughput"]
                ]
        return by_peer


def select(runs: list[dict[str, Any]], pair: str | None) -> list[dict[str, Any]]:
    return [run for run in runs if pair is None or run["pair"] == pair]


class TurnFailed(Exception):
    def __init__(self, runner: Runner, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.runner = runner


def take_turn(runner: Runner, action: Callable[[], Any]) -> Any:
    """action() with runner resumed, every other target stopped; runner stopped again after."""
    runner.resume()
    try:
        return action()
    except Exception as exc:
        raise TurnFailed(runner, exc) from exc
    finally:
        runner.pause()


# measure(target, point, roots of the other targets' processes, not to be counted)
Measure = Callable[[Runner, LoadPoint, list[int | None]], dict[str, Any]]


@dataclass
class Rounds:
    """Our graph beside each peer in turn, loaded in rounds; a target that fails costs only its own figures."""

    points: list[LoadPoint]
    rounds: int
    measure: Measure
    hops: bool
    work_dir: Path
    figures: Figures = field(default_factory=Figures)
    after_each: Callable[[], None] = lambda: None  # after every turn and target: saves the figures so far

    def run(self, ours: Runner | None, peers: list[Runner]) -> Figures:
        """ours stays up; each peer comes up beside it, is loaded in turns with it, and stops.
        Without a peer that starts, ours is loaded alone; if ours fails, the peers go on alone."""
        anchor = ours if ours is not None and self._started(ours) else None
        paired = False
        try:
            for peer in peers:
                if self._started(peer):
                    try:
                        anchor = self._pair(anchor, peer)
                        paired = paired or anchor is not None
                    finally:
                        peer.stop()
                self.after_each()
            if anchor is not None and not paired:
                anchor = self._pair(anchor, anchor)
            if anchor is not None and self.hops:
                self._details(anchor)
        finally:
            if anchor is not None:
                anchor.stop()
            self.after_each()
        return self.figures

    def _started(self, runner: Runner) -> bool:
        print(f"starting {runner.name}", file=sys.stderr, flush=True)
        try:
            runner.start(self.work_dir)
        except Exception as exc:
            self._failed(runner, f"{type(exc).__name__}: {exc}")
            return False
        runner.pause()
        return True

    def _pair(self, anchor: Runner | None, peer: Runner) -> Runner | None:
        """Rounds of anchor and peer in turns (ABBA); returns the anchor, or None once it has failed.

        Runs are filed under the peer's name while the two share the rounds (ours alone: under
        ours). If the anchor fails, the peer's remaining turns run alone, filed apart, so that
        no ratio mixes rounds the two did not share.
        """
        alone = anchor is None or anchor is peer
        for index in range(self.rounds):
            for point in self.points:
                for side in round_order([peer] if alone else [anchor, peer], index):
                    print(f"[{peer.name} pair, round {index + 1}/{self.rounds}] {side.name} {point.label}",
                          file=sys.stderr, flush=True)  # fmt: skip
                    others = [runner.within for runner in (anchor, peer) if runner not in (None, side)]
                    try:
                        run = take_turn(
                            side, lambda side=side, point=point, others=others: self.measure(side, point, others)
                        )
                    except TurnFailed as failed:
                        self._failed(side, str(failed))
                        if side is peer and anchor is not peer:
                            return anchor  # the peer's pair ends here; the caller stops it
                        side.stop()
                        if anchor is peer:
                            return None
                        anchor, alone = None, True
                        continue
                    print(f"  {run['output_throughput']:.0f} tok/s", file=sys.stderr, flush=True)
                    filed = peer.name if anchor is not None else f"{peer.name} alone"
                    self.figures.add(side.name, point.label, run, pair=filed)
                    self.after_each()
        if self.hops and peer is not anchor:
            self._details(peer)
        return anchor

    def _details(self, runner: Runner) -> None:
        print(f"{runner.name}: one-token latencies", file=sys.stderr, flush=True)
        try:
            self.figures.latency[runner.name] = take_turn(runner, runner.details)
        except TurnFailed as failed:
            self._failed(runner, str(failed))

    def _failed(self, runner: Runner, why: str) -> None:
        self.figures.failures[runner.name] = why
        print(f"{runner.name} failed: {why}", file=sys.stderr, flush=True)


def measure_with(workload: Workload, tokenizer: Path, work_dir: Path) -> Measure:
    """One load of a target at a point, with each stage's CPU counted among the target's processes."""
    turns = iter(range(1_000_000))

    def measure(runner: Runner, point: LoadPoint, others: list[int | None]) -> dict[str, Any]:
        run_dir = work_dir / f"run-{next(turns)}"
        run_dir.mkdir()
        return measured(  # CPU per request counts the warm-up requests too: they ran under the sampler
            lambda: workload.run(runner.base_url, runner.model, tokenizer, point, run_dir),
            lambda result: result["completed"] + workload.warmups(point),
            within=runner.within,
            exclude=tuple(pid for pid in others if pid is not None),
        )

    return measure
