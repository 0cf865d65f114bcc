"""`servegraph k8s CONFIG`: a KubeRay `RayService` manifest that runs a graph config on Kubernetes.

Teams on Kubernetes run Ray Serve through KubeRay's RayService, not `ray up`. The manifest carries
what `cluster.yaml` and `ray up` provide on VMs: the Serve config itself (`serveConfigV2`), a head
group (Ray, Serve's controller and proxy, and for GPU graphs the light stages, as cluster.yaml's
head), and worker groups for the engines, sized by the same placement plan as `servegraph plan`
(GPU graphs) or by Ray's CPU shares (CPU graphs). Pods get the environment the graph reads:
Serve's fast-path switches (as cluster.yaml's `ray start`), the tenants' API keys from a Secret,
`SERVEGRAPH_USAGE_DIR` on a volume every pod mounts.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from servegraph.graphs.cli import ConfigError, ConfigFile, engine_replicas, read_config, validate_config
from servegraph.models.config import AdminAppArgs, AuthConfig, LLMAppArgs
from servegraph.models.placement import REPLICA_CPUS, PlacementError, accelerator_resource, plan_placement
from servegraph.models.spec import ModelSpec

RAY_VERSION = importlib.metadata.version("ray")
PYTHON_TAG = "py311"
# Official images of the same Ray release: ray-llm (CUDA, vLLM) for GPU graphs, ray's CPU build otherwise.
# Either is a base: the graph's own code (the servegraph package) must be installed on top (see README).
DEFAULT_GPU_IMAGE = f"rayproject/ray-llm:{RAY_VERSION}-{PYTHON_TAG}-cu128"
DEFAULT_CPU_IMAGE = f"rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}-cpu"

GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, METRICS_PORT = 6379, 8265, 10001, 8080
# Where usage records go when an application names no usage.dir: a path every pod mounts.
K8S_USAGE_DIR = "/mnt/shared/servegraph/usage"
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}  # as cluster.yaml: Serve's HAProxy mode on every node
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"  # set by every cloud's kubelet
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# A pod asking for a node's whole CPU never schedules: kubelet, the runtime and daemonsets (the NVIDIA
# device plugin among them) take part of every node.
NODE_CPU_HEADROOM = 1
DEFAULT_IDLE_TIMEOUT_S = 600
# KubeRay appends 6 characters for the RayCluster and "-serve-svc" for the service: 63 - 10 - 6.
MAX_NAME_LENGTH = 47
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class ManifestOptions:
    """What the command line decides beyond the graph config."""

    name: str
    namespace: str | None = None
    image: str | None = None
    cluster: dict[str, Any] | None = None  # the cluster-launcher file's content: GPU node types
    gpu_memory: dict[str, float] | None = None
    secret: str = "servegraph-secrets"
    usage_claim: str | None = None
    ray_auth: Literal["token", "disabled"] = "token"
    memory_per_cpu_gib: int = 4
    head_cpus: int | None = None
    cpu_worker_cpus: int = 4
    instance_selector: bool = True


@dataclass(frozen=True)
class WorkerGroup:
    """One kind of worker pod and how many of it the graph needs: at first, at least, at most."""

    name: str
    cpus: int
    gpus: int
    replicas: int
    min_replicas: int
    max_replicas: int
    accelerator_type: str | None = None
    instance_type: str | None = None


@dataclass(frozen=True)
class ReplicaBounds:
    minimum: int
    initial: int
    maximum: int

    @property
    def autoscales(self) -> bool:
        return self.minimum != self.maximum


def engine_bounds(app_config: dict[str, Any], spec: ModelSpec) -> ReplicaBounds:
    """An engine's replica counts as Serve will run them: the config's override wins over the model's own."""
    override = next((d for d in app_config.get("deployments", []) if d.get("name") == spec.engine_deployment_name), {})
    maximum = engine_replicas(app_config, spec)
    autoscaling = override.get("autoscaling_config")
    if autoscaling:
        minimum = int(autoscaling.get("min_replicas", 1))
        initial = autoscaling.get("initial_replicas")
        return ReplicaBounds(minimum, int(initial if initial is not None else minimum), maximum)
    if override.get("num_replicas") is not None:
        return ReplicaBounds(maximum, maximum, maximum)
    scaling = spec.autoscaling
    initial = scaling.initial_replicas if scaling.initial_replicas is not None else scaling.min_replicas
    return ReplicaBounds(scaling.min_replicas, initial, maximum)


