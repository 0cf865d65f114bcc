"""Placement on a real two-node Ray cluster with logical GPUs, and vLLM engines sharing or splitting work.

Runs before tests/e2e (which owns the session's single-node head): this module's cluster is
started and shut down here, so the two never overlap in one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from servegraph.graphs.builder import build_llm_app
from servegraph.graphs.local_cluster import free_port
from servegraph.models.cluster import node_types_from_live_cluster
from servegraph.models.config import OPEN, LLMAppArgs
from servegraph.models.placement import PER_WORKER_GPUS_ENV, engine_deployment_options, plan_placement
from servegraph.models.spec import LocalBuildRecipe, ModelSpec

TINY = LocalBuildRecipe()
SHARED_GPU_TYPE = "T4"  # a logical label on the head node only, so both half-GPU engines must meet there


@ray.remote(num_cpus=0)
class WorkerStandIn:
    """A vLLM Ray worker's resource request without vLLM (its Ray executor is refused on CPU)."""

    def where(self) -> tuple[str, list[str]]:
        return ray.get_runtime_context().get_node_id(), [str(gpu) for gpu in ray.get_gpu_ids()]


@serve.deployment
class PlacementProbe:
    """Stands in for an engine whose workers cannot run on CPU (pipeline parallel): reports its bundles."""

    def bundle_nodes(self) -> dict[int, str]:
        table = ray.util.placement_group_table(ray.util.get_current_placement_group())
        return {int(bundle): node for bundle, node in table["bundles_to_node_id"].items()}

    def start_workers(self, timeout_s: float) -> tuple[str | None, list[tuple[str, list[str]]]]:
        """Start a worker in each GPU bundle as vLLM's RayExecutorV2 does: num_cpus 0, num_gpus read
        from this process's VLLM_RAY_PER_WORKER_GPUS (vllm/envs.py's parsing, default 1.0).
        Returns the variable as this replica sees it, and each worker's node and GPU ids."""
        group = ray.util.get_current_placement_group()
        per_worker = float(os.environ.get(PER_WORKER_GPUS_ENV, "1.0"))
        workers = [
            WorkerStandIn.options(
                num_gpus=per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
            ).remote()
            for index, bundle in enumerate(group.bundle_specs)
            if bundle.get("GPU")
        ]
        return os.environ.get(PER_WORKER_GPUS_ENV), ray.get([w.where.remote() for w in workers], timeout=timeout_s)


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory) -> Iterator[str]:
    assert not ray.is_initialized(), "another Ray cluster is running in this process"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("SERVEGRAPH_CACHE_DIR", str(tmp_path_factory.mktemp("model-cache")))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 1, "resources": {f"accelerator_type:{SHARED_GPU_TYPE}": 1}},
    )
    cluster.add_node(num_cpus=1, num_gpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def complete(base_url: str, model: str) -> dict:
    body = {"model": model, "prompt": "Hello there", "max_tokens": 4, "temperature": 0}
    response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_pipeline_parallel_replica_spreads_its_stages_over_two_nodes(two_node_cluster):
    spec = ModelSpec(name="pp", build=TINY, pipeline_parallel_size=2, placement_strategy="STRICT_SPREAD")
    app = PlacementProbe.options(name=spec.engine_deployment_name, **engine_deployment_options(spec, "gpu"))
    handle = serve.run(app.bind(), name="pp-probe", route_prefix=None)
    bundle_nodes = handle.bundle_nodes.remote().result(timeout_s=60)
    serve.delete("pp-probe")
    assert sorted(bundle_nodes) == [0, 1]
    assert len(set(bundle_nodes.values())) == 2, bundle_nodes


def test_fractional_pipeline_stages_start_vllm_workers_in_their_half_gpu_bundles(two_node_cluster):
    """Two stages at 0.5 GPU: each worker fits its bundle, on its own node and GPU, as the plan says."""
    spec = ModelSpec(
        name="pp-half", build=TINY, pipeline_parallel_size=2, gpu_fraction=0.5, placement_strategy="STRICT_SPREAD"
    )
    app = PlacementProbe.options(name=spec.engine_deployment_name, **engine_deployment_options(spec, "gpu"))
    handle = serve.run(app.bind(), name="pp-half-probe", route_prefix=None)
    try:
        env_value, workers = handle.start_workers.remote(30).result(timeout_s=90)
    finally:
        serve.delete("pp-half-probe")
    assert env_value == "0.5"  # the replica's runtime_env reached the process vLLM's executor runs in
    assert len({node for node, _ in workers}) == 2 and all(len(gpus) == 1 for _, gpus in workers), workers
    plan = plan_placement([(spec, 1)], node_types_from_live_cluster({SHARED_GPU_TYPE: 16}))
    assert len({assignment.gpu.split("]")[0] for assignment in plan.assignments}) == 2, plan.render()


def test_two_half_gpu_engines_share_one_gpu_and_both_serve(two_node_cluster):
    models = [
        ModelSpec(name=name, build=TINY, gpu_fraction=0.5, accelerator_type=SHARED_GPU_TYPE, max_num_seqs=4)
        for name in ("left", "right")
    ]
    serve.run(build_llm_app(LLMAppArgs(models=models, auth=OPEN)), name="shared", route_prefix="/shared")
    try:
        for name in ("left", "right"):
            assert complete(f"{two_node_cluster}/shared", name)["usage"]["completion_tokens"] == 4
        # Only the head carries the T4 label: both engines hold half of its one GPU, the worker's stays free.
        assert ray.available_resources().get("GPU", 0) == pytest.approx(1.0)
    finally:
        serve.delete("shared")


def test_tensor_parallel_two_on_cpu_serves(two_node_cluster):
    spec = ModelSpec(name="tp", build=TINY, tensor_parallel_size=2, max_num_seqs=4)
    serve.run(build_llm_app(LLMAppArgs(models=[spec], accelerator="cpu", auth=OPEN)), name="tp", route_prefix="/tp")
    try:
        result = complete(f"{two_node_cluster}/tp", "tp")
        assert result["usage"]["completion_tokens"] == 4 and result["choices"][0]["finish_reason"] == "length"
    finally:
        serve.delete("tp")
