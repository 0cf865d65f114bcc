"""GPU placement: memory budgets per engine, Ray resources per replica, and a plan that must fit.

Ray's fractional `num_gpus` is bookkeeping only: two vLLM engines on one GPU would each claim
90 % of its memory. Here a model's `gpu_fraction` is both its Ray share and its vLLM memory
budget, and a plan checks fractions and memory per GPU before anything is deployed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servegraph.models.spec import ModelShape, ModelSpec

GIB = 2**30
MEMORY_HEADROOM = 0.08  # of each engine's share: CUDA context, activations, allocator fragmentation
REPLICA_CPUS = 0.5
ACCELERATOR_HINT = 0.001  # Ray's idiom to pin a bundle to a GPU type without consuming it
DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}
KNOWN_GPU_MEMORY_GIB = {
    "T4": 16,
    "L4": 24,
    "A10G": 24,
    "L40S": 48,
    "A100-40G": 40,
    "A100-80G": 80,
    "H100": 80,
    "H200": 141,
}


class PlacementError(ValueError):
    """The models do not fit; the message names the model, the GPU and the numbers."""


def kv_cache_bytes(spec: ModelSpec, num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """KV cache for max_num_seqs sequences at max_model_len: keys and values per layer."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes * spec.max_model_len * spec.max_num_seqs


def gpu_memory_utilization(spec: ModelSpec) -> float:
    """vLLM's share of each GPU the engine uses: its Ray fraction minus headroom."""
    return round(spec.gpu_fraction * (1 - MEMORY_HEADROOM), 4)


def accelerator_resource(accelerator_type: str) -> str:
    return f"accelerator_type:{accelerator_type}"


def worker_bundles(spec: ModelSpec) -> list[dict[str, float]]:
    """One bundle per engine worker (TP x PP), each with its GPU share; the replica actor joins bundle 0."""
    bundle: dict[str, float] = {"GPU": spec.gpu_fraction}
    if spec.accelerator_type:
        bundle[accelerator_resource(spec.accelerator_type)] = ACCELERATOR_HINT
    bundles = [dict(bundle) for _ in range(spec.num_workers)]
    bundles[0]["CPU"] = REPLICA_CPUS
    return bundles


def engine_deployment_options(spec: ModelSpec, accelerator: str) -> dict[str, Any]:
    """Serve options for a model's engine deployment: Ray resources that match vLLM's layout."""
    if accelerator == "cpu":
        return {"ray_actor_options": {"num_cpus": REPLICA_CPUS}}
    if spec.num_workers == 1:
        resources = {accelerator_resource(spec.accelerator_type): ACCELERATOR_HINT} if spec.accelerator_type else {}
        return {"ray_actor_options": {"num_cpus": REPLICA_CPUS, "num_gpus": spec.gpu_fraction, "resources": resources}}
    # The replica holds no GPU itself: vLLM's Ray executor puts one worker in each bundle.
    return {
        "ray_actor_options": {"num_cpus": 0},
        "placement_group_bundles": worker_bundles(spec),
        "placement_group_strategy": spec.placement_strategy,
    }


def shape_from_hf_config(config: dict[str, Any]) -> ModelShape:
    """Parameter count and KV layout of a decoder-only transformer from its config.json."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    intermediate = config.get("intermediate_size", 4 * hidden)
    vocab = config["vocab_size"]
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return ModelShape(
        num_parameters=layers * (attention + mlp + 2 * hidden) + embeddings,
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
    )


def model_shape(spec: ModelSpec, model_dir: Path | None = None) -> ModelShape:
    """The spec's own shape, else the one read from its local config.json."""
    if spec.shape is not None:
        return spec.shape
    if spec.build is not None:
        recipe = spec.build
        return shape_from_hf_config(
            {"hidden_size": recipe.hidden_size, "num_hidden_layers": recipe.num_layers,
             "num_attention_heads": recipe.num_heads, "head_dim": recipe.head_dim,
             "intermediate_size": recipe.intermediate_size, "vocab_size": recipe.vocab_size}
        )  # fmt: skip
    if model_dir is None and spec.path is not None:
        model_dir = Path(spec.path)
    if model_dir is None or not (model_dir / "config.json").exists():
        raise PlacementError(
            f"model {spec.name!r}: its size is unknown here; give `shape` (num_parameters, num_layers, "
            "num_kv_heads, head_dim) in its spec or a local `path` with config.json"
        )
    return shape_from_hf_config(json.loads((model_dir / "config.json").read_text()))


