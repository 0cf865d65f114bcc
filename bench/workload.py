"""The load: one `vllm bench serve` run per load point, so figures use vLLM's metric definitions."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUMMARY_KEYS = (
    "completed", "failed", "duration", "total_output_tokens", "request_throughput", "output_throughput",
    "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
    "median_itl_ms", "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms",
)  # fmt: skip


@dataclass(frozen=True)
class LoadPoint:
    """Either a number of concurrent streams (requests sent as fast as they finish) or a request rate."""

    concurrency: int | None = None
    request_rate: float | None = None

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.concurrency is not None else f"rate={self.request_rate}/s"

    @property
    def x(self) -> float:
        return float(self.concurrency if self.concurrency is not None else self.request_rate)


@dataclass(frozen=True)
class Workload:
    """Random prompts and outputs; lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)]."""

    input_len: int = 64
    output_len: int = 64
    range_ratio: float = 0.0
    num_prompts: int = 256
    endpoint: str = "/v1/completions"
    seed: int = 0

    @staticmethod
    def warmups(point: LoadPoint) -> int:
        """Requests sent before the measured ones, one per stream: first-request costs (imports,
        allocations, compiled kernels) stay out of the figures."""
        return point.concurrency or 8

    def command(self, base_url: str, model: str, tokenizer: Path, point: LoadPoint, result_file: Path) -> list[str]:
        load = (
            ["--max-concurrency", str(point.concurrency)]
            if point.concurrency is not None
            else ["--request-rate", str(point.request_rate)]
        )
        backend = "openai-chat" if self.endpoint.endswith("/chat/completions") else "openai"
        return [
            sys.executable, "-m", "servegraph.bench.vllm_bench", "--backend", backend, "--base-url", base_url,
            "--endpoint", self.endpoint, "--model", model, "--tokenizer", str(tokenizer),
            "--dataset-name", "random", "--random-input-len", str(self.input_len),
            "--random-output-len", str(self.output_len), "--random-range-ratio", str(self.range_ratio),
            "--ignore-eos", "--seed", str(self.seed), "--num-prompts", str(self.num_prompts), *load,
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--result-filename", str(result_file), "--num-warmups", str(self.warmups(point)),
        ]  # fmt: skip

    def run(self, base_url: str, model: str, tokenizer: Path, point: LoadPoint, work_dir: Path) -> dict[str, Any]:
        """One run; vLLM's report and progress bars go to a log file, whose end a failure shows."""
        result_file, log_file = work_dir / f"{point.label}.json", work_dir / f"{point.label}.log"
        with log_file.open("w") as log:
            command = self.command(base_url, model, tokenizer, point, result_file)
            finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        if finished.returncode != 0:
            tail = log_file.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"vllm bench serve exited with {finished.returncode}; end of {log_file}:\n{tail}")
        result = json.loads(result_file.read_text())
        return {key: result.get(key) for key in SUMMARY_KEYS}
