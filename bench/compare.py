"""Benchmark the graph against a bare vLLM server, side by side, with vLLM's own client.

    python -m bench.compare --model tiny --concurrency 32 --output-len 64

Each target is started, loaded with `vllm bench serve` (random prompts, ignore_eos, the
same seed), and stopped before the next starts, so they never share the two cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.targets import build_targets, local_model_dir

METRICS = [
    ("output tok/s", "output_throughput", "{:.0f}"),
    ("req/s", "request_throughput", "{:.2f}"),
    ("TTFT p50 ms", "median_ttft_ms", "{:.1f}"),
    ("TTFT p99 ms", "p99_ttft_ms", "{:.1f}"),
    ("TPOT p50 ms", "median_tpot_ms", "{:.2f}"),
    ("E2E p50 ms", "median_e2el_ms", "{:.0f}"),
]


def run_load(base_url: str, model: str, tokenizer_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    result_file = Path(tempfile.mkdtemp()) / "result.json"
    command = [
        sys.executable, "-m", "bench.vllm_bench", "--backend", "openai", "--base-url", base_url,
        "--endpoint", "/v1/completions", "--model", model, "--tokenizer", str(tokenizer_dir),
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--ignore-eos", "--seed", "0",
        "--max-concurrency", str(args.concurrency), "--num-prompts", str(args.num_prompts),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-filename", str(result_file),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    return json.loads(result_file.read_text())


def table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    rows = [["metric", *names]]
    rows += [[label, *(fmt.format(results[n][key]) for n in names)] for label, key, fmt in METRICS]
    if "servegraph" in results:
        for other in (n for n in names if n != "servegraph"):
            ratio = results["servegraph"]["output_throughput"] / results[other]["output_throughput"]
            ttft_gap = results["servegraph"]["median_ttft_ms"] - results[other]["median_ttft_ms"]
            rows.append([f"ours/{other}", f"{ratio:.2f}x tok/s, TTFT p50 {ttft_gap:+.1f} ms", *[""] * (len(names) - 1)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--targets", default="servegraph,vllm")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/compare.json"))
    args = parser.parse_args(argv)

    spec, targets = build_targets(args.targets.split(","), args.model)
    results, details = {}, {}
    for target in targets:
        with target as base_url:
            results[target.name] = run_load(base_url, spec.name, local_model_dir(spec), args)
            details[target.name] = target.details(base_url)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args) | {"out": str(args.out)}, "results": results, "latency": details}
    args.out.write_text(json.dumps(report, indent=2))
    print(
        f"\n{args.concurrency} concurrent streams, {args.input_len} prompt / {args.output_len} output tokens, "
        f"{args.num_prompts} requests"
    )
    print(table(results))
    print("\nSequential one-token requests, median ms (per-hop figures call each stage's handle directly):")
    for name, figures in details.items():
        print(f"  {name}: " + ", ".join(f"{key} {value:.1f}" for key, value in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
