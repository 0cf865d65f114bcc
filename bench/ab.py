"""Before and after a change, in one run: two checkouts of the graph up at once, loaded in turns.

    python -m bench.ab --before HEAD                  # the working tree against the last commit
    python -m bench.ab --before 9301012 --rounds 6 --concurrency 8

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
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.processes import measured
from bench.targets import local_model_dir, model_spec
from bench.workload import LoadPoint, Workload
from graphs.local_cluster import load_config, wait_for

ROOT = Path(__file__).resolve().parents[1]
# Runs in the checkout under test, with only the API both sides have: build_targets and `with target`.
SERVE_SCRIPT = """
import os, pathlib, sys
from bench.targets import build_targets
_, [target] = build_targets(["servegraph"], sys.argv[1])
with target as base_url:
    pathlib.Path(sys.argv[2] + ".part").write_text(base_url)
    os.replace(sys.argv[2] + ".part", sys.argv[2])  # whole or absent, never half-written
    sys.stdin.read()  # until the parent closes it
"""
START_TIMEOUT_S = 900
FIGURES = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "median_e2el_ms")


@dataclass
class Side:
    """One checkout's graph, serving in a process of its own."""

    name: str
    checkout: Path
    process: subprocess.Popen | None = None
    base_url: str = ""

    def start(self, model: str, work_dir: Path) -> None:
        """Returns once every application of the graph runs."""
        env = {**os.environ, "PYTHONPATH": str(self.checkout), "RAY_ADDRESS": "local"}  # a cluster of its own
        url_file, log = work_dir / f"{self.label}.url", work_dir / f"{self.label}.log"
        with log.open("w") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-c", SERVE_SCRIPT, model, str(url_file)],
                cwd=self.checkout,
                env=env,
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(lambda: url_file.exists() or self.process.poll() is not None, START_TIMEOUT_S, f"{self.name} to start")
        if not url_file.exists():
            raise RuntimeError(f"{self.name} did not start; see {log}")
        self.base_url = url_file.read_text()

    @property
    def label(self) -> str:
        return self.name.split()[0]

    def _processes(self) -> list[psutil.Process]:
        if self.process is None or self.process.poll() is not None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def pause(self) -> None:
        """Stops every process of this graph while the other is measured, as if it were not there:
        an idle Ray cluster still spends CPU (its controller loop), and a change to that cost
        would otherwise show up in the other side's figures. The processes stop one after
        another within milliseconds; a health check in flight between them at that moment can
        time out during the pause and count one failure on resume (Serve allows several)."""
        for process in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        for process in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None:
            return
        self.resume()
        self.process.stdin.close()  # the target leaves its `with` and stops its cluster
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()


@contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """A detached checkout of ref, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="servegraph-ab-")) / "checkout"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(path), ref], check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)


def round_order(sides: list[Side], round_index: int) -> list[Side]:
    """ABBA: each side goes first as often as the other, so a steady drift favours neither."""
    return sides if round_index % 2 == 0 else sides[::-1]


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each headline figure and of each stage's CPU per 1,000 requests."""
    figures = {key: statistics.median(run[key] for run in runs) for key in FIGURES}
    stages = sorted({stage for run in runs for stage in run["processes"]})
    figures["cpu_s_per_1k"] = {
        stage: statistics.median(run["processes"].get(stage, {}).get("cpu_s_per_1k", 0.0) for run in runs)
        for stage in stages
    }
    return figures


def ratio(after: float, before: float) -> str:
    return f"{after / before:.2f}x" if before else "-"


def report(summary: dict[str, dict[str, Any]], before: str, after: str) -> str:
    """Medians side by side, with after / before."""
    lines = [f"| figure | {before} | {after} | after / before |", "|---|---|---|---|"]
    first, second = summary[before], summary[after]
    for key in FIGURES:
        lines.append(f"| {key} | {first[key]:.1f} | {second[key]:.1f} | {ratio(second[key], first[key])} |")
    for stage in sorted(set(first["cpu_s_per_1k"]) | set(second["cpu_s_per_1k"])):
        a, b = first["cpu_s_per_1k"].get(stage, 0.0), second["cpu_s_per_1k"].get(stage, 0.0)
        lines.append(f"| CPU s/1k: {stage} | {a:.1f} | {b:.1f} | {ratio(b, a)} |")
    return "\n".join(lines)


def exit_on_termination() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C: the ExitStack resumes and stops both graphs, so no
    paused graph is left stopped, holding its memory, with Ray's reaper stopped inside it."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda number, _frame: sys.exit(128 + number))


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
    tokenizer = local_model_dir(spec)
    workload = Workload(args.input_len, args.output_len, 0.0, args.num_prompts, args.endpoint)
    point = LoadPoint(concurrency=args.concurrency)
    work_dir = Path(tempfile.mkdtemp(prefix="servegraph-ab-runs-"))
    before_name, after_name = f"before ({args.before})", "after (working tree)"
    runs: dict[str, list[dict[str, Any]]] = {before_name: [], after_name: []}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ab-{time.strftime('%Y%m%d-%H%M%S')}.json"

    def save(summary: dict[str, Any] | None = None) -> None:  # after every round: a crash keeps them
        record = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "medians": summary}
        path.write_text(json.dumps(record))

    with ExitStack() as stack:
        sides = [Side(before_name, stack.enter_context(worktree(args.before))), Side(after_name, args.after)]
        for side in sides:
            print(f"starting {side.name}", file=sys.stderr, flush=True)
            stack.callback(side.stop)
            side.start(args.model, work_dir)
        for side in sides:
            side.pause()
        for index in range(args.rounds):
            for side in round_order(sides, index):
                print(f"[round {index + 1}/{args.rounds}] {side.name}", file=sys.stderr, flush=True)
                side.resume()
                run_dir = work_dir / f"{side.label}-{index}"
                run_dir.mkdir()
                result = measured(
                    lambda url=side.base_url, out=run_dir: workload.run(url, args.model, tokenizer, point, out),
                    lambda result: result["completed"] + workload.warmups(point),
                    within=side.process.pid,
                )
                side.pause()
                print(f"  {result['output_throughput']:.0f} tok/s", file=sys.stderr, flush=True)
                runs[side.name].append(result)
                save()
    summary = {name: medians(results) for name, results in runs.items()}
    save(summary)
    print(f"\n{args.model}, c={args.concurrency}, {args.rounds} rounds of {args.num_prompts} requests a side; medians")
    print(report(summary, before_name, after_name))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
