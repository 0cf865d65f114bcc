"""`servegraph simulate`: replay a trace through a model's engine autoscaling, per policy, without a cluster.

    servegraph simulate graphs/local.yaml --model tiny --trace bursty --duration 300
    servegraph simulate graphs/local.yaml --model tiny --trace usage --usage-dir ~/.local/share/servegraph/usage
    servegraph simulate graphs/local.yaml --model tiny --trace diurnal --peak-rate 20 --duration 3600 \\
        --calibration bench/results/bench-20261201-013349.json --startup-s 35 --ttft-slo 0.5

Both policies run on the same trace: `ongoing` (Serve's default, the model's target of ongoing
requests) and `signals` (autoscale/engine_policy.py, with the model's `autoscaling.policy`, or
its defaults plus --ttft-slo). Prints replicas, TTFT/e2e percentiles, SLO misses and GPU-hours
per policy, and writes a PNG of replicas, queue and TTFT over time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from servegraph.autoscale.capacity import EngineCapacity, latest_bench
from servegraph.autoscale.engine_policy import CoolDowns, EngineSignalsPolicy, OngoingRequestsPolicy
from servegraph.autoscale.policy import engine_scaling, engine_signals_settings
from servegraph.autoscale.simulator import EngineSetup, Policy, SimResult, Simulation, Summary, Timing
from servegraph.autoscale.traces import TraceRequest, default_bursty, diurnal, from_usage_rows
from servegraph.models.spec import ModelSpec, ScalingPolicyConfig

RESULTS_DIR = Path("bench/results")
POLICIES = ("ongoing", "signals")
DEFAULT_STARTUP_S = 30.0  # an engine replica of the tiny model, cold, on this project's 2-core machine


def setup_from_spec(spec: ModelSpec, shared_compute: bool = False) -> EngineSetup:
    bounds = spec.autoscaling
    initial = bounds.initial_replicas if bounds.initial_replicas is not None else bounds.min_replicas
    return EngineSetup(
        max_num_seqs=spec.max_num_seqs,
        max_ongoing_requests=spec.engine_max_ongoing,
        max_queued_requests=spec.engine_queue_limit,
        min_replicas=bounds.min_replicas,
        max_replicas=bounds.max_replicas,
        initial_replicas=initial,
        kv_cache_tokens=2 * spec.max_num_seqs * spec.max_model_len,  # the CPU engines' budget (engine_config.py)
        cold_start_timeout_s=bounds.cold_start_timeout_s,
        gpus_per_replica=spec.gpu_fraction * spec.num_workers,
        shared_compute=shared_compute,
    )


def with_policy(spec: ModelSpec, ttft_slo_s: float | None) -> ModelSpec:
    """The spec with an engine-signals policy: its own, else the defaults (and the SLO given)."""
    policy = spec.autoscaling.policy or ScalingPolicyConfig()
    if ttft_slo_s is not None:
        policy = policy.model_copy(update={"ttft_slo_s": ttft_slo_s})
    autoscaling = spec.autoscaling.model_copy(update={"policy": policy})
    return spec.model_copy(update={"autoscaling": autoscaling})


def policy_and_timing(spec: ModelSpec, kind: str, handle_push_s: float, dt_s: float) -> tuple[Policy, Timing]:
    """The policy Serve would run for the spec, and the metric timing it would run with."""
    scaling = engine_scaling(spec)
    if kind == "ongoing":
        delays = CoolDowns(scaling.upscale_delay_s, scaling.downscale_delay_s, scaling.downscale_to_zero_delay_s)
        timing = Timing(handle_push_s=handle_push_s, look_back_s=scaling.look_back_period_s, dt_s=dt_s)
        return OngoingRequestsPolicy(scaling.target_ongoing_requests, delays), timing
    config = spec.autoscaling.policy
    assert config is not None
    timing = Timing(
        handle_push_s=handle_push_s,
        metrics_interval_s=config.metrics_interval_s,
        look_back_s=config.look_back_period_s,
        dt_s=dt_s,
    )
    return EngineSignalsPolicy(engine_signals_settings(spec)), timing


def simulate(
    spec: ModelSpec,
    kind: str,
    trace: list[TraceRequest],
    capacity: EngineCapacity,
    duration_s: float | None = None,
    handle_push_s: float = 10.0,
    dt_s: float = 0.05,
    shared_compute: bool = False,
) -> SimResult:
    policy, timing = policy_and_timing(spec, kind, handle_push_s, dt_s)
    return Simulation(setup_from_spec(spec, shared_compute), capacity, policy, timing).run(trace, duration_s)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def report_table(summaries: dict[str, Summary]) -> str:
    header = ["policy", "requests", "served", "rejected", "TTFT p50 ms", "TTFT p99 ms", "e2e p50 ms", "e2e p99 ms",
              "SLO misses", "peak replicas", "mean replicas", "GPU-hours"]  # fmt: skip
    rows = [header] + [
        [
            name,
            str(s.requests),
            str(s.served),
            str(s.rejected),
            _ms(s.ttft_p50_s),
            _ms(s.ttft_p99_s),
            _ms(s.e2e_p50_s),
            _ms(s.e2e_p99_s),
            str(s.slo_misses),
            str(s.peak_replicas),
            f"{s.mean_replicas:.2f}",
            f"{s.gpu_hours:.4f}",
        ]  # fmt: skip
        for name, s in summaries.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)


def ttft_series(result: SimResult, bucket_s: float = 10.0) -> tuple[list[float], list[float]]:
    """TTFT p50 per bucket of arrival time, for the plot."""
    from servegraph.autoscale.simulator import percentile

    buckets: dict[int, list[float]] = {}
    for request in result.requests:
        if request.ttft_s is not None:
            buckets.setdefault(int(request.arrival_s // bucket_s), []).append(request.ttft_s)
    keys = sorted(buckets)
    return [k * bucket_s + bucket_s / 2 for k in keys], [percentile(buckets[k], 50) or 0.0 for k in keys]


def plot(results: dict[str, SimResult], title: str, path: Path) -> None:
    """Replicas, queue and TTFT over time, one line per policy (or per run: 'measured', 'simulated')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (replicas, queue, ttft) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    for name, result in results.items():
        times = [p.at_s for p in result.timeline]
        replicas.step(times, [p.replicas for p in result.timeline], where="post", label=name)
        queue.plot(times, [p.queued for p in result.timeline], label=name)
        ttft.plot(*ttft_series(result), marker=".", label=name)
    replicas.set_ylabel("replicas serving")
    queue.set_ylabel("requests waiting")
    ttft.set_yscale("log")  # a cold start's tens of seconds beside tens of milliseconds
    ttft.set_ylabel("TTFT p50 (s), per 10 s")
    ttft.set_xlabel("time (s)")
    replicas.set_title(title)
    for axis in (replicas, queue, ttft):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_trace(args: argparse.Namespace) -> list[TraceRequest]:
    shape = {"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "seed": args.seed}
    if args.trace == "bursty":
        return default_bursty(args.duration, args.base_rate, args.peak_rate, **shape)
    if args.trace == "diurnal":
        return diurnal(args.duration, args.peak_rate, args.base_rate, **shape)
    from servegraph.models.config import UsageConfig

    return from_usage_rows(usage_rows(args.usage_dir or UsageConfig().directory()), args.model)


def usage_rows(directory: Path) -> list[dict[str, Any]]:
    """The records of the usage log's Parquet parts (deployments/usage_log.py), every day.

    Parts only: records still in a JSON-lines segment (the last few minutes of a live graph)
    become Parquet at rotation or shutdown.
    """
    import pyarrow.parquet as pq

    rows = []
    for part in sorted(directory.rglob("*.parquet")):
        rows += pq.read_table(part).to_pylist()
    return rows


def model_spec(config_path: Path, model: str, app: str | None) -> ModelSpec:
    import yaml

    from servegraph.models.config import LLMAppArgs

    config = yaml.safe_load(config_path.read_text())
    for application in config.get("applications", []):
        if not application.get("import_path", "").endswith(":build_llm_app"):
            continue
        if app is not None and application.get("name") != app:
            continue
        args = LLMAppArgs.model_validate(application.get("args", {}))
        for spec in args.models:
            if spec.name == model:
                return spec
    raise SystemExit(f"servegraph simulate: {config_path} has no model {model!r}" + (f" in {app!r}" if app else ""))


def capacity_from(args: argparse.Namespace) -> EngineCapacity:
    path = args.calibration or latest_bench(RESULTS_DIR)
    if path is None:
        raise SystemExit("servegraph simulate: no --calibration and no bench/results/bench-*.json; run make bench")
    return EngineCapacity.from_bench(Path(path), args.startup_s, args.calibration_target)


def run(args: argparse.Namespace) -> int:
    spec = with_policy(model_spec(args.config, args.model, args.app), args.ttft_slo)
    capacity = capacity_from(args)
    trace = load_trace(args)
    if not trace:
        raise SystemExit("servegraph simulate: the trace is empty")
    duration = args.duration if args.trace != "usage" else None
    results = {
        kind: simulate(spec, kind, trace, capacity, duration, args.handle_push_s, args.dt, args.shared_compute)
        for kind in args.policies.split(",")
    }
    slo = spec.autoscaling.policy.ttft_slo_s if spec.autoscaling.policy else None
    print(f"model {spec.name}: {len(trace)} requests over {trace[-1].at_s:.0f} s; capacity {capacity.describe()}")  # noqa: T201
    print(report_table({kind: Summary.of(result, slo) for kind, result in results.items()}))  # noqa: T201
    out = args.out or RESULTS_DIR / f"simulate-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}.png"
    plot(results, f"{spec.name}: {args.trace} trace, TTFT SLO {slo if slo else '-'} s", out)
    print(f"plot: {out}")  # noqa: T201
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="Serve config (e.g. graphs/local.yaml)")
    parser.add_argument("--model", required=True, help="model name in the config")
    parser.add_argument("--app", help="application name (default: the first LLM app with the model)")
    parser.add_argument("--trace", choices=["bursty", "diurnal", "usage"], default="bursty")
    parser.add_argument("--usage-dir", type=Path, help="usage log folder for --trace usage (default: the graph's)")
    parser.add_argument("--duration", type=float, default=300, help="seconds of synthetic trace")
    parser.add_argument("--base-rate", type=float, default=0.5, help="requests/s between bursts (diurnal: trough)")
    parser.add_argument("--peak-rate", type=float, default=6.0, help="requests/s added by a burst (diurnal: peak)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration", type=Path, help="bench JSON (default: the latest bench/results/bench-*.json)")
    parser.add_argument("--calibration-target", default="servegraph", help="target of the bench JSON to use")
    parser.add_argument("--startup-s", type=float, default=DEFAULT_STARTUP_S, help="measured replica startup time")
    parser.add_argument("--ttft-slo", type=float, help="TTFT SLO in s (default: the model's autoscaling.policy)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated: ongoing, signals")
    parser.add_argument("--handle-push-s", type=float, default=10.0, help="Serve's handle metrics push period")
    parser.add_argument("--shared-compute", action="store_true", help="replicas share one processor (CPU box)")
    parser.add_argument("--dt", type=float, default=0.05, help="simulation step (s)")
    parser.add_argument("--out", type=Path, help="PNG path (default: bench/results/simulate-<model>-<time>.png)")


def add_command(commands: Any) -> None:
    parser = commands.add_parser("simulate", help="replay a request trace through a model's autoscaling, per policy")
    add_arguments(parser)
    parser.set_defaults(handler=run)