def engines(config: ConfigFile, accelerator: str) -> Iterator[tuple[ModelSpec, ReplicaBounds]]:
    for app_config, args in config.llm_apps():
        if args.accelerator == accelerator:
            yield from ((spec, engine_bounds(app_config, spec)) for spec in args.models)


def gpu_nodes_used(models: list[tuple[ModelSpec, int]], node_types) -> Counter[str]:
    """Nodes of each type the placement plan fills with these replica counts; PlacementError if they do not fit."""
    plan = plan_placement([(spec, count) for spec, count in models if count > 0], node_types)
    return Counter(name for name, _ in {(gpu.node_type.name, gpu.node_index) for gpu in plan.gpus if gpu.free < 1})


def pod_cpus(node_cpus: float) -> int:
    return max(1, int(node_cpus) - NODE_CPU_HEADROOM)


def gpu_worker_groups(config: ConfigFile, options: ManifestOptions) -> list[WorkerGroup]:
    """A group per GPU node type the plan uses, sized by the plan at the engines' min, initial and max replicas.

    All GPU applications of the config share the cluster, so they are planned together.
    """
    from servegraph.models.cluster import node_types_from_launcher

    models = list(engines(config, "gpu"))
    if not models:
        return []
    if options.cluster is None:
        raise ConfigError(
            "the config has GPU applications: give the cluster-launcher file with its GPU node types (--cluster)"
        )
    node_types = node_types_from_launcher(options.cluster, options.gpu_memory)
    at_min, at_start, at_max = (
        gpu_nodes_used([(spec, getattr(bounds, which)) for spec, bounds in models], node_types)
        for which in ("minimum", "initial", "maximum")
    )
    described = options.cluster["available_node_types"]
    groups = []
    for node_type in node_types:
        if not at_max[node_type.name]:
            continue
        launcher_type = described[node_type.name]
        instance_type = launcher_type.get("node_config", {}).get("InstanceType")
        groups.append(
            WorkerGroup(
                name=node_type.name,
                cpus=pod_cpus(launcher_type.get("resources", {}).get("CPU", 8)),
                gpus=node_type.gpus,
                replicas=at_start[node_type.name],
                min_replicas=at_min[node_type.name],
                max_replicas=at_max[node_type.name],
                accelerator_type=node_type.gpu_type,
                instance_type=instance_type if options.instance_selector else None,
            )
        )
    return groups


def light_stage_cpus(config: ConfigFile, which: str) -> float:
    """Ray CPUs of the light stages of the config's CPU applications at their min or max replicas.

    The builder's defaults (autoscale/policy.py); a `deployments:` override of a light stage is not counted.
    """
    from servegraph.autoscale.policy import STAGE_DEFAULTS
    from servegraph.graphs.builder import LIGHT_STAGE_CPUS

    replicas = sum(getattr(scaling, f"{which}_replicas") for scaling in STAGE_DEFAULTS.values())
    apps = sum(1 for _, args in config.llm_apps() if args.accelerator == "cpu")
    return apps * replicas * LIGHT_STAGE_CPUS


def cpu_worker_group(config: ConfigFile, options: ManifestOptions) -> WorkerGroup | None:
    """CPU graphs: pods holding the Ray CPU shares of the engines and light stages, as Ray's scheduler packs them.

    The head of a CPU graph offers Ray no CPU (see head_start_params), so the graph runs here.
    """
    models = list(engines(config, "cpu"))
    if not models:
        return None

    def pods(which: str, stages_at: str) -> int:
        cpus = sum(getattr(bounds, which) * REPLICA_CPUS for _, bounds in models)
        return math.ceil((cpus + light_stage_cpus(config, stages_at)) / options.cpu_worker_cpus)

    sizes = pods("initial", "min"), pods("minimum", "min"), pods("maximum", "max")
    return WorkerGroup("cpu", options.cpu_worker_cpus, 0, *sizes)


def serve_config_for_pods(config: ConfigFile) -> dict[str, Any]:
    """The Serve config as written, but for a loopback HTTP host: KubeRay's serve Service reaches the proxies
    over the pod network, so they listen on every interface (Serve's own default)."""
    serve_config = json.loads(json.dumps(config.raw))  # a deep copy of plain YAML data
    http_options = serve_config.get("http_options") or {}
    if http_options.get("host", "0.0.0.0") not in ("0.0.0.0", "::"):
        http_options["host"] = "0.0.0.0"
    return serve_config


def auth_configs(config: ConfigFile) -> Iterator[AuthConfig]:
    for app_config in config.raw["applications"]:
        args = app_config.get("args") or {}
        if app_config["import_path"].endswith(":build_llm_app"):
            yield LLMAppArgs.model_validate(args).auth
        elif app_config["import_path"].endswith(":build_admin_app"):
            yield AdminAppArgs.model_validate(args).auth


