"""Pipeline parallel for real: needs two GPUs (vLLM refuses the Ray executor on CPU, see RUNTIME-NOTES)."""

from __future__ import annotations

import os

import httpx
import pytest


def visible_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(visible_gpus() < 2, reason="needs 2 CUDA GPUs")]


def test_pipeline_parallel_replica_serves_on_two_gpus(tmp_path):
    import ray
    from ray import serve

    from servegraph.graphs.builder import build_llm_app
    from servegraph.graphs.local_cluster import free_port
    from servegraph.models.config import OPEN, LLMAppArgs
    from servegraph.models.spec import LocalBuildRecipe, ModelSpec

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("SERVEGRAPH_CACHE_DIR", str(tmp_path))
    # A whole GPU per stage: two fractional bundles of one replica would share a GPU (see models.placement).
    spec = ModelSpec(name="pp", build=LocalBuildRecipe(num_layers=4), pipeline_parallel_size=2)
    ray.init(num_gpus=2, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_llm_app(LLMAppArgs(models=[spec], auth=OPEN)), name="pp", route_prefix="/")
        body = {"model": "pp", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
    finally:
        serve.shutdown()
        ray.shutdown()
