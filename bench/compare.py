"""Benchmark OpenAI-compatible servers side by side on the same local model, with vLLM's own client.

    python -m bench.compare                                   # servegraph vs bare vLLM vs ray.serve.llm, 32 streams
    python -m bench.compare --concurrency 1,8,32 --range-ratio 0.5
    python -m bench.compare --request-rate 4,8,16 --targets servegraph,vllm
    python -m bench.compare --url http://host:8000 --served-model my-model --targets ""   # any endpoint

Targets are started one at a time (each alone on the machine), loaded at every load point with
`vllm bench serve` (random prompts, ignore_eos, the same seed), then stopped. Prints a table and
the ratios ours/others; writes JSON and a PNG plot next to each other under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.processes import measured
from bench.report import OURS, plot, process_table, ratio_table, ratios, table
from bench.targets import ExternalTarget, build_targets, local_model_dir
from bench.workload import LoadPoint, Workload

DEFAULT_TARGETS = "servegraph,vllm,ray-llm-0ms,ray-llm"


def load_points(args: argparse.Namespace) -> list[LoadPoint]:
    if args.request_rate:
        return [LoadPoint(request_rate=float(rate)) for rate in args.request_rate.split(",")]
    return [LoadPoint(concurrency=int(c)) for c in args.concurrency.split(",")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="model of graphs/local.yaml every started target serves")
    parser.add_argument("--targets", default=DEFAULT_TARGETS, help="servegraph, vllm, ray-llm, ray-llm-0ms")
    parser.add_argument("--url", help="also benchmark this running OpenAI-compatible server")
    parser.add_argument("--served-model", help="model name to send to --url (default: --model)")
    parser.add_argument("--concurrency", default="32", help="comma-separated concurrent streams")
    parser.add_argument("--request-rate", help="comma-separated request rates (req/s) instead of concurrency")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len*(1 +- ratio)")
    parser.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    parser.add_argument("--no-hops", action="store_true", help="skip the per-hop latency of the graph")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for JSON and PNG")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workload = Workload(args.input_len, args.output_len, args.range_ratio, args.num_prompts, args.endpoint)
    points = load_points(args)
    spec, targets = build_targets([t for t in args.targets.split(",") if t], args.model)
    if args.url:
        targets.append(ExternalTarget(args.url, args.served_model or spec.name))
    tokenizer = local_model_dir(spec)
    work_dir = Path(tempfile.mkdtemp(prefix="servegraph-bench-"))

    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"bench-{stamp}.json", args.out / f"bench-{stamp}.png"

    def measure(target: Any, base_url: str, point: LoadPoint) -> dict[str, Any]:
        run_dir = work_dir / target.name
        run_dir.mkdir(exist_ok=True)
        return measured(  # CPU per request counts the warm-up requests too: they ran under the sampler
            lambda: workload.run(base_url, target.model, tokenizer, point, run_dir),
            lambda result: result["completed"] + workload.warmups(point),
        )

    figures = Figures()
    # The report is written after every target: a later crash keeps the figures so far.
    run_targets(targets, points, measure, not args.no_hops, figures, lambda: write_report(json_path, args, figures))
    results, latency, failures = figures.results, figures.latency, figures.failures

    x_label = "request rate (req/s)" if args.request_rate else "concurrent streams"
    title = f"{spec.name}: {args.input_len} prompt / {args.output_len} output tokens (+-{args.range_ratio:.0%})"
    if results:
        plot(results, {p.label: p.x for p in points}, x_label, title, png_path)

    print(f"\n{title}, {args.num_prompts} requests per point; times in ms")
    print(table(results))
    if OURS in results:
        print("\n" + ratio_table(results))
    if results:
        print("\nCPU seconds per 1,000 requests and peak RSS (MiB) of each stage's processes:")
        print(process_table(results))
    if latency:
        print("\nSequential one-token requests, median ms (graph hops call each stage's handle directly):")
        for name, timings in latency.items():
            print(f"  {name}: " + ", ".join(f"{key} {value:.1f}" for key, value in timings.items()))
    for name, failure in failures.items():
        print(f"\n{name} FAILED: {failure}")
    print(f"\nwrote {json_path}" + (f" and {png_path}" if results else ""))
    return 1 if failures else 0


@dataclass
class Figures:
    """Everything one benchmark run measured: per target and load point, latencies, and what failed."""

    results: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def run_targets(
    targets: list[Any],
    points: list[LoadPoint],
    measure: Callable[[Any, str, LoadPoint], dict[str, Any]],
    hops: bool,
    figures: Figures,
    after_each: Callable[[], None] = lambda: None,
) -> None:
    """Start each target alone, measure every load point (and its one-token latencies), stop it.

    A target that fails to start or to run costs only its own figures; after_each runs once
    per target, failed or not.
    """
    runs, total = 0, len(targets) * len(points)
    for target in targets:
        try:
            with target as base_url:
                for point in points:
                    runs += 1
                    print(f"[{runs}/{total}] {target.name} {point.label}", file=sys.stderr, flush=True)
                    figures.results.setdefault(target.name, {})[point.label] = measure(target, base_url, point)
                if hops:
                    print(f"{target.name}: one-token latencies", file=sys.stderr, flush=True)
                    figures.latency[target.name] = target.details(base_url)
        except Exception as exc:
            figures.failures[target.name] = f"{type(exc).__name__}: {exc}"
            print(f"{target.name} failed: {figures.failures[target.name]}", file=sys.stderr, flush=True)
        after_each()


def write_report(path: Path, args: argparse.Namespace, figures: Figures) -> None:
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": figures.results,
        "ratios": ratios(figures.results) if OURS in figures.results else {},
        "one_token_latency_ms": figures.latency,
        "failures": figures.failures,
    }
    path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