@dataclass(frozen=True)
class EngineMemory:
    """What one engine worker holds on its GPU: its slice of the weights and of the KV cache."""

    weights_bytes: int
    kv_cache_bytes: int

    @property
    def total_gib(self) -> float:
        return (self.weights_bytes + self.kv_cache_bytes) / GIB

    @classmethod
    def of(cls, spec: ModelSpec, shape: ModelShape) -> EngineMemory:
        dtype_bytes = DTYPE_BYTES[spec.dtype]
        kv = kv_cache_bytes(spec, shape.num_layers, shape.num_kv_heads, shape.head_dim, dtype_bytes)
        return cls(shape.num_parameters * dtype_bytes // spec.num_workers, kv // spec.num_workers)


def check_memory(spec: ModelSpec, memory: EngineMemory, gpu_type: str, gpu_memory_gib: float) -> None:
    available = gpu_memory_gib * gpu_memory_utilization(spec)
    if memory.total_gib > available:
        raise PlacementError(
            f"model {spec.name!r} does not fit on {gpu_type} ({gpu_memory_gib:g} GiB): each of its "
            f"{spec.num_workers} engine worker(s) needs {memory.total_gib:.1f} GiB (weights "
            f"{memory.weights_bytes / GIB:.1f} + KV cache {memory.kv_cache_bytes / GIB:.1f} for "
            f"{spec.max_num_seqs} x {spec.max_model_len} tokens) but gpu_fraction {spec.gpu_fraction:g} leaves "
            f"{available:.1f} GiB; raise gpu_fraction, tensor/pipeline parallelism, or lower max_num_seqs/max_model_len"
        )


@dataclass(frozen=True)
class NodeType:
    """A kind of machine: how many GPUs of which type, and how many of it the cluster may have."""

    name: str
    gpus: int
    gpu_type: str | None
    count: int
    gpu_memory_gib: float | None = None

    @property
    def memory_gib(self) -> float | None:
        if self.gpu_memory_gib is not None:
            return self.gpu_memory_gib
        return KNOWN_GPU_MEMORY_GIB.get(self.gpu_type or "")


@dataclass
class Gpu:
    node_type: NodeType
    node_index: int
    gpu_index: int
    free: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.node_type.name}[{self.node_index}] gpu{self.gpu_index}"


@dataclass(frozen=True)
class Assignment:
    model: str
    replica: int
    worker: int
    gpu: str
    gpu_type: str
    fraction: float
    needed_gib: float
    share_gib: float | None


@dataclass
class Plan:
    assignments: list[Assignment] = field(default_factory=list)
    gpus: list[Gpu] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        rows = [["model", "replica", "worker", "GPU", "type", "fraction", "needs GiB", "share GiB"]]
        for a in self.assignments:
            share = f"{a.share_gib:.1f}" if a.share_gib is not None else "?"
            rows.append([a.model, str(a.replica), str(a.worker), a.gpu, a.gpu_type, f"{a.fraction:g}",
                         f"{a.needed_gib:.1f}", share])  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        used = [g for g in self.gpus if g.free < 1]
        whole_free = sum(1 for g in self.gpus if g.free == 1)
        partial = ", ".join(f"{g.label} {g.free:g}" for g in used if g.free > 0) or "none"
        lines.append(f"GPUs used: {len(used)}; whole GPUs left: {whole_free}; partly free: {partial}")
        return "\n".join(lines + self.notes)


