"""`servegraph k8s`: RayService manifests that KubeRay's own schema accepts, for every graph config.

No cluster is reachable from the tests, so the manifests are checked offline against the RayService
CRD (tests/data/kuberay) the way a Kubernetes API server applies a structural schema: OpenAPI's
`nullable`, KubeRay's `int-or-string` quantities, int32/int64 formats, list-map keys and sets, the
CEL rules that apply on create, and unknown fields refused (the API server would prune them
silently, so a field the generator misspells would vanish without a word).
"""

from __future__ import annotations

import ast
import copy
import re
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from jsonschema.exceptions import ValidationError
from ray.serve.schema import ServeDeploySchema

from servegraph.graphs.cli import main as servegraph
from servegraph.graphs.cli import read_config
from servegraph.graphs.k8s import (
    K8S_USAGE_DIR,
    MAX_NAME_LENGTH,
    ManifestOptions,
    build_manifest,
    default_name,
    dump_yaml,
)
from servegraph.models.cluster import load_launcher_config, node_types_from_launcher
from servegraph.models.placement import plan_placement

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "tests" / "data" / "kuberay" / "ray.io_rayservices.yaml"
CLUSTER = ROOT / "cluster.yaml"
GRAPH_CONFIGS = sorted((ROOT / "graphs").glob("*.yaml"))
GPU_YAML = ROOT / "graphs" / "gpu.yaml"
LOCAL_YAML = ROOT / "graphs" / "local.yaml"
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# What the API server checks of metadata (ObjectMeta), plus KubeRay's own rule for a RayService's name
# (ValidateRayServiceMetadata: a DNS-1035 label of at most 47 characters). Only the fields we write.
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": DNS_1035_LABEL, "maxLength": MAX_NAME_LENGTH},
        "namespace": {"type": "string", "pattern": DNS_1123_LABEL, "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def openapi_to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural OpenAPI v3 schema as JSON Schema (draft 4), with Kubernetes' semantics kept.

    - `nullable: true` admits null;
    - `x-kubernetes-int-or-string` is an integer or a string (the CRD spells the anyOf too; added if not);
    - an object with fixed properties, or none, and no `x-kubernetes-preserve-unknown-fields` admits no
      other field: the API server would prune it, which for a generated manifest is a bug to catch;
    - the list-type, CEL and format keywords stay and are checked by the validator's own keywords.
    """
    schema = dict(node)
    if schema.get("nullable") and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    open_object = schema.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in schema
    if schema.get("type") == "object" and not open_object:
        schema["additionalProperties"] = False
    if "properties" in schema:
        schema["properties"] = {name: openapi_to_json_schema(sub) for name, sub in schema["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            schema[key] = openapi_to_json_schema(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [openapi_to_json_schema(sub) for sub in schema[key]]
    return schema


def list_type(validator, kind: str, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    """`x-kubernetes-list-type`: a map's items are unique by their key fields, which they must have;
    a set's items are unique."""
    if not isinstance(instance, list):
        return
    if kind == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        defaults = {key: prop.get("default") for key, prop in schema["items"].get("properties", {}).items()}
        seen: set[tuple] = set()
        for item in instance:
            missing = [key for key in keys if key not in item and defaults.get(key) is None]
            if missing:
                yield ValidationError(f"list-map item {item!r} lacks its key fields {missing}")
                continue
            identity = tuple(item.get(key, defaults.get(key)) for key in keys)
            if identity in seen:
                yield ValidationError(f"duplicate list-map entry for keys {keys} = {identity}")
            seen.add(identity)
    elif kind == "set":
        repeated = [item for item, count in Counter(map(repr, instance)).items() if count > 1]
        if repeated:
            yield ValidationError(f"duplicate items in a list-type set: {repeated}")
    elif kind != "atomic":
        yield ValidationError(f"unknown x-kubernetes-list-type {kind!r}")


CEL_MEMBERSHIP = re.compile(r"self in (\[.*\])")


def cel_rules(
    validator, rules: list[dict[str, str]], instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    """`x-kubernetes-validations` on create: rules that compare with `oldSelf` apply to updates only;
    `self in [...]` is evaluated; any other rule fails rather than pass unchecked."""
    for rule in rules:
        expression = rule["rule"]
        if "oldSelf" in expression:
            continue
        if membership := CEL_MEMBERSHIP.fullmatch(expression.strip()):
            if instance not in ast.literal_eval(membership.group(1)):
                yield ValidationError(rule.get("message", expression))
        else:
            yield ValidationError(f"CEL rule not evaluable offline: {expression}")


def format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()
    for name, bits in (("int32", 32), ("int64", 64)):
        checker.checks(name)(
            lambda value, bits=bits: not isinstance(value, int) or -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)
        )
    checker.checks("date-time", raises=ValueError)(
        lambda value: not isinstance(value, str) or bool(datetime.fromisoformat(value.replace("Z", "+00:00")))
    )
    return checker


KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": list_type, "x-kubernetes-validations": cel_rules}
)


