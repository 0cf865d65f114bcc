"""Interactive TTFT while a batch runs, against idle; and how long a 500-line batch takes.

    python -m servegraph.bench.batch_ttft                       # 500 lines, 40 probes each phase
    python -m servegraph.bench.batch_ttft --lines 200 --probes 20 --concurrent-lines 8

One Ray cluster runs the default graph's `tiny` model (graphs/local.yaml, other models left
out). Phases, one after another:
1. `size`: a batch of --lines completions with max_tokens 1-2 (the e2e test's batch): its wall time.
2. `idle`: --probes streaming completions, one after another, nothing else running: TTFT each.
3. `batch`: the same probes while a batch of --lines completions with --batch-max-tokens runs
   (its lines at the engines' batch priority, --concurrent-lines at a time): TTFT each.
Prints TTFT p50/p90 per phase, the ratio of the p50s (the README's target: within 1.5x), and
the batches' durations. Numbers drift with the machine: run it when nothing else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from servegraph.bench.targets import single_model_config
from servegraph.graphs.local_cluster import LocalServeCluster, load_config, wait_for
from servegraph.models.config import BATCH_DIR_ENV, USAGE_DIR_ENV

MODEL = "tiny"
PROBE_PROMPT = "Tell me a short story about a lighthouse keeper"


def batch_file(lines: int, max_tokens: int | None) -> bytes:
    """Completions; max_tokens None means 1 or 2, alternating (the e2e test's lines)."""
    rows = []
    for index in range(lines):
        body = {"model": MODEL, "prompt": f"Line number {index} of the benchmark batch says",
                "max_tokens": max_tokens or 1 + index % 2, "ignore_eos": True}  # fmt: skip
        rows.append(json.dumps({"custom_id": f"b-{index}", "method": "POST", "url": "/v1/completions", "body": body}))
    return "\n".join(rows).encode()


def submit(http: httpx.Client, data: bytes) -> str:
    uploaded = http.post("/v1/files", files={"file": ("bench.jsonl", data)}, data={"purpose": "batch"})
    uploaded.raise_for_status()
    body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
    created = http.post("/v1/batches", json=body)
    created.raise_for_status()
    return created.json()["id"]


def status(http: httpx.Client, batch_id: str) -> dict[str, Any]:
    return http.get(f"/v1/batches/{batch_id}").json()


def ttft_s(http: httpx.Client) -> float:
    """Time to the first streamed chunk of a short completion."""
    body = {"model": MODEL, "prompt": PROBE_PROMPT, "max_tokens": 8, "stream": True, "ignore_eos": True}
    started, first = time.perf_counter(), None
    with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():  # to the end, so probes do not overlap
            if first is None and line.startswith("data:") and "[DONE]" not in line:
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("the stream had no chunk")
    return first


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"n": len(ordered), "p50_ms": 1000 * statistics.median(ordered),
            "p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))]}  # fmt: skip


def run_batch(http: httpx.Client, data: bytes, while_running=None) -> tuple[float, dict[str, Any], list[float]]:
    """A batch to its end: wall time, its final object, and what while_running() returned meanwhile."""
    started = time.perf_counter()
    batch_id = submit(http, data)
    samples: list[float] = []
    while (batch := status(http, batch_id))["status"] not in ("completed", "failed", "expired", "cancelled"):
        if while_running is not None and batch["status"] == "in_progress":
            samples.append(while_running())
        else:
            time.sleep(0.2)
    return time.perf_counter() - started, batch, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--probes", type=int, default=40)
    parser.add_argument("--batch-max-tokens", type=int, default=32, help="per line of the TTFT phase's batch")
    parser.add_argument("--concurrent-lines", type=int, default=4, help="batch.max_concurrent_lines")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    os.environ[USAGE_DIR_ENV], os.environ[BATCH_DIR_ENV] = str(work / "usage"), str(work / "batches")
    config = single_model_config(load_config(), MODEL)
    config["applications"][0]["args"]["batch"] = {"max_concurrent_lines": args.concurrent_lines}
    with LocalServeCluster(config, work) as cluster, httpx.Client(base_url=cluster.base_url, timeout=300) as http:
        wait_for(lambda: http.get("/v1/models").status_code == 200, 600, "the graph")
        for _ in range(5):
            ttft_s(http)  # warm up
        size_s, size_batch, _ = run_batch(http, batch_file(args.lines, None))
        idle = [ttft_s(http) for _ in range(args.probes)]
        load = batch_file(args.lines, args.batch_max_tokens)
        busy_s, busy_batch, during = run_batch(http, load, lambda: ttft_s(http))
    result = {
        "size_batch": {"lines": args.lines, "seconds": round(size_s, 1), "status": size_batch["status"],
                       "completed": size_batch["request_counts"]["completed"]},
        "idle": summary(idle),
        "during_batch": summary(during) if during else None,
        "ttft_p50_ratio": round(statistics.median(during) / statistics.median(idle), 2) if during else None,
        "load_batch": {"lines": args.lines, "max_tokens": args.batch_max_tokens, "seconds": round(busy_s, 1),
                       "concurrent_lines": args.concurrent_lines, "status": busy_batch["status"]},
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
