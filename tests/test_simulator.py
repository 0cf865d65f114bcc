"""The capacity simulator: calibration, traces, the replay under each policy, and `servegraph simulate`."""

import json
from datetime import UTC, datetime

import pytest
import yaml

from servegraph.autoscale.capacity import EngineCapacity, LoadPoint
from servegraph.autoscale.simulate import setup_from_spec, simulate, with_policy
from servegraph.autoscale.simulator import Summary, percentile
from servegraph.autoscale.traces import Burst, TraceRequest, bursty, diurnal, from_usage_rows
from servegraph.graphs.cli import main as servegraph
from servegraph.models.spec import ModelSpec

# One replica: 40 ms to the first token alone, 150 ms with 4 in the batch; 10-20 ms per token.
CAPACITY = EngineCapacity((LoadPoint(1, 0.04, 0.010), LoadPoint(4, 0.15, 0.020)), startup_s=20)


def elastic(**autoscaling) -> ModelSpec:
    bounds = {"min_replicas": 0, "max_replicas": 3, "upscale_delay_s": 0, "downscale_delay_s": 5,
              "downscale_to_zero_delay_s": 10, **autoscaling}  # fmt: skip
    return ModelSpec(name="elastic", hub_id="org/x", max_num_seqs=4, autoscaling=bounds)


def steady(rate: float, duration_s: float, start_s: float = 0.0, max_tokens: int = 16) -> list[TraceRequest]:
    return [TraceRequest(start_s + i / rate, 32, max_tokens) for i in range(int(duration_s * rate))]


def test_capacity_interpolates_between_load_points_and_reads_bench_json(tmp_path):
    assert CAPACITY.ttft_s(0.5) == 0.04
    assert CAPACITY.ttft_s(2.5) == pytest.approx(0.095)
    assert CAPACITY.tpot_s(8) == pytest.approx(0.0333, abs=1e-3)  # the last segment, extended
    report = {"results": {"servegraph": {
        "c=8": {"completed": 10, "median_ttft_ms": 80, "median_tpot_ms": 9},
        "c=32": {"completed": 10, "median_ttft_ms": 300, "median_tpot_ms": 13}}}}  # fmt: skip
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    capacity = EngineCapacity.from_bench(path, startup_s=25)
    assert [p.concurrency for p in capacity.points] == [8, 32]
    assert capacity.ttft_s(20) == pytest.approx(0.19)
    with pytest.raises(ValueError, match="no results for target 'vllm'"):
        EngineCapacity.from_bench(path, 25, target="vllm")


def test_synthetic_traces_follow_their_rates_and_repeat_with_their_seed():
    trace = bursty(100, 1.0, [Burst(40, 20, 9.0)], seed=3)
    in_burst = [r for r in trace if 40 <= r.at_s < 60]
    assert 120 < len(in_burst) < 280 and len(trace) - len(in_burst) < 140
    assert trace == bursty(100, 1.0, [Burst(40, 20, 9.0)], seed=3)
    day = diurnal(1000, peak_rate=4.0, seed=1)
    middle = [r for r in day if 400 <= r.at_s < 600]
    edges = [r for r in day if r.at_s < 100 or r.at_s >= 900]
    assert len(middle) > 5 * len(edges)


def test_a_usage_log_becomes_a_trace_of_arrivals_without_cached_answers():
    start = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    rows = [
        {"time": datetime.fromtimestamp(start + 10, UTC), "latency_s": 2.0, "model": "tiny", "prompt_tokens": 40,
         "completion_tokens": 16, "cached": False},
        {"time": datetime.fromtimestamp(start + 5, UTC), "latency_s": 1.0, "model": "tiny", "prompt_tokens": 8,
         "completion_tokens": 4, "cached": False},
        {"time": datetime.fromtimestamp(start + 6, UTC), "latency_s": 0.0, "model": "tiny", "prompt_tokens": 8,
         "completion_tokens": 4, "cached": True},
        {"time": datetime.fromtimestamp(start + 7, UTC), "latency_s": 1.0, "model": "small", "prompt_tokens": 8,
         "completion_tokens": 4, "cached": False},
    ]  # fmt: skip
    assert from_usage_rows(rows, "tiny") == [TraceRequest(0.0, 8, 4), TraceRequest(4.0, 40, 16)]


