"""GPU placement: memory budgets per engine, Ray resources per replica, and a plan that must fit.

Ray's fractional `num_gpus` is bookkeeping only: two vLLM engines on one GPU would each claim
90 % of its memory. Here a model's `gpu_fraction` is both its Ray share and its vLLM memory
budget, and a plan checks fractions and memory per GPU before anything is deployed.

Ray schedules by fraction alone and knows nothing of memory, so what it is asked for must be
schedulable as written: vLLM's Ray executor starts each worker with `VLLM_RAY_PER_WORKER_GPUS`
GPUs (1 by default) inside its bundle, and Ray puts fractional bundles of one placement group
on the same GPU of a node when they fit there (two ranks on one GPU, which NCCL refuses).
"""

from __future__ import annotations

import json
import math
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


PER_WORKER_GPUS_ENV = "VLLM_RAY_PER_WORKER_GPUS"  # read by vLLM's Ray executors (vllm/envs.py)


def check_schedulable(spec: ModelSpec) -> None:
    """Refuse a multi-worker replica with fractional GPUs whose workers could share one GPU.

    Ray packs fractional bundles of one placement group onto the same GPU of a node (measured:
    two 0.5 bundles, PACK, on a two-GPU node both got GPU 0), and vLLM's tensor and pipeline
    ranks cannot share a device. Only STRICT_SPREAD, one worker per node, keeps them apart.
    """
    if spec.num_workers > 1 and spec.gpu_fraction < 1 and spec.placement_strategy != "STRICT_SPREAD":
        raise PlacementError(
            f"model {spec.name!r}: {spec.num_workers} engine workers at gpu_fraction {spec.gpu_fraction:g} "
            f"with placement_strategy {spec.placement_strategy} may land on one GPU (Ray packs fractional "
            "bundles onto the same device; vLLM's ranks cannot share one); use gpu_fraction 1 or STRICT_SPREAD"
        )


def worker_env(spec: ModelSpec) -> dict[str, str]:
    """Environment of a multi-worker replica, for vLLM's Ray executor in its engine process.

    VLLM_RAY_PER_WORKER_GPUS is what each worker actor asks of its bundle: left at vLLM's
    default of 1, a worker cannot be placed in a fractional bundle at all (Ray refuses it).
    VLLM_RAY_BUNDLE_INDICES stays unset on purpose: without it vLLM takes every GPU bundle and
    orders ranks by node, driver's node first, so a tensor-parallel group stays on one node;
    explicit indices would follow bundle order, which Ray's PACK may split across nodes.
    """
    return {PER_WORKER_GPUS_ENV: str(spec.gpu_fraction)}


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
    check_schedulable(spec)
    return {
        "ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": worker_env(spec)}},
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
    """One GPU of the plan: the Ray share and the memory not yet promised to an engine worker."""

    node_type: NodeType
    node_index: int
    gpu_index: int
    free: float = 1.0
    free_gib: float | None = None  # None: a GPU type of unknown memory, placed by fraction alone

    @property
    def label(self) -> str:
        return f"{self.node_type.name}[{self.node_index}] gpu{self.gpu_index}"

    def describe_free(self) -> str:
        memory = f" ({self.free_gib:.1f} GiB)" if self.free_gib is not None else ""
        return f"{self.label} {self.free:g}{memory}"

    def share_gib(self, spec: ModelSpec) -> float | None:
        """What vLLM may fill on this GPU: the spec's gpu_memory_utilization of its memory."""
        memory = self.node_type.memory_gib
        return memory * gpu_memory_utilization(spec) if memory is not None else None

    def has_room(self, spec: ModelSpec) -> bool:
        """Ray's share is free here, and so is the memory a worker takes (vLLM fills its whole share)."""
        if self.free + 1e-9 < spec.gpu_fraction or spec.accelerator_type not in (None, self.node_type.gpu_type):
            return False
        memory = self.node_type.memory_gib
        return self.free_gib is None or memory is None or self.free_gib + 1e-6 >= memory * spec.gpu_fraction

    def take(self, spec: ModelSpec) -> None:
        self.free = round(self.free - spec.gpu_fraction, 6)
        if self.free_gib is not None and self.node_type.memory_gib is not None:
            self.free_gib = round(self.free_gib - self.node_type.memory_gib * spec.gpu_fraction, 6)


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
        partial = ", ".join(g.describe_free() for g in used if g.free > 0) or "none"
        lines.append(f"GPUs used: {len(used)}; whole GPUs left: {whole_free}; partly free: {partial}")
        return "\n".join(lines + self.notes)


def expand(node_types: list[NodeType]) -> list[Gpu]:
    return [
        Gpu(node_type, node, gpu, free_gib=node_type.memory_gib)
        for node_type in node_types
        for node in range(node_type.count)
        for gpu in range(node_type.gpus)
    ]


