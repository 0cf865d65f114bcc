"""`vllm bench serve` works unchanged against the graph (its payload carries vLLM extensions)."""

import json
import subprocess
import sys

from models.build import default_cache_dir, ensure_local_model
from models.spec import LocalBuildRecipe


def test_vllm_bench_serve_runs_against_the_graph(graph, tmp_path):
    tokenizer_dir = ensure_local_model(LocalBuildRecipe(**graph.model_spec("tiny")["build"]), default_cache_dir())
    result_file = tmp_path / "result.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.vllm_bench",
            "--backend",
            "openai",
            "--base-url",
            graph.base_url,
            "--endpoint",
            "/v1/completions",
            "--model",
            "tiny",
            "--tokenizer",
            str(tokenizer_dir),
            "--dataset-name",
            "random",
            "--random-input-len",
            "32",
            "--random-output-len",
            "16",
            "--ignore-eos",
            "--num-prompts",
            "8",
            "--max-concurrency",
            "4",
            "--disable-tqdm",
            "--save-result",
            "--result-filename",
            str(result_file),
        ],  # fmt: skip
        check=True,
        capture_output=True,
    )
    result = json.loads(result_file.read_text())
    summary = (result["completed"], result["failed"], result["total_output_tokens"])
    assert summary == (8, 0, 8 * 16), [e for e in result.get("errors", []) if e]
