"""GPU placement arithmetic, Ray resources per replica, refusals, cluster.yaml and the plan command."""

import re
from pathlib import Path

import pytest
import yaml

from servegraph.graphs.cli import main as servegraph
from servegraph.graphs.cli import plan_config, read_config, validate_config
from servegraph.graphs.local_cluster import ROOT
from servegraph.models.cluster import load_launcher_config, node_types_from_launcher, validate_launcher_config
from servegraph.models.engine_config import cpu_threads_bind, engine_kwargs
from servegraph.models.placement import (
    PER_WORKER_GPUS_ENV,
    EngineMemory,
    NodeType,
    PlacementError,
    check_schedulable,
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
    assert options["ray_actor_options"] == {"num_cpus": 0, "runtime_env": {"env_vars": {PER_WORKER_GPUS_ENV: "1.0"}}}
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


def vllm_worker_requests(options: dict) -> list[tuple[float, float]]:
    """(what vLLM's Ray executor asks per worker, what its bundle holds) for each GPU bundle.

    vLLM (v1/executor/ray_executor*.py) starts one worker per GPU bundle with num_gpus =
    VLLM_RAY_PER_WORKER_GPUS from the replica's environment, 1.0 when unset, and refuses a
    bundle with more than one GPU.
    """
    env = options["ray_actor_options"].get("runtime_env", {}).get("env_vars", {})
    per_worker = float(env.get(PER_WORKER_GPUS_ENV, "1.0"))
    return [(per_worker, bundle["GPU"]) for bundle in options["placement_group_bundles"] if bundle.get("GPU")]


def test_fractional_pipeline_parallel_tells_vllm_workers_their_share():
    model = spec("pp", pipeline_parallel_size=2, gpu_fraction=0.5, placement_strategy="STRICT_SPREAD")
    options = engine_deployment_options(model, "gpu")
    assert options["placement_group_bundles"] == [{"GPU": 0.5, "CPU": 0.5}, {"GPU": 0.5}]
    assert options["ray_actor_options"]["runtime_env"] == {"env_vars": {"VLLM_RAY_PER_WORKER_GPUS": "0.5"}}
    assert vllm_worker_requests(options) == [(0.5, 0.5), (0.5, 0.5)]  # each worker fits its bundle
    kwargs = engine_kwargs(model, "org/pp", on_cpu=False)
    assert (kwargs["distributed_executor_backend"], kwargs["gpu_memory_utilization"]) == ("ray", 0.46)


def test_fractional_tensor_parallel_tells_vllm_workers_their_share():
    model = spec("tp", tensor_parallel_size=4, gpu_fraction=0.25, placement_strategy="STRICT_SPREAD")
    options = engine_deployment_options(model, "gpu")
    assert vllm_worker_requests(options) == [(0.25, 0.25)] * 4


@pytest.mark.parametrize(
    "fields",
    [
        {"pipeline_parallel_size": 2, "gpu_fraction": 0.5},  # the PP example of tests/cluster before: PACK
        {"tensor_parallel_size": 2, "gpu_fraction": 0.5, "placement_strategy": "SPREAD"},
        {"tensor_parallel_size": 2, "gpu_fraction": 0.5, "placement_strategy": "STRICT_PACK"},
    ],
)
def test_fractional_workers_that_could_share_a_gpu_are_refused(fields):
    """Ray gave two 0.5 bundles of one PACK group GPU 0 on a two-GPU node; NCCL ranks cannot share it."""
    model = spec("frac", **fields)
    with pytest.raises(PlacementError, match="may land on one GPU.*use gpu_fraction 1 or STRICT_SPREAD"):
        engine_deployment_options(model, "gpu")
    with pytest.raises(PlacementError, match="may land on one GPU"):
        plan_placement([(model, 1)], one_node(gpus=2, count=2))
    check_schedulable(spec("whole", **{**fields, "gpu_fraction": 1.0}))  # whole GPUs are distinct bundles' own


def test_unpinned_model_that_fits_only_the_larger_gpus_is_refused_naming_them():
    """Ray places by fraction only: it may put the model on the small GPU the plan would avoid."""
    model = spec("mid", gpu_fraction=0.5, max_model_len=8192, max_num_seqs=32)  # 2.8 + 7.0 GiB
    nodes = [NodeType("small", 1, "T4", 1), NodeType("large", 1, "L40S", 1)]
    with pytest.raises(PlacementError) as refused:
        plan_placement([(model, 1)], nodes)
    assert "each worker needs 9.8 GiB, which gpu_fraction 0.5 leaves on L40S but not on T4" in str(refused.value)
    assert "set accelerator_type to one of L40S" in str(refused.value)
    pinned = plan_placement([(spec("mid", gpu_fraction=0.5, accelerator_type="L40S", max_model_len=8192,
                                   max_num_seqs=32), 1)], nodes)  # fmt: skip
    assert [a.gpu for a in pinned.assignments] == ["large[0] gpu0"]


def test_worker_goes_to_the_gpu_with_the_least_free_memory_that_holds_it():
    """By memory, not fraction: 8 GiB free on a half-used T4 beats 12 GiB on a three-quarter-used L40S."""
    nodes = [NodeType("large", 1, "L40S", 1), NodeType("small", 1, "T4", 1)]
    models = [
        (spec("big", gpu_fraction=0.75, accelerator_type="L40S"), 1),
        (spec("half", gpu_fraction=0.5, accelerator_type="T4"), 1),
        (spec("tiny", gpu_fraction=0.25, shape=ModelShape(num_parameters=10**8, num_layers=4, num_kv_heads=1,
                                                          head_dim=64)), 1),
    ]  # fmt: skip
    plan = plan_placement(models, nodes)
    assert {a.model: a.gpu for a in plan.assignments}["tiny"] == "small[0] gpu0"
    assert [round(g.free_gib, 1) for g in plan.gpus] == [12.0, 4.0]
    assert "partly free: large[0] gpu0 0.25 (12.0 GiB), small[0] gpu0 0.25 (4.0 GiB)" in plan.render()


def test_no_room_names_each_gpus_free_memory():
    models = [(spec("a", gpu_fraction=0.75), 1), (spec("b", gpu_fraction=0.5), 1)]
    with pytest.raises(PlacementError) as refused:
        plan_placement(models, one_node())
    message = str(refused.value)
    assert "model 'b' replica 0: no room for 1 worker(s) of 0.5 GPU (PACK), each needing 3.2 GiB" in message
    assert "free GPU fractions (memory): gpu-node[0] gpu0 0.25 (6.0 GiB)" in message


def test_gpu_yaml_parallel_engines_fit_the_nodes_of_cluster_yaml():
    """Every bundle of a multi-worker engine fits one node type, and each vLLM worker fits its bundle."""
    from servegraph.models.config import LLMAppArgs

    config = yaml.safe_load((ROOT / "graphs" / "gpu.yaml").read_text())
    launcher = load_launcher_config(ROOT / "cluster.yaml")
    nodes = [t["resources"] for t in launcher["available_node_types"].values()]
    args = LLMAppArgs.model_validate(config["applications"][0]["args"])
    parallel = [model for model in args.models if model.num_workers > 1]
    assert [model.name for model in parallel] == ["llama-3.1-70b"]
    for model in parallel:
        options = engine_deployment_options(model, "gpu")
        for bundle in options["placement_group_bundles"]:
            assert any(all(node.get(k, 0) >= v for k, v in bundle.items()) for node in nodes), bundle
        requests = vllm_worker_requests(options)
        assert len(requests) == model.num_workers and all(0 < ask <= held <= 1 for ask, held in requests)
        assert PER_WORKER_GPUS_ENV in options["ray_actor_options"]["runtime_env"]["env_vars"]


def shell_commands(config: dict, key: str) -> str:
    return "\n".join(config.get(key, []))


def test_cluster_yaml_provides_the_shared_usage_dir_of_gpu_yaml_on_every_node():
    launcher = load_launcher_config(ROOT / "cluster.yaml")
    usage_dir = Path(
        yaml.safe_load((ROOT / "graphs" / "gpu.yaml").read_text())["applications"][0]["args"]["usage"]["dir"]
    )
    head, workers = shell_commands(launcher, "head_setup_commands"), shell_commands(launcher, "worker_setup_commands")
    (export,) = re.findall(r"echo '(\S+) \*\(rw", head)
    assert usage_dir.is_relative_to(export)
    assert f"mkdir -p {usage_dir}" in head and "chown -R ubuntu" in head  # Ray runs as the ssh user
    (mount,) = re.findall(r"mount -t nfs4 .*\$RAY_HEAD_IP:(\S+) (\S+)\)", workers)
    assert mount == (export, export)  # the same path on every node
    assert f"test -w {usage_dir}" in workers
    for node_type in launcher["available_node_types"].values():  # none replaces the shared setup
        assert "worker_setup_commands" not in node_type


def test_cluster_yaml_starts_ray_with_every_api_key_variable_of_gpu_yaml():
    """The ingress reads keys_env in its replica, which inherits the environment `ray start` had."""
    launcher = load_launcher_config(ROOT / "cluster.yaml")
    auth = yaml.safe_load((ROOT / "graphs" / "gpu.yaml").read_text())["applications"][0]["args"]["auth"]
    names = [tenant["keys_env"] for tenant in auth["tenants"] if tenant.get("keys_env")]
    env_file = "~/servegraph-keys.env"
    assert env_file in launcher["file_mounts"]
    for commands in (launcher["head_start_ray_commands"], launcher["worker_start_ray_commands"]):
        ray_start = next(command for command in commands if "ray start" in command)
        assert ray_start.startswith(f"set -a && . {env_file} && set +a"), ray_start
        assert all(f'"${{{name}:?}}"' in ray_start for name in names), ray_start
        assert ray_start.index("|| exit 1;") < ray_start.index("ray start")


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
    validate_config(read_config(ROOT / "graphs" / "gpu.yaml"))
    node_types = node_types_from_launcher(load_launcher_config(ROOT / "cluster.yaml"))
    (report,) = plan_config(read_config(ROOT / "graphs" / "gpu.yaml"), node_types)
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
        validate_config(read_config(path))
