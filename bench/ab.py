"""Before and after a change, in one run: two checkouts of the graph up at once, loaded in turns.

    python -m servegraph.bench.ab --before HEAD                  # the working tree against the last commit
    python -m servegraph.bench.ab --before 9301012 --rounds 6 --concurrency 8

This machine's speed drifts by tens of percent within minutes (other tenants of the host), so two
benchmark runs minutes apart cannot show a change of a few percent. Here each checkout serves
the model in its own Ray cluster, started from that checkout's code (`git worktree` for the
ref). The idle one is stopped (SIGSTOP, every process of it) while the other runs. The load
alternates between them, ABBA, round after round, with vLLM's benchmark client, and each
figure is the median over rounds. CPU per stage counts only the processes of the graph under
load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from servegraph.bench.hosting import ROOT, HostedTarget, exit_on_termination
from servegraph.bench.report import OURS
from servegraph.bench.rounds import Rounds, measure_with
from servegraph.bench.targets import local_model_dir, model_spec
from servegraph.bench.workload import LoadPoint, Workload
from servegraph.graphs.local_cluster import load_config

FIGURES = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "median_e2el_ms")


@contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """A detached checkout of ref, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="servegraph-ab-")) / "checkout"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(path), ref], check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)


def ratio(after: float, before: float) -> str:
    return f"{after / before:.2f}x" if before else "-"


def report(summary: dict[str, dict[str, Any]], before: str, after: str) -> str:
    """Medians side by side, with after / before."""
    lines = [f"| figure | {before} | {after} | after / before |", "|---|---|---|---|"]
    first, second = summary[before], summary[after]
    for key in FIGURES:
        lines.append(f"| {key} | {first[key]:.1f} | {second[key]:.1f} | {ratio(second[key], first[key])} |")
    for stage in sorted(set(first["processes"]) | set(second["processes"])):
        a, b = (side["processes"].get(stage, {}).get("cpu_s_per_1k", 0.0) for side in (first, second))
        lines.append(f"| CPU s/1k: {stage} | {a:.1f} | {b:.1f} | {ratio(b, a)} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="HEAD", help="git ref of the 'before' graph")
    parser.add_argument("--after", type=Path, default=ROOT, help="checkout of the 'after' graph (the working tree)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=4, help="loads of each side, alternating")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_termination()
    spec = model_spec(load_config(), args.model)
    workload = Workload(args.input_len, args.output_len, 0.0, args.num_prompts, args.endpoint)
    point = LoadPoint(concurrency=args.concurrency)
    work_dir = Path(tempfile.mkdtemp(prefix="servegraph-ab-runs-"))
    before_name, after_name = f"before ({args.before})", "after (working tree)"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ab-{time.strftime('%Y%m%d-%H%M%S')}.json"
    rounds = Rounds([point], args.rounds, measure_with(workload, local_model_dir(spec), work_dir), False, work_dir)

    def save() -> None:  # after every round: a crash keeps them
        record = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": rounds.figures.rounds,
                  "medians": rounds.figures.results(), "failures": rounds.figures.failures}  # fmt: skip
        path.write_text(json.dumps(record))

    rounds.after_each = save
    with worktree(args.before) as checkout:
        before = HostedTarget(OURS, args.model, before_name, checkout)
        figures = rounds.run(before, [HostedTarget(OURS, args.model, after_name, args.after)])
    for name, failure in figures.failures.items():
        print(f"{name} FAILED: {failure}")
    summary = {name: points[point.label] for name, points in figures.results().items()}
    if len(summary) == 2:
        print(f"\n{args.model}, {point.label}, {args.rounds} rounds of {args.num_prompts} requests a side; medians")
        print(report(summary, before_name, after_name))
    print(f"\nwrote {path}")
    return 1 if figures.failures else 0


if __name__ == "__main__":
    sys.exit(main())
