"""The benchmark command drives the running graph with vLLM's client and writes JSON and a plot."""

import json
import subprocess
import sys


def test_benchmark_sweeps_the_graph_and_writes_json_and_png(graph, tmp_path):
    command = [
        sys.executable, "-m", "servegraph.bench.compare", "--targets", "", "--url", graph.base_url,
        "--served-model", "tiny",
        "--concurrency", "4", "--rounds", "2", "--num-prompts", "8", "--input-len", "32", "--output-len", "16",
        "--range-ratio", "0.5", "--out", str(tmp_path),
    ]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]

    (json_path,) = tmp_path.glob("bench-*.json")
    (png_path,) = tmp_path.glob("bench-*.png")
    report = json.loads(json_path.read_text())
    assert report["failures"] == {} and report["one_token_latency_ms"]["endpoint"]["http ms"] > 0
    results = report["results"]["endpoint"]
    assert {point: (r["rounds"], r["completed"], r["failed"]) for point, r in results.items()} == {"c=4": (2, 16, 0)}
    assert [run["completed"] for run in report["rounds"]["endpoint"]["c=4"]] == [8, 8]
    assert all(r["output_throughput"] > 0 and r["median_ttft_ms"] > 0 for r in results.values())
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| endpoint | c=4" in finished.stdout


def test_vllm_bench_serve_runs_unchanged_against_the_graph(graph, tmp_path):
    """Its payload carries vLLM extensions (repetition_penalty, logprobs: null) we must accept."""
    from servegraph.bench.workload import LoadPoint, Workload
    from servegraph.models.build import default_cache_dir, ensure_local_model
    from servegraph.models.spec import LocalBuildRecipe

    tokenizer_dir = ensure_local_model(LocalBuildRecipe(**graph.model_spec("tiny")["build"]), default_cache_dir())
    workload = Workload(input_len=32, output_len=16, num_prompts=8, endpoint="/v1/chat/completions")
    result = workload.run(graph.base_url, "tiny", tokenizer_dir, LoadPoint(concurrency=4), tmp_path)
    assert (result["completed"], result["failed"], result["total_output_tokens"]) == (8, 0, 8 * 16)


def test_hop_latencies_call_every_stage_of_the_running_graph(graph):
    """What `make bench` measures after its load points on the servegraph target (this process drives the cluster)."""
    from servegraph.bench.hops import hop_latencies

    figures = hop_latencies(graph.base_url, "tiny", app="llm", repeats=3)
    assert {"tokenizer ms", "engine ms", "postprocess+engine ms", "http ms"} <= set(figures)
    assert all(figures[name] > 0 for name in ("tokenizer ms", "engine ms", "postprocess+engine ms", "http ms"))
    # A 64-token stream: vLLM's stream_interval (8) sends a message per 8 tokens after the first.
    assert 0 < figures["engine->postprocess msgs/token"] <= 0.25
    assert 0 < figures["postprocess->ingress msgs/token"] <= 0.5