def secret_env_names(config: ConfigFile) -> list[str]:
    """Variables the graph reads secrets from: tenants' keys_env and upstreams' api_key_env."""
    names = [tenant.keys_env for auth in auth_configs(config) for tenant in auth.tenants if tenant.keys_env]
    names += [upstream.api_key_env for _, args in config.llm_apps() for upstream in args.upstreams]
    return sorted({name for name in names if name})


def secret_files(config: ConfigFile) -> list[str]:
    """Files the graph reads secrets from, which the image or a volume must provide."""
    files = [tenant.keys_file for auth in auth_configs(config) for tenant in auth.tenants if tenant.keys_file]
    files += [auth.jwt.jwks_file for auth in auth_configs(config) if auth.jwt and auth.jwt.jwks_file]
    return sorted(set(files))


def usage_dirs(config: ConfigFile) -> list[str]:
    return sorted({args.usage.dir or K8S_USAGE_DIR for _, args in config.llm_apps()})


def uses_hub_models(config: ConfigFile) -> bool:
    return any(spec.hub_id for _, args in config.llm_apps() for spec in args.models)


def pod_env(config: ConfigFile, options: ManifestOptions) -> list[dict[str, Any]]:
    """Environment of every Ray container: Serve reads its switches at import, on every node (see cluster.yaml)."""
    from servegraph.graphs.local_cluster import SERVE_ENV

    plain = SERVE_ENV | HAPROXY_ENV
    if options.ray_auth == "disabled":
        plain = plain | {"RAY_AUTH_MODE": "disabled"}  # Ray 2.60 may turn token auth on by itself
    if any(not args.usage.dir for _, args in config.llm_apps()):
        plain = plain | {"SERVEGRAPH_USAGE_DIR": K8S_USAGE_DIR}
    env: list[dict[str, Any]] = [{"name": name, "value": value} for name, value in plain.items()]
    # Not optional: a missing key stops the pod with an error naming it, as cluster.yaml's start does.
    env += [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": options.secret, "key": name}}}
        for name in secret_env_names(config)
    ]
    if uses_hub_models(config):
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": options.secret, "key": "HF_TOKEN", "optional": True}},
            }
        )
    return env


def volumes(config: ConfigFile, options: ManifestOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pod volumes and their mounts: shared memory for Ray's object store and NCCL, and the usage directory."""
    usage_source = (
        {"persistentVolumeClaim": {"claimName": options.usage_claim}} if options.usage_claim else {"emptyDir": {}}
    )
    pod_volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}, {"name": "usage", **usage_source}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    mounts += [
        {"name": "usage", "mountPath": path, "subPath": f"usage-{i}"} for i, path in enumerate(usage_dirs(config))
    ]
    return pod_volumes, mounts


def resources(cpus: int, memory_gib: int, gpus: int = 0) -> dict[str, dict[str, str]]:
    """Requests equal to limits (Guaranteed QoS): Ray sizes itself from the limits, and vLLM must not be evicted."""
    amounts = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def ports(names: dict[str, int]) -> list[dict[str, Any]]:
    return [{"name": name, "containerPort": port, "protocol": "TCP"} for name, port in names.items()]


@dataclass(frozen=True)
class PodShape:
    """What the head and worker pods of one manifest have in common."""

    image: str
    env: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    mounts: list[dict[str, Any]]


def pod_template(shape: PodShape, container: dict[str, Any], group: WorkerGroup | None = None) -> dict[str, Any]:
    container = {
        "name": container["name"],
        "image": shape.image,
        "imagePullPolicy": "IfNotPresent",
        "env": copy.deepcopy(shape.env),  # each pod its own: an edit to one group's must not reach another's
        "volumeMounts": copy.deepcopy(shape.mounts),
        **container,
    }
    spec: dict[str, Any] = {"containers": [container], "volumes": copy.deepcopy(shape.volumes)}
    if group is not None and group.gpus:
        spec["tolerations"] = [GPU_TOLERATION]
    if group is not None and group.instance_type:
        spec["nodeSelector"] = {INSTANCE_TYPE_LABEL: group.instance_type}
    return {"spec": spec}


