"""Does the simulator tell the truth? One bursty trace on the real graph and in `servegraph simulate`.

    python -m servegraph.bench.autoscale_validation                 # 5-minute trace, 25 % bound
    python -m servegraph.bench.autoscale_validation --duration 120 --bound 0.25

On a Ray cluster of its own (graphs/local.yaml's `tiny`, alone, under the engine-signals policy,
0-2 replicas), in order:
1. *Startup*: one request to the idle model; the time its replica takes from STARTING to RUNNING.
2. *Calibration*: closed-loop streams at each concurrency up to max_num_seqs (the batch one
   replica runs): median TTFT and TPOT, written as a bench JSON (what the simulator reads).
3. *Replay*: the bursty trace (seeded Poisson arrivals; the burst rate a multiple of one
   replica's measured throughput), streamed open-loop; the serving replicas sampled every 0.5 s.
4. *Simulation* of the same trace from that calibration and startup time, with the replicas
   sharing one processor as they do here (CPU engines pin the same core).
Pass: the simulator's replica timeline is within the bound of the measured one (sum of
|simulated - measured| replicas over time, over the measured replica-seconds), and so are its
TTFT p50 and p99. Writes JSON and a PNG of both runs under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from servegraph.autoscale.capacity import EngineCapacity
from servegraph.autoscale.simulate import simulate
from servegraph.autoscale.simulator import SimResult, percentile
from servegraph.autoscale.traces import TraceRequest, default_bursty
from servegraph.bench.targets import single_model_config
from servegraph.graphs.local_cluster import LocalServeCluster, load_config, wait_for
from servegraph.models.spec import ModelSpec

MODEL = "tiny"
APP = "llm"
PROMPT = "The quick brown fox jumps over the lazy dog and keeps running far away. " * 3  # about 50 tokens
# Metric pushes every second (handles; replicas via the policy's metrics_interval_s), as in the e2e tests.
FAST_METRICS_ENV = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
HANDLE_PUSH_S = 1.0


def autoscaled_model(max_num_seqs: int) -> dict[str, Any]:
    """tiny under the engine-signals policy, scaling on its batch: more than one request per replica
    (batch_fill 0.5 of 2) asks for another, so the bursts need not overload the engine (where
    TTFT depends on the last percent of capacity). The 20 s upscale delay outlasts a calibration
    point, so calibrating never starts a second replica (whose loading would slow the first);
    no TTFT SLO, for the same reason."""
    return {
        "max_num_seqs": max_num_seqs,
        "max_queued_requests": 1000,  # nothing refused: the queue is what the run measures
        "autoscaling": {
            "min_replicas": 0, "initial_replicas": 0, "max_replicas": 2, "upscale_delay_s": 20,
            "downscale_delay_s": 20, "downscale_to_zero_delay_s": 30, "cold_start_timeout_s": 600,
            "policy": {"batch_fill": 0.5, "look_back_period_s": 6, "metrics_interval_s": 1},
        },
    }  # fmt: skip


def graph_config(max_num_seqs: int) -> dict[str, Any]:
    config = single_model_config(load_config(), MODEL)
    app = config["applications"][0]
    models = [{**m, **autoscaled_model(max_num_seqs)} for m in app["args"]["models"]]
    return {**config, "applications": [{**app, "args": {**app["args"], "models": models}}]}


@dataclass
class Measured:
    at_s: float  # sent, from the start of the run
    ttft_s: float | None
    e2e_s: float | None
    status: int


async def stream_one(client: httpx.AsyncClient, url: str, max_tokens: int, started: float) -> Measured:
    sent = time.monotonic()
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0}  # fmt: skip
    first = None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return Measured(sent - started, None, None, response.status_code)
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                first = time.monotonic()
    done = time.monotonic()
    return Measured(sent - started, None if first is None else first - sent, done - sent, 200)


def client() -> httpx.AsyncClient:
    """One pool for the run: httpx scans its connections for every request, so keep it small."""
    return httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))


async def closed_loop(url: str, concurrency: int, seconds: float, max_tokens: int) -> list[Measured]:
    async with client() as http:
        started, results = time.monotonic(), []

        async def stream() -> None:
            while time.monotonic() - started < seconds:
                results.append(await stream_one(http, url, max_tokens, started))

        await asyncio.gather(*(stream() for _ in range(concurrency)))
    return results


async def replay(url: str, trace: list[TraceRequest]) -> list[Measured]:
    """Each request sent at its time (open loop), as its own task, started only when due."""
    async with client() as http:
        started, tasks = time.monotonic(), []
        for request in trace:
            await asyncio.sleep(max(0.0, request.at_s - (time.monotonic() - started)))
            tasks.append(asyncio.create_task(stream_one(http, url, request.max_tokens, started)))
        return list(await asyncio.gather(*tasks))


class ReplicaSampler:
    """Serving (RUNNING) replicas of one deployment every interval, in a thread, from Serve's status."""

    def __init__(self, deployment: str, interval_s: float = 0.5) -> None:
        self._deployment, self._interval_s = deployment, interval_s
        self._stop = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self.started, replica_states(self._deployment).get("RUNNING", 0)))
            self._stop.wait(self._interval_s)

    def __enter__(self) -> ReplicaSampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def replica_states(deployment: str) -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications[APP].deployments[deployment].replica_states)