def expand(node_types: list[NodeType]) -> list[Gpu]:
    return [
        Gpu(node_type, node, gpu)
        for node_type in node_types
        for node in range(node_type.count)
        for gpu in range(node_type.gpus)
    ]


def _candidates(spec: ModelSpec, gpus: list[Gpu]) -> list[Gpu]:
    return [
        g
        for g in gpus
        if g.free + 1e-9 >= spec.gpu_fraction and (spec.accelerator_type in (None, g.node_type.gpu_type))
    ]


def _place_replica(spec: ModelSpec, gpus: list[Gpu]) -> list[Gpu] | None:
    """GPUs for each worker of one replica, honouring the spec's placement strategy, or None."""
    chosen: list[Gpu] = []
    spread = spec.placement_strategy in ("SPREAD", "STRICT_SPREAD")
    for _ in range(spec.num_workers):
        nodes_used = {(g.node_type.name, g.node_index) for g in chosen}
        options = [g for g in _candidates(spec, gpus) if g not in chosen]
        if spec.placement_strategy == "STRICT_SPREAD":
            options = [g for g in options if (g.node_type.name, g.node_index) not in nodes_used]
        if spec.placement_strategy == "STRICT_PACK" and chosen:
            options = [g for g in options if (g.node_type.name, g.node_index) in nodes_used]
        if not options:
            return None
        # Pack: prefer nodes already used, then the fullest GPU. Spread: prefer new nodes.
        options.sort(key=lambda g: (((g.node_type.name, g.node_index) in nodes_used) == spread, g.free))
        chosen.append(options[0])
    return chosen


def plan_placement(models: list[tuple[ModelSpec, int]], node_types: list[NodeType]) -> Plan:
    """Place every replica's workers on GPUs, biggest first; PlacementError when something does not fit.

    models pairs each spec with its replica count (the most it may scale to).
    """
    plan = Plan(gpus=expand(node_types))
    order = sorted(models, key=lambda m: -m[0].gpu_fraction * m[0].num_workers)
    for spec, replicas in order:
        memory = EngineMemory.of(spec, model_shape(spec))
        types = {g.node_type for g in plan.gpus if spec.accelerator_type in (None, g.node_type.gpu_type)}
        if not types:
            raise PlacementError(f"model {spec.name!r} asks for GPU type {spec.accelerator_type}; the cluster has none")
        if spec.accelerator_type is not None:
            for node_type in types:
                if node_type.memory_gib is not None:
                    check_memory(spec, memory, spec.accelerator_type, node_type.memory_gib)
        for replica in range(replicas):
            chosen = _place_replica(spec, plan.gpus)
            if chosen is None:
                free = ", ".join(f"{g.label} {g.free:g}" for g in plan.gpus if g.free > 0) or "none"
                raise PlacementError(
                    f"model {spec.name!r} replica {replica}: no room for {spec.num_workers} worker(s) of "
                    f"{spec.gpu_fraction:g} {spec.accelerator_type or 'GPU'} ({spec.placement_strategy}); "
                    f"free GPU fractions: {free}"
                )
            for worker, gpu in enumerate(chosen):
                memory_gib = gpu.node_type.memory_gib
                if memory_gib is not None:
                    check_memory(spec, memory, gpu.node_type.gpu_type or "GPU", memory_gib)
                gpu.free = round(gpu.free - spec.gpu_fraction, 6)
                share = memory_gib * gpu_memory_utilization(spec) if memory_gib is not None else None
                plan.assignments.append(
                    Assignment(
                        spec.name,
                        replica,
                        worker,
                        gpu.label,
                        gpu.node_type.gpu_type or "?",
                        spec.gpu_fraction,
                        memory.total_gib,
                        share,
                    )  # fmt: skip
                )
    if any(g.node_type.memory_gib is None for g in plan.gpus):
        plan.notes.append("memory not checked on GPUs of unknown type (pass their memory to check it)")
    return plan
