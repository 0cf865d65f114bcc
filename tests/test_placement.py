"""GPU placement arithmetic, Ray resources per replica, refusals, cluster.yaml and the plan command."""

from pathlib import Path

import pytest
import yaml

from servegraph.graphs.cli import main as servegraph
from servegraph.graphs.cli import plan_config, validate_config
from servegraph.graphs.local_cluster import ROOT
from servegraph.models.cluster import load_launcher_config, node_types_from_launcher, validate_launcher_config
from servegraph.models.engine_config import cpu_threads_bind, engine_kwargs
from servegraph.models.placement import (
    EngineMemory,
    NodeType,
    PlacementError,
    engine_deployment_options,
    gpu_memory_utilization,
    model_shape,
    plan_placement,
    shape_from_hf_config,
)
from servegraph.models.spec import ModelShape, ModelSpec

SMALL = ModelShape(num_parameters=1_500_000_000, num_layers=28, num_kv_heads=2, head_dim=128)
LLAMA_8B_CONFIG = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
}  # fmt: skip


def spec(name: str, **fields) -> ModelSpec:
    return ModelSpec(name=name, hub_id=f"org/{name}", shape=fields.pop("shape", SMALL), **fields)


def one_node(gpus: int = 1, gpu_type: str = "A10G", count: int = 1) -> list[NodeType]:
    return [NodeType("gpu-node", gpus, gpu_type, count)]


def test_gpu_fraction_is_also_the_memory_budget():
    assert gpu_memory_utilization(spec("m", gpu_fraction=0.5)) == 0.46
    kwargs = engine_kwargs(spec("m", gpu_fraction=0.25), "org/m", on_cpu=False)
    assert kwargs["gpu_memory_utilization"] == 0.23


def test_single_worker_replica_asks_ray_for_its_gpu_share():
    options = engine_deployment_options(spec("m", gpu_fraction=0.5, accelerator_type="A10G"), "gpu")
    assert options == {
        "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.5, "resources": {"accelerator_type:A10G": 0.001}}
    }
    assert engine_deployment_options(spec("m"), "cpu") == {"ray_actor_options": {"num_cpus": 0.5}}


def test_parallel_replica_gets_one_bundle_per_worker_and_the_ray_executor():
    model = spec("big", tensor_parallel_size=2, pipeline_parallel_size=2, placement_strategy="STRICT_SPREAD")
    options = engine_deployment_options(model, "gpu")
    assert options["placement_group_bundles"] == [{"GPU": 1.0, "CPU": 0.5}] + [{"GPU": 1.0}] * 3
    assert options["placement_group_strategy"] == "STRICT_SPREAD"
    assert options["ray_actor_options"] == {"num_cpus": 0}
    assert engine_kwargs(model, "org/big", on_cpu=False)["distributed_executor_backend"] == "ray"
    assert engine_kwargs(model, "org/big", on_cpu=True)["distributed_executor_backend"] == "mp"


def test_cpu_tensor_parallel_ranks_get_disjoint_cores():
    assert cpu_threads_bind(2, [0, 1]) == "0|1"
    assert cpu_threads_bind(2, [0, 1, 2, 3, 4]) == "0,1|2,3"
    with pytest.raises(ValueError, match="2 CPU workers need as many cores"):
        cpu_threads_bind(2, [0])


def test_shape_from_a_real_config_counts_llama_8b():
    shape = shape_from_hf_config(LLAMA_8B_CONFIG)
    assert shape.num_parameters == pytest.approx(8_030_261_248, rel=0.001)
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (32, 8, 128)


def test_memory_splits_over_parallel_workers():
    model = spec("m", tensor_parallel_size=2, max_model_len=1024, max_num_seqs=4)
    memory = EngineMemory.of(model, SMALL)
    assert memory.weights_bytes == 1_500_000_000 * 2 // 2
    assert memory.kv_cache_bytes == 2 * 28 * 2 * 128 * 2 * 1024 * 4 // 2


def test_hub_model_without_shape_is_refused_with_what_to_add():
    with pytest.raises(PlacementError, match="give `shape`"):
        model_shape(ModelSpec(name="m", hub_id="org/m"))


def test_two_half_gpu_models_share_one_gpu():
    plan = plan_placement([(spec("a", gpu_fraction=0.5), 1), (spec("b", gpu_fraction=0.5), 1)], one_node())
    assert {a.gpu for a in plan.assignments} == {"gpu-node[0] gpu0"}
    assert plan.gpus[0].free == 0
    assert "whole GPUs left: 0" in plan.render()