def worker_group_spec(
    group: WorkerGroup, shape: PodShape, options: ManifestOptions, serve_port: int | None
) -> dict[str, Any]:
    named_ports = {"metrics": METRICS_PORT} | ({"serve": serve_port} if serve_port else {})
    container = {
        "name": "ray-worker",
        "resources": resources(group.cpus, group.cpus * options.memory_per_cpu_gib, group.gpus),
        "ports": ports(named_ports),
    }
    spec: dict[str, Any] = {
        "groupName": group.name,
        "replicas": group.replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": {},
        "template": pod_template(shape, container, group),
    }
    if group.accelerator_type:
        # Ray's autoscaler learns a group's GPU type from here before any pod of it exists (scale from zero).
        spec["resources"] = {accelerator_resource(group.accelerator_type): "1"}
    return spec


def gpu_graph(config: ConfigFile) -> bool:
    return any(True for _ in engines(config, "gpu"))


def head_start_params(config: ConfigFile) -> dict[str, str]:
    """As cluster.yaml, a GPU graph's head runs the light stages; a CPU graph's head runs only Ray and Serve's
    controller and proxy (`num-cpus` 0), so the engines go to the CPU group rather than crowd the head."""
    params = {"dashboard-host": "0.0.0.0"}
    return params if gpu_graph(config) else params | {"num-cpus": "0"}


def head_cpus(config: ConfigFile, options: ManifestOptions) -> int:
    """A GPU graph's head is cluster.yaml's head node less the kubelet's share; a CPU graph's runs no stage: 2 CPUs."""
    if options.head_cpus is not None:
        return options.head_cpus
    cluster = options.cluster
    if cluster is not None and gpu_graph(config):
        head_type = cluster["available_node_types"][cluster["head_node_type"]]
        return pod_cpus(head_type.get("resources", {}).get("CPU", 8))
    return 2


def default_image(config: ConfigFile) -> str:
    return DEFAULT_GPU_IMAGE if gpu_graph(config) else DEFAULT_CPU_IMAGE


def build_manifest(config: ConfigFile, options: ManifestOptions) -> dict[str, Any]:
    """The RayService for a graph config; ConfigError or PlacementError when it cannot be planned."""
    groups = gpu_worker_groups(config, options)
    if (cpu_group := cpu_worker_group(config, options)) is not None:
        groups.append(cpu_group)
    pod_volumes, mounts = volumes(config, options)
    shape = PodShape(options.image or default_image(config), pod_env(config, options), pod_volumes, mounts)
    serve_port = config.schema.http_options.port
    proxy_everywhere = config.schema.proxy_location == "EveryNode"  # else no proxy on the workers
    cpus = head_cpus(config, options)
    head_container = {
        "name": "ray-head",
        "resources": resources(cpus, cpus * options.memory_per_cpu_gib),
        "ports": ports(
            {
                "gcs-server": GCS_PORT,
                "dashboard": DASHBOARD_PORT,
                "client": CLIENT_PORT,
                "serve": serve_port,
                "metrics": METRICS_PORT,
            }
        ),
    }
    cluster_spec: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": options.ray_auth},
        "headGroupSpec": {
            "rayStartParams": head_start_params(config),
            "template": pod_template(shape, head_container),
        },
        "workerGroupSpecs": [
            worker_group_spec(group, shape, options, serve_port if proxy_everywhere else None) for group in groups
        ],
    }
    if any(bounds.autoscales for accelerator in ("gpu", "cpu") for _, bounds in engines(config, accelerator)):
        idle_minutes = (options.cluster or {}).get("idle_timeout_minutes")
        cluster_spec["enableInTreeAutoscaling"] = True
        cluster_spec["autoscalerOptions"] = {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": int(idle_minutes * 60) if idle_minutes else DEFAULT_IDLE_TIMEOUT_S,
        }
    metadata: dict[str, Any] = {
        "name": options.name,
        "labels": {"app.kubernetes.io/name": "servegraph", "app.kubernetes.io/instance": options.name},
    }
    if options.namespace:
        metadata["namespace"] = options.namespace
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            "serveConfigV2": LiteralText(dump_yaml(serve_config_for_pods(config))),
            "rayClusterConfig": cluster_spec,
        },
    }


def notes_for(config: ConfigFile, options: ManifestOptions) -> list[str]:
    """What the manifest cannot provide by itself, for the person applying it."""
    notes = []
    if options.image is None:
        notes.append(
            f"image {default_image(config)} is the official Ray base: build one with the servegraph package "
            "installed and pass it with --image (README, Kubernetes)"
        )
    if options.usage_claim is None:
        notes.append(
            "usage records go to an emptyDir in each pod and leave with it: pass --usage-claim with a "
            "ReadWriteMany PersistentVolumeClaim to share them across pods"
        )
    if names := secret_env_names(config):
        notes.append(f"Secret {options.secret!r} must hold the keys {', '.join(names)}")
    if files := secret_files(config):
        notes.append(f"the graph reads {', '.join(files)}: put them in the image or mount them")
    return notes


