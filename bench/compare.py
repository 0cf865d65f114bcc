"""Benchmark OpenAI-compatible servers side by side on the same local model, with vLLM's own client.

    python -m servegraph.bench.compare      # servegraph vs bare vLLM vs ray.serve.llm, 32 streams
    python -m servegraph.bench.compare --concurrency 1,8,32 --range-ratio 0.5 --rounds 5
    python -m servegraph.bench.compare --request-rate 4,8,16 --targets servegraph,vllm
    python -m servegraph.bench.compare --url http://host:8000 --served-model my-model --targets ""   # any endpoint

Our graph comes up first and stays up; every other target comes up beside it in turn, each
in a process (and Ray cluster) of its own. The pair is then loaded in rounds, in turns (ABBA),
the idle one stopped with SIGSTOP, at every load point, with `vllm bench serve` (random
prompts, ignore_eos, the same seed). This machine's speed drifts by tens of percent within
minutes, so targets measured one after another would be measured on different machines;
in turns, both share the drift. Each figure is the median over its rounds, and each ratio
compares ours with a peer over the rounds of their pair only. Prints tables and ratios;
writes JSON (every round) and a PNG plot next to each other under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from servegraph.bench.hosting import HostedTarget, InPlaceTarget, Runner, exit_on_termination
from servegraph.bench.report import OURS, plot, process_table, ratio_table, table
from servegraph.bench.rounds import Figures, Rounds, measure_with
from servegraph.bench.targets import ExternalTarget, check_target_names, local_model_dir, model_spec
from servegraph.bench.workload import LoadPoint, Workload
from servegraph.graphs.local_cluster import load_config

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
    parser.add_argument("--rounds", type=int, default=3, help="loads of each target at each point, in turns")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len*(1 +- ratio)")
    parser.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    parser.add_argument("--no-hops", action="store_true", help="skip the per-hop latency of the graph")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for JSON and PNG")
    return parser.parse_args(argv)


def runners(args: argparse.Namespace) -> tuple[Any, Runner | None, list[Runner]]:
    """The model spec, our graph (if asked for) and the peers, each ready to start."""
    names = [name for name in args.targets.split(",") if name]
    check_target_names(names)  # before anything starts
    spec = model_spec(load_config(), args.model)
    hosted = {name: HostedTarget(name, args.model) for name in names}
    peers: list[Runner] = [target for name, target in hosted.items() if name != OURS]
    if args.url:
        peers.append(InPlaceTarget(ExternalTarget(args.url, args.served_model or spec.name)))
    return spec, hosted.get(OURS), peers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_termination()
    workload = Workload(args.input_len, args.output_len, args.range_ratio, args.num_prompts, args.endpoint)
    points = load_points(args)
    spec, ours, peers = runners(args)
    tokenizer = local_model_dir(spec)
    work_dir = Path(tempfile.mkdtemp(prefix="servegraph-bench-"))

    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"bench-{stamp}.json", args.out / f"bench-{stamp}.png"
    rounds = Rounds(points, args.rounds, measure_with(workload, tokenizer, work_dir), not args.no_hops, work_dir)
    rounds.after_each = lambda: write_report(json_path, args, rounds.figures)  # a crash keeps the rounds so far
    figures = rounds.run(ours, peers)
    results = figures.results()

    x_label = "request rate (req/s)" if args.request_rate else "concurrent streams"
    title = f"{spec.name}: {args.input_len} prompt / {args.output_len} output tokens (+-{args.range_ratio:.0%})"
    if results:
        plot(results, {p.label: p.x for p in points}, x_label, title, png_path)

    print(f"\n{title}, {args.num_prompts} requests per point and round; medians over {args.rounds} rounds; ms")
    print(table(results))
    if OURS in results and len(results) > 1:
        print("\nOurs against each peer, over the rounds the two shared:")
        print(ratio_table(figures.ratios()))
    if results:
        print("\nCPU seconds per 1,000 requests and peak RSS (MiB) of each stage's processes (medians):")
        print(process_table(results))
    if figures.latency:
        print("\nSequential one-token requests, median ms (graph hops call each stage's handle directly):")
        for name, timings in figures.latency.items():
            print(f"  {name}: " + ", ".join(f"{key} {value:.1f}" for key, value in timings.items()))
    for name, failure in figures.failures.items():
        print(f"\n{name} FAILED: {failure}")
    print(f"\nwrote {json_path}" + (f" and {png_path}" if results else ""))
    return 1 if figures.failures else 0


def write_report(path: Path, args: argparse.Namespace, figures: Figures) -> None:
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": figures.results(),
        "ratios": figures.ratios(),
        "rounds": figures.rounds,
        "one_token_latency_ms": figures.latency,
        "failures": figures.failures,
    }
    path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