@cache
def rayservice_validator(api_version: str = "ray.io/v1") -> jsonschema.protocols.Validator:
    """The CRD's schema for the served version a manifest names, as the API server would apply it."""
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version and v["served"])
    schema = openapi_to_json_schema(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"]["apiVersion"] = {"enum": [api_version]}
    schema["properties"]["kind"] = {"enum": [crd["spec"]["names"]["kind"]]}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    KubernetesValidator.check_schema(schema)
    return KubernetesValidator(schema, format_checker=format_checker())


def operator_errors(manifest: dict[str, Any]) -> list[str]:
    """Checks KubeRay's operator makes beyond the CRD (ValidateRayClusterSpec), those our manifests touch."""
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = cluster.get("workerGroupSpecs", [])
    errors = [
        f"duplicate worker group {name!r}" for name, n in Counter(g["groupName"] for g in groups).items() if n > 1
    ]
    for group in groups:
        if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            errors.append(f"group {group['groupName']!r}: needs minReplicas <= replicas <= maxReplicas")
    if not cluster["headGroupSpec"]["template"]["spec"]["containers"]:
        errors.append("head pod without a container")
    return errors


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    """What the API server refuses, else what the operator would (it only sees admitted objects)."""
    errors = rayservice_validator(manifest.get("apiVersion", "ray.io/v1")).iter_errors(manifest)
    messages = [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in errors]
    return messages or operator_errors(manifest)


def manifest_for(config_path: Path, **options: Any) -> dict[str, Any]:
    """The manifest as a user gets it: written as YAML, read back."""
    options = {"name": default_name(config_path), "cluster": load_launcher_config(CLUSTER)} | options
    manifest = build_manifest(read_config(config_path), ManifestOptions(**options))
    return yaml.safe_load(dump_yaml(manifest))


def containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = manifest["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [container for template in templates for container in template["spec"]["containers"]]


def groups_by_name(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {group["groupName"]: group for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def test_the_configs_in_graphs_are_all_covered():
    assert {"local.yaml", "gpu.yaml"} <= {path.name for path in GRAPH_CONFIGS}


@pytest.mark.parametrize("config_path", GRAPH_CONFIGS, ids=lambda path: path.name)
def test_every_graph_config_makes_a_rayservice_the_crd_accepts(config_path):
    manifest = manifest_for(config_path)
    assert schema_errors(manifest) == []
    assert manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"], "the engines need a worker group"


def break_worker_replicas(manifest):
    manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "2"


def break_required_field(manifest):
    del manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"]


def break_unknown_field(manifest):
    manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1


def break_fractional_cpu(manifest):
    containers(manifest)[1]["resources"]["limits"]["cpu"] = 0.5  # a quantity is an integer or a string


def break_quantity(manifest):
    containers(manifest)[0]["resources"]["requests"]["memory"] = "lots"


def break_duplicate_env(manifest):
    env = containers(manifest)[1]["env"]
    env.append(dict(env[0]))


def break_port_without_key(manifest):
    del containers(manifest)[0]["ports"][0]["containerPort"]


def break_auth_mode(manifest):
    manifest["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "tokens"


def break_start_param_type(manifest):
    manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def break_int32(manifest):
    manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = 2**31


def break_managed_by(manifest):
    manifest["spec"]["rayClusterConfig"]["managedBy"] = "someone-else"


def break_name(manifest):
    manifest["metadata"]["name"] = "Servegraph_GPU"


def break_replica_order(manifest):
    manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = 5


# Each breakage and what the refusal must say: the check that caught it, not just any error.
BREAKAGES = [
    (break_worker_replicas, "'2' is not of type 'integer'"),
    (break_required_field, "'maxReplicas' is a required property"),
    (break_unknown_field, "'minReplica' was unexpected"),
    (break_fractional_cpu, "0.5 is not valid under any of the given schemas"),
    (break_quantity, "'lots' does not match"),
    (break_duplicate_env, "duplicate list-map entry for keys ['name']"),
    (break_port_without_key, "lacks its key fields ['containerPort']"),
    (break_auth_mode, "'tokens' is not one of ['disabled', 'token']"),
    (break_start_param_type, "0 is not of type 'string'"),
    (break_int32, "is not a 'int32'"),
    (break_managed_by, "the managedBy field value must be either"),
    (break_name, "'Servegraph_GPU' does not match"),
    (break_replica_order, "needs minReplicas <= replicas <= maxReplicas"),
]


@pytest.mark.parametrize(
    ("breakage", "refusal"), BREAKAGES, ids=[b.__name__.removeprefix("break_") for b, _ in BREAKAGES]
)
def test_a_broken_manifest_fails_validation(breakage: Callable[[dict], None], refusal: str):
    manifest = manifest_for(GPU_YAML)
    assert schema_errors(manifest) == []
    broken = copy.deepcopy(manifest)
    breakage(broken)
    errors = schema_errors(broken)
    assert any(refusal in error for error in errors), errors


@pytest.mark.parametrize("config_path", GRAPH_CONFIGS, ids=lambda path: path.name)
def test_the_embedded_serve_config_is_the_graph_config(config_path):
    written = yaml.safe_load(config_path.read_text())
    embedded = yaml.safe_load(manifest_for(config_path)["spec"]["serveConfigV2"])
    host = (written.get("http_options") or {}).get("host")
    if host not in (None, "0.0.0.0", "::"):  # the one change: proxies listen on the pod network
        assert embedded["http_options"]["host"] == "0.0.0.0"
        written["http_options"]["host"] = "0.0.0.0"
    assert embedded == written
    ServeDeploySchema.model_validate(embedded)


def test_the_gpu_graph_embeds_its_file_unchanged():
    assert yaml.safe_load(manifest_for(GPU_YAML)["spec"]["serveConfigV2"]) == yaml.safe_load(GPU_YAML.read_text())


def test_the_local_graph_listens_on_the_pod_network():
    embedded = yaml.safe_load(manifest_for(LOCAL_YAML)["spec"]["serveConfigV2"])
    assert embedded["http_options"] == {"host": "0.0.0.0", "port": 8000}


def nodes_in_plan(models, node_types) -> Counter[str]:
    """Nodes of each type a plan's assignments name (`<type>[<node>] gpu<i>`)."""
    plan = plan_placement(models, node_types)
    return Counter(node_type for node_type, _ in {re.match(r"(.+)\[(\d+)\]", a.gpu).groups() for a in plan.assignments})


def test_gpu_worker_groups_follow_the_placement_plan():
    config = read_config(GPU_YAML)
    node_types = node_types_from_launcher(load_launcher_config(CLUSTER))
    _, args = next(config.llm_apps())
    at_max = nodes_in_plan([(spec, spec.autoscaling.max_replicas) for spec in args.models], node_types)
    at_min = nodes_in_plan([(spec, spec.autoscaling.min_replicas) for spec in args.models], node_types)
    # 70B: TP 4 x PP 2 on two 4-GPU L40S nodes; 8B: one or two whole L40S on a third; two 0.5 models on one A10G
    assert at_max == {"gpu-l40s-4x": 3, "gpu-a10g-1x": 1} == at_min

    groups = groups_by_name(manifest_for(GPU_YAML))
    assert set(groups) == set(at_max)
    launcher = load_launcher_config(CLUSTER)["available_node_types"]
    for name, group in groups.items():
        assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (
            at_min[name],
            at_min[name],
            at_max[name],
        )
        node_type = launcher[name]
        gpus = str(node_type["resources"]["GPU"])
        worker = group["template"]["spec"]["containers"][0]
        assert (
            worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] == gpus
        )
        assert int(worker["resources"]["limits"]["cpu"]) < node_type["resources"]["CPU"]  # room for the kubelet
        accelerator = next(key for key in node_type["resources"] if key.startswith("accelerator_type:"))
        assert group["resources"] == {accelerator: "1"}  # Ray's autoscaler knows the GPU type before a pod exists
        spec = group["template"]["spec"]
        assert spec["nodeSelector"] == {"node.kubernetes.io/instance-type": node_type["node_config"]["InstanceType"]}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_engine_autoscaling_bounds_size_the_groups(tmp_path):
    """Scale-to-zero models leave their GPU type at zero nodes at the minimum; more 8B replicas need more L40S."""
    config = yaml.safe_load(GPU_YAML.read_text())
    models = {model["name"]: model for model in config["applications"][0]["args"]["models"]}
    models["qwen-2.5-1.5b"]["autoscaling"] = {"min_replicas": 0, "max_replicas": 1}
    models["llama-3.2-1b"]["autoscaling"] = {"min_replicas": 0, "max_replicas": 1}
    models["llama-3.1-8b"]["autoscaling"] = {"min_replicas": 1, "initial_replicas": 2, "max_replicas": 6}
    path = tmp_path / "scaling.yaml"
    path.write_text(yaml.safe_dump(config))
    manifest = manifest_for(path)
    assert schema_errors(manifest) == []
    groups = groups_by_name(manifest)
    bounds = {name: (g["minReplicas"], g["replicas"], g["maxReplicas"]) for name, g in groups.items()}
    # 70B's two nodes plus 8B's GPUs: 1 or 2 of them fit a third node, 6 need a fourth
    assert bounds == {"gpu-a10g-1x": (0, 0, 1), "gpu-l40s-4x": (3, 3, 4)}
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert (
        cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 60 * load_launcher_config(CLUSTER)["idle_timeout_minutes"]
    )


def test_a_graph_whose_engines_do_not_autoscale_leaves_the_autoscaler_off():
    cluster = manifest_for(LOCAL_YAML)["spec"]["rayClusterConfig"]
    assert "enableInTreeAutoscaling" not in cluster and "autoscalerOptions" not in cluster


def test_a_cpu_graph_gets_a_cpu_worker_group_and_no_gpus():
    manifest = manifest_for(LOCAL_YAML)
    cluster = manifest["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["groupName"] == "cpu" and (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (1, 1, 1)
    assert "nvidia.com/gpu" not in yaml.safe_dump(manifest) and "resources" not in group
    assert "tolerations" not in group["template"]["spec"]
    assert cluster["headGroupSpec"]["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-cpus": "0"}
    assert all(
        c["image"].startswith("rayproject/ray:2.60") and c["image"].endswith("-cpu") for c in containers(manifest)
    )


def test_pods_get_the_environment_the_graph_reads():
    manifest = manifest_for(GPU_YAML, secret="keys")
    for container in containers(manifest):
        env = {item["name"]: item for item in container["env"]}
        for name in ("SERVEGRAPH_PRODUCT_KEYS", "SERVEGRAPH_RESEARCH_KEYS", "SERVEGRAPH_ADMIN_KEYS"):
            assert env[name]["valueFrom"] == {"secretKeyRef": {"name": "keys", "key": name}}  # required: a pod
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True  # without one does not start
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"]["value"] == "1"
        assert "RAY_AUTH_MODE" not in env  # KubeRay sets it, and the token, with authOptions
        usage = next(m for m in container["volumeMounts"] if m["name"] == "usage")
        assert usage["mountPath"] == "/mnt/shared/servegraph/usage"  # gpu.yaml's usage.dir
    assert manifest["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}


def test_the_local_graph_gets_a_usage_dir_and_ray_auth_can_be_off():
    manifest = manifest_for(LOCAL_YAML, ray_auth="disabled", usage_claim="usage-rwx")
    assert schema_errors(manifest) == []
    assert manifest["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "disabled"}
    for container in containers(manifest):
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["RAY_AUTH_MODE"] == "disabled" and env["SERVEGRAPH_USAGE_DIR"] == K8S_USAGE_DIR
    volumes = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"name": "usage", "persistentVolumeClaim": {"claimName": "usage-rwx"}} in volumes


def test_the_cli_writes_the_manifest_to_a_file(tmp_path, capsys):
    output = tmp_path / "rayservice.yaml"
    argv = ["k8s", str(GPU_YAML), "--cluster", str(CLUSTER), "--output", str(output), "--name", "llm-prod",
            "--namespace", "serving", "--image", "registry.example/servegraph:1.0"]  # fmt: skip
    assert servegraph(argv) == 0
    assert capsys.readouterr().out == ""
    manifest = yaml.safe_load(output.read_text())
    assert schema_errors(manifest) == []
    assert manifest["metadata"]["name"] == "llm-prod" and manifest["metadata"]["namespace"] == "serving"
    assert {c["image"] for c in containers(manifest)} == {"registry.example/servegraph:1.0"}


def test_the_cli_writes_to_stdout_and_notes_what_the_manifest_cannot_provide(capsys):
    assert servegraph(["k8s", str(LOCAL_YAML)]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["kind"] == "RayService"
    assert "--image" in captured.err and "--usage-claim" in captured.err


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--name", "Bad_Name"], "DNS-1035 label"), (["--cluster", "/nonexistent/cluster.yaml"], "cluster-launcher file")],
)
def test_the_cli_refuses_what_it_cannot_write(tmp_path, capsys, extra, message):
    output = tmp_path / "rayservice.yaml"
    assert servegraph(["k8s", str(GPU_YAML), "--output", str(output), *extra]) == 2
    assert message in capsys.readouterr().err and not output.exists()