def test_a_burst_scales_the_engine_up_then_back_to_zero_and_a_cold_start_costs_the_startup_time():
    trace = steady(1.0, 20) + steady(40.0, 20, start_s=30) + steady(1.0, 20, start_s=50)
    spec = with_policy(elastic(), ttft_slo_s=0.3)
    result = simulate(spec, "signals", trace, CAPACITY, duration_s=200, handle_push_s=1.0)
    replicas = [p.replicas for p in result.timeline]
    assert replicas[0] == 0 and max(replicas) == 3 and replicas[-1] == 0
    first = min(result.requests, key=lambda r: r.arrival_s)
    assert first.ttft_s == pytest.approx(CAPACITY.startup_s + 1.0, abs=1.5)  # a push, a start, the first token
    summary = Summary.of(result, ttft_slo_s=0.3)
    assert summary.served + summary.rejected == summary.requests == len(trace)
    assert summary.gpu_hours == pytest.approx(result.replica_seconds / 3600)


def test_the_signals_policy_holds_a_ttft_slo_that_the_ongoing_target_misses():
    """max_num_seqs 4: Serve's default aims at 3 ongoing per replica, whose batch takes 110 ms to a first token."""
    trace, slo = steady(12.0, 120), 0.08
    spec = with_policy(elastic(min_replicas=1, max_replicas=4), ttft_slo_s=slo)
    ongoing, signals = (
        Summary.of(simulate(spec, kind, trace, CAPACITY, 150, 1.0), slo) for kind in ("ongoing", "signals")
    )
    assert signals.ttft_p50_s <= slo < ongoing.ttft_p50_s
    assert signals.slo_misses < ongoing.slo_misses


def test_shared_compute_slows_every_replica_when_several_are_busy():
    spec = elastic(min_replicas=2, max_replicas=2)
    trace = steady(20.0, 30)
    alone = Summary.of(simulate(spec, "ongoing", trace, CAPACITY, 40, 1.0), None)
    shared = Summary.of(simulate(spec, "ongoing", trace, CAPACITY, 40, 1.0, shared_compute=True), None)
    assert shared.e2e_p50_s > alone.e2e_p50_s * 1.3
    assert setup_from_spec(spec, shared_compute=True).kv_cache_tokens == 2 * 4 * 512


def test_percentile_matches_numpys_linear_rule():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 99) == pytest.approx(4.96)
    assert percentile([], 50) is None


def test_servegraph_simulate_prints_both_policies_and_writes_a_plot(tmp_path, capsys):
    app = {"name": "llm", "route_prefix": "/", "import_path": "servegraph.graphs.builder:build_llm_app"}
    model = {"name": "elastic", "hub_id": "org/x", "max_num_seqs": 4,
             "autoscaling": {"min_replicas": 0, "max_replicas": 2, "policy": {"ttft_slo_s": 0.2}}}  # fmt: skip
    config = {"applications": [{**app, "args": {"auth": {"enabled": False}, "models": [model]}}]}
    config_path, bench, plot = tmp_path / "graph.yaml", tmp_path / "bench.json", tmp_path / "sim.png"
    config_path.write_text(yaml.safe_dump(config))
    bench.write_text(json.dumps({"results": {"servegraph": {
        "c=1": {"completed": 5, "median_ttft_ms": 40, "median_tpot_ms": 10},
        "c=4": {"completed": 5, "median_ttft_ms": 150, "median_tpot_ms": 20}}}}))  # fmt: skip
    status = servegraph(["simulate", str(config_path), "--model", "elastic", "--duration", "60", "--calibration",
                         str(bench), "--startup-s", "10", "--dt", "0.1", "--out", str(plot)])  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "ongoing" in printed and "signals" in printed and "GPU-hours" in printed
    assert plot.read_bytes().startswith(b"\x89PNG")