class LiteralText(str):
    """A string written as a YAML literal block, so the embedded Serve config reads as YAML."""


class _ManifestDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # every value spelled out: anchors shared by two places would surprise whoever edits one


def _literal(dumper: yaml.SafeDumper, text: LiteralText) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(text), style="|")


_ManifestDumper.add_representer(LiteralText, _literal)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_ManifestDumper, sort_keys=False, default_flow_style=False, width=120)


def default_name(config_path: Path) -> str:
    """`servegraph-<config stem>` as a DNS-1035 label that KubeRay accepts."""
    stem = re.sub(r"[^a-z0-9]+", "-", config_path.stem.lower()).strip("-")
    return f"servegraph-{stem}"[:MAX_NAME_LENGTH].rstrip("-")


def check_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not DNS_1035_LABEL.fullmatch(name):
        raise ConfigError(
            f"--name {name!r}: KubeRay takes a DNS-1035 label of at most {MAX_NAME_LENGTH} characters "
            "(lowercase letters, digits and '-', starting with a letter)"
        )
    return name


def add_command(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser("k8s", help="write a KubeRay RayService manifest for a graph config")
    command.add_argument("config", type=Path)
    command.add_argument("--output", "-o", type=Path, help="write here instead of stdout")
    command.add_argument("--name", help="the RayService's name (default servegraph-<config name>)")
    command.add_argument("--namespace", help="the RayService's namespace (default: kubectl's)")
    command.add_argument("--image", help="container image with servegraph installed (default: the official Ray base)")
    command.add_argument(
        "--cluster", type=Path, default=Path("cluster.yaml"), help="cluster-launcher file: GPU node types"
    )
    command.add_argument("--gpu-memory", action="append", default=[], metavar="TYPE=GIB", help="memory of a GPU type")
    command.add_argument(
        "--secret", default="servegraph-secrets", help="Secret with the API keys' variables (and HF_TOKEN)"
    )
    command.add_argument("--usage-claim", help="ReadWriteMany PersistentVolumeClaim for the usage directory")
    command.add_argument(
        "--ray-auth", choices=["token", "disabled"], default="token", help="Ray's own token auth (KubeRay authOptions)"
    )
    command.add_argument("--memory-per-cpu", type=int, default=4, metavar="GIB", help="pod memory per CPU")
    command.add_argument("--head-cpus", type=int, help="head pod CPUs (default: cluster.yaml's head, 2 for CPU graphs)")
    command.add_argument("--cpu-worker-cpus", type=int, default=4, help="CPUs of each CPU-engine worker pod")
    command.add_argument("--no-instance-selector", dest="instance_selector", action="store_false",
                         help=f"leave out the {INSTANCE_TYPE_LABEL} node selector of GPU groups")  # fmt: skip
    command.set_defaults(handler=run)


def options_from(args: argparse.Namespace) -> ManifestOptions:
    from servegraph.models.cluster import load_launcher_config

    gpu_memory = {gpu: float(gib) for gpu, gib in (item.split("=", 1) for item in args.gpu_memory)}
    return ManifestOptions(
        name=check_name(args.name) if args.name else default_name(args.config),
        namespace=args.namespace,
        image=args.image,
        cluster=load_launcher_config(args.cluster) if args.cluster.exists() else None,
        gpu_memory=gpu_memory,
        secret=args.secret,
        usage_claim=args.usage_claim,
        ray_auth=args.ray_auth,
        memory_per_cpu_gib=args.memory_per_cpu,
        head_cpus=args.head_cpus,
        cpu_worker_cpus=args.cpu_worker_cpus,
        instance_selector=args.instance_selector,
    )


def run(args: argparse.Namespace) -> int:
    """Validate the config as `servegraph validate` does, plan it, write the manifest; 2 with the reason if not."""
    try:
        config = read_config(args.config)
        validate_config(config)
        options = options_from(args)
        manifest = dump_yaml(build_manifest(config, options))
        if args.output:
            args.output.write_text(manifest)
        else:
            sys.stdout.write(manifest)
    except (ConfigError, PlacementError, OSError) as exc:
        print(f"servegraph: {exc}", file=sys.stderr)
        return 2
    for note in notes_for(config, options):
        print(f"servegraph k8s: {note}", file=sys.stderr)
    return 0
