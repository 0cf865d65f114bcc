"""Cluster descriptions for placement: the node types of a cluster-launcher file, or a live Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from servegraph.models.placement import NodeType

ACCELERATOR_PREFIX = "accelerator_type:"


def _gpu_type(resources: dict[str, Any]) -> str | None:
    return next((key.removeprefix(ACCELERATOR_PREFIX) for key in resources if key.startswith(ACCELERATOR_PREFIX)), None)


def node_types_from_launcher(config: dict[str, Any], gpu_memory: dict[str, float] | None = None) -> list[NodeType]:
    """Every node type at its max_workers (the head type counts once more), as the autoscaler may grow it."""
    gpu_memory = gpu_memory or {}
    types = []
    for name, node_type in config["available_node_types"].items():
        resources = node_type.get("resources", {})
        count = node_type.get("max_workers", 0) + (1 if name == config["head_node_type"] else 0)
        gpu_type = _gpu_type(resources)
        gpus = int(resources.get("GPU", 0))
        if gpus and count:
            types.append(NodeType(name, gpus, gpu_type, count, gpu_memory.get(gpu_type or "")))
    return types


def load_launcher_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def validate_launcher_config(config: dict[str, Any]) -> None:
    """Check a cluster-launcher config against the ray-schema.json that ships with Ray."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)


def node_types_from_live_cluster(gpu_memory: dict[str, float] | None = None) -> list[NodeType]:
    """The alive nodes of the Ray cluster this process is connected to, one node type each."""
    import ray

    gpu_memory = gpu_memory or {}
    types = []
    for node in ray.nodes():
        resources = node.get("Resources", {})
        if node.get("Alive") and resources.get("GPU", 0) >= 1:
            gpu_type = _gpu_type(resources)
            name = f"node-{node['NodeID'][:8]}"
            types.append(NodeType(name, int(resources["GPU"]), gpu_type, 1, gpu_memory.get(gpu_type or "")))
    return types