def measure_startup(url: str, deployment: str, max_tokens: int) -> float:
    """From the first replica's STARTING to RUNNING, with one request waking the idle model."""
    thread = threading.Thread(target=lambda: asyncio.run(closed_loop(url, 1, 0.1, max_tokens)), daemon=True)
    thread.start()
    starting = wait_for(lambda: sum(replica_states(deployment).values()) and time.monotonic(), 120, "a replica", 0.1)
    running = wait_for(
        lambda: replica_states(deployment).get("RUNNING", 0) >= 1 and time.monotonic(), 900, "the replica", 0.1
    )
    thread.join()
    return running - starting


def calibration(url: str, max_num_seqs: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    """A bench-style JSON (results.servegraph["c=N"]) of one warm replica, at 1..max_num_seqs streams."""
    points = {}
    for concurrency in range(1, max_num_seqs + 1):
        runs = [m for m in asyncio.run(closed_loop(url, concurrency, seconds, max_tokens)) if m.ttft_s is not None]
        tpots = [(m.e2e_s - m.ttft_s) / (max_tokens - 1) for m in runs]
        points[f"c={concurrency}"] = {
            "completed": len(runs),
            "request_throughput": len(runs) / seconds,
            "median_ttft_ms": statistics.median(m.ttft_s for m in runs) * 1e3,
            "median_tpot_ms": statistics.median(tpots) * 1e3,
            "median_e2el_ms": statistics.median(m.e2e_s for m in runs) * 1e3,
        }
    return {"args": {"model": MODEL, "output_len": max_tokens, "source": "autoscale_validation"},
            "results": {"servegraph": points}}  # fmt: skip


def timeline_error(measured: list[tuple[float, int]], simulated: SimResult, duration_s: float) -> float:
    """Sum over time of |simulated - measured| replicas, over the measured replica-seconds."""
    sim = [(p.at_s, p.replicas) for p in simulated.timeline]

    def at(series: list[tuple[float, int]], t: float) -> int:
        value = series[0][1] if series else 0
        for when, replicas in series:
            if when > t:
                break
            value = replicas
        return value

    grid = [i * 0.5 for i in range(int(duration_s / 0.5))]
    real = sum(at(measured, t) for t in grid)
    return sum(abs(at(sim, t) - at(measured, t)) for t in grid) / max(real, 1)


def relative(simulated: float | None, measured: float | None) -> float | None:
    if simulated is None or measured is None or measured == 0:
        return None
    return abs(simulated - measured) / measured


def plot(measured_requests: list[Measured], measured_replicas: list[tuple[float, int]], sim: SimResult,
         title: str, path: Path) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (replicas, ttft) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    replicas.step(*zip(*measured_replicas, strict=True), where="post", label="measured (Ray Serve + vLLM)")
    replicas.step([p.at_s for p in sim.timeline], [p.replicas for p in sim.timeline], where="post",
                  label="simulated", linestyle="--")  # fmt: skip
    replicas.set_ylabel("replicas serving")
    replicas.set_title(title)
    served = [m for m in measured_requests if m.ttft_s is not None]
    ttft.scatter([m.at_s for m in served], [m.ttft_s for m in served], s=6, alpha=0.5, label="measured")
    simulated = [r for r in sim.requests if r.ttft_s is not None]
    ttft.scatter([r.arrival_s for r in simulated], [r.ttft_s for r in simulated], s=6, alpha=0.5, marker="x",
                 label="simulated")  # fmt: skip
    ttft.set_yscale("log")
    ttft.set_ylabel("TTFT (s) by arrival")
    ttft.set_xlabel("time (s)")
    for axis in (replicas, ttft):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = graph_config(args.max_num_seqs)
    spec = ModelSpec.model_validate(config["applications"][0]["args"]["models"][0])
    deployment, stamp = spec.engine_deployment_name, time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    with LocalServeCluster(config, Path(tempfile.mkdtemp()), num_cpus=8, env=FAST_METRICS_ENV) as cluster:
        url = f"{cluster.base_url}/v1/completions"
        startup_s = measure_startup(url, deployment, args.max_tokens)
        print(f"replica startup: {startup_s:.1f} s", flush=True)  # noqa: T201
        bench = calibration(url, args.max_num_seqs, args.calibration_s, args.max_tokens)
        capacity_path = args.out / f"autoscale-calibration-{stamp}.json"
        capacity_path.write_text(json.dumps(bench, indent=1))
        capacity = EngineCapacity.from_bench(capacity_path, startup_s)
        print(f"calibration: {capacity.describe()}", flush=True)  # noqa: T201
        one_replica_rps = bench["results"]["servegraph"][f"c={args.max_num_seqs}"]["request_throughput"]
        trace = default_bursty(args.duration, args.base_rate, args.burst_factor * one_replica_rps,
                               prompt_tokens=len(PROMPT) // 4, max_tokens=args.max_tokens, seed=args.seed)  # fmt: skip
        wait_for(lambda: replica_states(deployment).get("RUNNING", 0) == 1, 120, "one replica before the trace")
        with ReplicaSampler(deployment) as sampler:
            measured = asyncio.run(replay(url, trace))
            time.sleep(max(0.0, args.duration - (time.monotonic() - sampler.started)))
    # The trace starts on one warm replica, as the measured run did.
    spec = spec.model_copy(update={"autoscaling": spec.autoscaling.model_copy(update={"initial_replicas": 1})})
    sim = simulate(spec, "signals", trace, capacity, args.duration, HANDLE_PUSH_S, shared_compute=True)
    return report(args, stamp, startup_s, capacity, trace, measured, sampler.samples, sim, spec)


def report(args: argparse.Namespace, stamp: str, startup_s: float, capacity: EngineCapacity,
           trace: list[TraceRequest], measured: list[Measured], replicas: list[tuple[float, int]],
           sim: SimResult, spec: ModelSpec) -> int:  # fmt: skip
    measured_ttfts = [m.ttft_s for m in measured if m.ttft_s is not None]
    sim_ttfts = [r.ttft_s for r in sim.requests if r.ttft_s is not None and r.done_s is not None]
    figures = {
        "replica timeline": (timeline_error(replicas, sim, args.duration), None, None),
        "TTFT p50": (None, percentile(measured_ttfts, 50), percentile(sim_ttfts, 50)),
        "TTFT p99": (None, percentile(measured_ttfts, 99), percentile(sim_ttfts, 99)),
    }
    errors = {name: err if err is not None else relative(s, m) for name, (err, m, s) in figures.items()}
    passed = all(e is not None and e <= args.bound for e in errors.values())
    measured_rs = sum(r for _, r in replicas) * 0.5
    failed = sum(m.status != 200 for m in measured)
    lines = [
        f"trace: {len(trace)} requests over {args.duration:.0f} s; {failed} failed live",
        f"replica-seconds: measured {measured_rs:.0f}, simulated {sum(p.replicas for p in sim.timeline):.0f}",
        f"TTFT p50: measured {figures['TTFT p50'][1]:.3f} s, simulated {figures['TTFT p50'][2]:.3f} s",
        f"TTFT p99: measured {figures['TTFT p99'][1]:.3f} s, simulated {figures['TTFT p99'][2]:.3f} s",
        *(f"{name} error: {'n/a' if error is None else f'{error:.1%}'}" for name, error in errors.items()),
        f"{'PASS' if passed else 'FAIL'}: every error within {args.bound:.0%}",
    ]
    png = args.out / f"autoscale-validation-{stamp}.png"
    plot(measured, replicas, sim, f"{MODEL}, bursty {args.duration:.0f} s trace: measured vs simulated", png)
    result = {
        "args": vars(args) | {"out": str(args.out)},
        "model": spec.model_dump(mode="json"),
        "calibration": capacity.source,
        "startup_s": startup_s,
        "capacity": [asdict(p) for p in capacity.points],
        "errors": errors,
        "passed": passed,
        "measured": {"replicas": replicas, "requests": [asdict(m) for m in measured]},
        "simulated": {"replicas": [(p.at_s, p.replicas) for p in sim.timeline]},
    }
    (args.out / f"autoscale-validation-{stamp}.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines) + f"\nplot: {png}")  # noqa: T201
    return 0 if passed else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300, help="seconds of trace")
    parser.add_argument("--base-rate", type=float, default=0.5, help="requests/s between bursts")
    parser.add_argument("--burst-factor", type=float, default=0.5, help="burst rate over one replica's throughput")
    parser.add_argument("--max-num-seqs", type=int, default=2, help="the model's batch: small, so a burst fills it")
    parser.add_argument("--max-tokens", type=int, default=64, help="long enough that the engine, not the graph, limits")
    parser.add_argument("--calibration-s", type=float, default=8, help="seconds per load point (< upscale delay)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bound", type=float, default=0.25, help="largest relative error that passes")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