def _gpu_types(spec: ModelSpec, gpus: list[Gpu]) -> list[NodeType]:
    """The node types Ray may put the spec's workers on: those of its accelerator_type, else all."""
    types = {g.node_type.name: g.node_type for g in gpus if spec.accelerator_type in (None, g.node_type.gpu_type)}
    if not types:
        raise PlacementError(f"model {spec.name!r} asks for GPU type {spec.accelerator_type}; the cluster has none")
    return list(types.values())


def check_fits_every_type(spec: ModelSpec, memory: EngineMemory, types: list[NodeType]) -> None:
    """Refuse a model whose worker fits its budget on some GPU types Ray may choose but not others.

    Ray places by GPU fraction only: the plan may pick the GPU with room, Ray need not. A model
    that fits only the larger GPUs must be pinned to them with accelerator_type.
    """
    budget = gpu_memory_utilization(spec)
    too_small = [t for t in types if t.memory_gib is not None and memory.total_gib > t.memory_gib * budget]
    if not too_small:
        return
    fitting = sorted({t.gpu_type or t.name for t in types if t not in too_small})
    if spec.accelerator_type is not None or not fitting:
        largest = max(too_small, key=lambda t: t.memory_gib or 0)
        check_memory(spec, memory, largest.gpu_type or largest.name, largest.memory_gib or 0)
    small = sorted({t.gpu_type or t.name for t in too_small})
    raise PlacementError(
        f"model {spec.name!r}: each worker needs {memory.total_gib:.1f} GiB, which gpu_fraction "
        f"{spec.gpu_fraction:g} leaves on {', '.join(fitting)} but not on {', '.join(small)}; Ray places by "
        f"GPU fraction only, so set accelerator_type to one of {', '.join(fitting)}"
    )


def _place_replica(spec: ModelSpec, gpus: list[Gpu]) -> list[Gpu] | None:
    """GPUs for each worker of one replica, honouring the spec's placement strategy, or None.

    Among GPUs with room, pack prefers nodes already used, spread new ones; then the GPU with
    the least free memory that still holds the worker (best fit), by fraction where it is unknown.
    """
    chosen: list[Gpu] = []
    spread = spec.placement_strategy in ("SPREAD", "STRICT_SPREAD")
    for _ in range(spec.num_workers):
        nodes_used = {(g.node_type.name, g.node_index) for g in chosen}
        options = [g for g in gpus if g.has_room(spec) and g not in chosen]
        if spec.placement_strategy == "STRICT_SPREAD":
            options = [g for g in options if (g.node_type.name, g.node_index) not in nodes_used]
        if spec.placement_strategy == "STRICT_PACK" and chosen:
            options = [g for g in options if (g.node_type.name, g.node_index) in nodes_used]
        if not options:
            return None
        options.sort(
            key=lambda g: (
                ((g.node_type.name, g.node_index) in nodes_used) == spread,
                g.free_gib if g.free_gib is not None else math.inf,
                g.free,
            )
        )
        chosen.append(options[0])
    return chosen


def _no_room(spec: ModelSpec, replica: int, memory: EngineMemory, gpus: list[Gpu]) -> PlacementError:
    free = ", ".join(g.describe_free() for g in gpus if g.free > 0) or "none"
    return PlacementError(
        f"model {spec.name!r} replica {replica}: no room for {spec.num_workers} worker(s) of "
        f"{spec.gpu_fraction:g} {spec.accelerator_type or 'GPU'} ({spec.placement_strategy}), each needing "
        f"{memory.total_gib:.1f} GiB; free GPU fractions (memory): {free}"
    )


def plan_placement(models: list[tuple[ModelSpec, int]], node_types: list[NodeType]) -> Plan:
    """Place every replica's workers on GPUs with the share and memory free, biggest first.

    models pairs each spec with its replica count (the most it may scale to). PlacementError
    names the model, its memory per worker and every GPU's free share when nothing fits.
    """
    plan = Plan(gpus=expand(node_types))
    order = sorted(models, key=lambda m: -m[0].gpu_fraction * m[0].num_workers)
    for spec, replicas in order:
        check_schedulable(spec)
        memory = EngineMemory.of(spec, model_shape(spec))
        check_fits_every_type(spec, memory, _gpu_types(spec, plan.gpus))
        for replica in range(replicas):
            chosen = _place_replica(spec, plan.gpus)
            if chosen is None:
                raise _no_room(spec, replica, memory, plan.gpus)
            for worker, gpu in enumerate(chosen):
                gpu.take(spec)
                plan.assignments.append(
                    Assignment(spec.name, replica, worker, gpu.label, gpu.node_type.gpu_type or "?",
                               spec.gpu_fraction, memory.total_gib, gpu.share_gib(spec))
                )  # fmt: skip
    if any(g.node_type.memory_gib is None for g in plan.gpus):
        plan.notes.append("memory not checked on GPUs of unknown type (pass their memory to check it)")
    return plan