def test_fractions_over_one_gpu_are_refused_naming_the_model():
    models = [(spec("a", gpu_fraction=0.5), 1), (spec("b", gpu_fraction=0.5), 1), (spec("c", gpu_fraction=0.25), 1)]
    with pytest.raises(PlacementError, match=r"model 'c' replica 0: no room for 1 worker\(s\) of 0.25 GPU"):
        plan_placement(models, one_node())


def test_engine_over_its_memory_share_is_refused_with_the_numbers():
    big = spec("big", gpu_fraction=0.5, accelerator_type="A10G", max_model_len=8192, max_num_seqs=64)
    with pytest.raises(PlacementError) as refused:
        plan_placement([(big, 1)], one_node())
    message = str(refused.value)
    assert "model 'big' does not fit on A10G (24 GiB)" in message
    assert "needs 16.8 GiB (weights 2.8 + KV cache 14.0 for 64 x 8192 tokens)" in message
    assert "but gpu_fraction 0.5 leaves 11.0 GiB" in message


def test_strict_spread_puts_pipeline_stages_on_different_nodes():
    model = spec("pp", pipeline_parallel_size=2, placement_strategy="STRICT_SPREAD")
    plan = plan_placement([(model, 1)], one_node(gpus=2, count=2))
    assert [a.gpu for a in plan.assignments] == ["gpu-node[0] gpu0", "gpu-node[1] gpu0"]
    with pytest.raises(PlacementError, match="STRICT_SPREAD"):
        plan_placement([(model, 1)], one_node(gpus=2, count=1))


def test_pack_keeps_tensor_parallel_workers_on_one_node():
    model = spec("tp", tensor_parallel_size=2)
    plan = plan_placement([(model, 2)], one_node(gpus=4, count=2))
    assert [a.gpu for a in plan.assignments] == [f"gpu-node[0] gpu{i}" for i in range(4)]


def test_model_pinned_to_a_missing_gpu_type_is_refused():
    with pytest.raises(PlacementError, match="asks for GPU type H100; the cluster has none"):
        plan_placement([(spec("m", accelerator_type="H100"), 1)], one_node())


def test_cluster_yaml_is_a_valid_ray_cluster_launcher_config():
    config = load_launcher_config(ROOT / "cluster.yaml")
    validate_launcher_config(config)
    types = {t.name: (t.gpus, t.gpu_type, t.count) for t in node_types_from_launcher(config)}
    assert types == {"gpu-a10g-1x": (1, "A10G", 2), "gpu-l40s-4x": (4, "L40S", 4)}


def test_cluster_yaml_starts_every_node_with_the_graphs_serve_environment():
    """Serve reads these at import on every node: a knob missing from cluster.yaml is silently off."""
    from servegraph.graphs.local_cluster import SERVE_ENV

    config = load_launcher_config(ROOT / "cluster.yaml")
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        ray_start = next(command for command in commands if "ray start" in command)
        assert all(f"{name}={value}" in ray_start.split() for name, value in SERVE_ENV.items()), ray_start


def test_gpu_config_validates_and_its_plan_fits_cluster_yaml():
    validate_config(ROOT / "graphs" / "gpu.yaml")
    node_types = node_types_from_launcher(load_launcher_config(ROOT / "cluster.yaml"))
    (report,) = plan_config(ROOT / "graphs" / "gpu.yaml", node_types)
    assert "llama-3.1-70b  0        7       gpu-l40s-4x[1] gpu3" in report  # second pipeline stage, second node
    assert report.count("gpu-a10g-1x[0] gpu0") == 2  # the two half-GPU models share one A10G


def test_plan_command_refuses_a_config_that_does_not_fit(tmp_path: Path, capsys):
    config = yaml.safe_load((ROOT / "graphs" / "gpu.yaml").read_text())
    config["applications"][0]["deployments"] = [{"name": "engine-llama-3.1-70b-v1", "num_replicas": 3}]
    path = tmp_path / "too-big.yaml"
    path.write_text(yaml.safe_dump(config))
    assert servegraph(["plan", str(path), "--cluster", str(ROOT / "cluster.yaml")]) == 2
    assert "model 'llama-3.1-70b' replica 2: no room for 8 worker(s) of 1 L40S" in capsys.readouterr().err


def test_deploy_refuses_an_engine_over_its_share_before_any_replica(tmp_path: Path):
    config = yaml.safe_load((ROOT / "graphs" / "gpu.yaml").read_text())
    config["applications"][0]["args"]["models"][1]["max_num_seqs"] = 256
    path = tmp_path / "over-budget.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(Exception, match="model 'qwen-2.5-1.5b' does not fit on A10G"):
        validate_config(path)
