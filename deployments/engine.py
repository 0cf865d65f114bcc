"""Engine stage: one vLLM AsyncLLM per replica; token ids and SamplingParams in, vLLM's RequestOutputs out.

The engine loads the model's tokenizer (structured outputs compile grammars against it, and
it detokenizes output and logprobs as `vllm serve`'s engine does) but never tokenizes a prompt:
prompts arrive as token ids from the tokenizer stage.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from servegraph.deployments.engine_replica import (
    AsyncLLMReplica,
    ReplicaCounters,
    prepare_vllm_environment,
    start_async_llm,
)
from servegraph.deployments.errors import (
    BadRequestError,
    EngineCrashedError,
    EngineUnavailableError,
    ModelNotFoundError,
    OpenAIError,
)
from servegraph.deployments.messages import EngineRequest, LoraAdapter
from servegraph.deployments.quota import OrderedSender
from servegraph.models import cpu_amx
from servegraph.models.build import resolve_adapter_source, resolve_model_source
from servegraph.models.engine_config import (
    cpu_kv_cache_bytes,
    cpu_threads_bind,
    engine_kwargs,
    kv_cache_bytes,
    lora_adapters_per_replica,
)
from servegraph.models.scaling_policy import EngineLoad
from servegraph.models.spec import ModelSpec

logger = logging.getLogger("ray.serve.servegraph.engine")


@dataclass
class EngineCounters(ReplicaCounters):
    """What this replica's engine did, for tests and the admin app."""

    generated_tokens: int = 0


def _cpu_kv_cache_budget(model_source: str, spec: ModelSpec) -> int:
    """On CPU the KV cache is sized explicitly: vLLM's default takes a share of host memory."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_source)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return cpu_kv_cache_bytes(kv_cache_bytes(spec, config.num_hidden_layers, config.num_key_value_heads, head_dim))


# vLLM wraps a worker's failure to load an adapter as "... Worker failed with error '<reason>', please check ..."
WORKER_ERROR = re.compile(r"failed with error '(?P<reason>.*)', please check", re.DOTALL)


def adapter_load_error(adapter: LoraAdapter, exc: BaseException) -> OpenAIError:
    """vLLM's refusal of an adapter as the client's error: 404 when its files are not there, else 400
    (broken weights, a rank above max_lora_rank, modules the model lacks)."""
    match = WORKER_ERROR.search(str(exc))
    reason = match.group("reason") if match else str(exc)
    if "No adapter found" in reason or isinstance(exc, FileNotFoundError):
        message = f"The LoRA adapter `{adapter.name}` was not found: {reason}"
        return ModelNotFoundError(message, param="model", code="adapter_not_found")
    message = f"The LoRA adapter `{adapter.name}` could not be loaded: {reason}"
    return BadRequestError(message, param="model", code="adapter_load_failed")


class LoadedAdapter:
    """What Serve's multiplexing keeps per loaded adapter: vLLM's LoRARequest. Serve calls the
    instance's `__del__` (an async unload) when it evicts the adapter; the class has none, so
    garbage collection never does."""

    def __init__(self, request: Any) -> None:
        self.request = request


class EngineAdapters:
    """The LoRA adapters of one engine replica, loaded on demand through Serve model multiplexing.

    Serve's wrapper keeps the adapters in an LRU (engine_config.lora_adapters_per_replica), reports them to the
    routers (so requests for an adapter prefer replicas holding it) and evicts the least recently
    used, which this removes from vLLM too. Loading is an explicit `add_lora` before any request
    uses the adapter: vLLM refuses a bad adapter there with an error, whereas a bad LoRARequest
    inside a batch kills the engine.
    """

    def __init__(
        self,
        engine: Any,
        spec: ModelSpec,
        cache_dir: Path | None,
        per_replica: int,
        multiplexed: Callable[..., Any] = serve.multiplexed,
        lora_request_type: type | None = None,  # vLLM's LoRARequest unless given (tests)
    ) -> None:
        self._engine = engine
        self._spec = spec
        self._cache_dir = cache_dir
        self._lora_request_type = lora_request_type
        # multiplexed id -> adapter, for the loader (Serve passes it the id only). Never pruned: a request
        # may be waiting to load an entry while another is evicted; it holds a few small entries per adapter.
        self._wanted: dict[str, LoraAdapter] = {}

        async def load(multiplexed_id: str) -> LoadedAdapter:
            return await self._load(multiplexed_id)

        self._multiplexed_load = multiplexed(max_num_models_per_replica=per_replica)(load)

    async def lora_request(self, adapter: LoraAdapter) -> Any:
        """vLLM's LoRARequest for the adapter, loaded into this replica's engine if it was not."""
        self._wanted[adapter.multiplexed_id] = adapter
        return (await self._multiplexed_load(adapter.multiplexed_id)).request

    async def _load(self, multiplexed_id: str) -> LoadedAdapter:
        if self._lora_request_type is None:
            from vllm.lora.request import LoRARequest

            self._lora_request_type = LoRARequest
        adapter = self._wanted[multiplexed_id]
        try:
            path = await asyncio.to_thread(resolve_adapter_source, self._spec, adapter.source, self._cache_dir)
            request = self._lora_request_type(adapter.name, adapter.lora_id, path)
            await self._engine.add_lora(request)
        except Exception as exc:  # vLLM's worker refused it; the engine itself is fine
            logger.warning("LoRA adapter %s failed to load: %s", adapter.name, exc)
            raise adapter_load_error(adapter, exc) from None
        logger.info("LoRA adapter %s loaded (id %d, %s)", adapter.name, adapter.lora_id, path)
        loaded = LoadedAdapter(request)
        loaded.__del__ = functools.partial(self._unload, multiplexed_id, adapter.lora_id)
        return loaded

    async def _unload(self, multiplexed_id: str, lora_id: int) -> None:
        await self._engine.remove_lora(lora_id)
        logger.info("LoRA adapter %s unloaded", multiplexed_id)


@serve.deployment  # options: graphs/builder.py and models/placement.py
class Engine(AsyncLLMReplica):
    def __init__(self, spec: ModelSpec, cache_dir: str | None = None, quota: DeploymentHandle | None = None) -> None:
        prepare_vllm_environment(spec)
        from vllm.platforms import current_platform

        source = resolve_model_source(spec, Path(cache_dir) if cache_dir else None)
        on_cpu = current_platform.is_cpu()
        kwargs = engine_kwargs(spec, source, on_cpu)
        if on_cpu:
            logger.info(cpu_amx.describe(spec.cpu_amx, cpu_amx.amx_tiles_supported(), cpu_amx.plugin_allowed()))
            kwargs.setdefault("kv_cache_memory_bytes", _cpu_kv_cache_budget(source, spec))
            if spec.num_workers > 1:
                bind = cpu_threads_bind(spec.num_workers, sorted(os.sched_getaffinity(0)))
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
        self._spec = spec
        self._signals = EngineLoad()  # vLLM's queue, KV cache and TTFT, for autoscaling
        self._engine = start_async_llm(kwargs, self._signals.stat_logger)  # vllm:* series, autoscaling signals
        self._counters = EngineCounters()
        self._charges = OrderedSender(quota.charge_all) if quota is not None else None
        cache = Path(cache_dir) if cache_dir else None
        self._adapters = (
            EngineAdapters(self._engine, spec, cache, lora_adapters_per_replica(spec, on_cpu))
            if spec.lora is not None
            else None
        )

    async def generate(self, requests: list[EngineRequest]) -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, vLLM RequestOutput) for every prompt of one client request, as they come.

        One handle call per client request, however many prompts it has: a list of prompts is
        queued and batched by vLLM, not spread as separate calls that Serve's queue limits refuse.
        Streams get deltas, other requests one final output per prompt.
        """
        from vllm.exceptions import VLLMClientError
        from vllm.utils.async_utils import merge_async_iterators
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._engine.errored:  # dead before this request: another replica may serve it
            raise EngineUnavailableError("This engine replica has failed and is being replaced. Retry the request.")
        lora = await self._lora_request(requests[0].lora)  # one client request: one model or adapter
        try:
            async for indexed in merge_async_iterators(*(self._outputs(request, lora) for request in requests)):
                yield indexed
        except EngineDeadError:
            self._counters.crashed += 1
            request_ids = ", ".join(request.request_id for request in requests)
            logger.error("engine died while serving request %s", request_ids, extra={"engine_request_id": request_ids})
            raise EngineCrashedError(
                f"The model's engine crashed while serving this request ({request_ids}); it is being "
                "restarted. The request was not retried, since it may have caused the crash."
            ) from None
        except VLLMClientError as exc:  # vLLM's own validation: the client's mistake, never the model's
            raise BadRequestError(str(exc), param=getattr(exc, "parameter", None)) from None

    async def _lora_request(self, adapter: LoraAdapter | None) -> Any:
        if adapter is None:
            return None
        if self._adapters is None:
            raise BadRequestError(f"Model `{self._spec.name}` serves no LoRA adapters.", param="model")
        return await self._adapters.lora_request(adapter)

    async def load_adapter(self, adapter: LoraAdapter) -> dict[str, Any]:
        """Loads the adapter on this replica (the admin API's check before it registers one); 404/400 if it cannot."""
        await self._lora_request(adapter)
        return {
            "adapter": adapter.name,
            "lora_id": adapter.lora_id,
            "replica": serve.get_replica_context().replica_id.unique_id,
        }

    async def _outputs(self, request: EngineRequest, lora: Any = None) -> AsyncIterator[Any]:
        """One prompt's outputs. Only the first carries the prompt's token ids and logprobs (when
        there is one sample: later messages stay small); the last carries the time in this engine.

        vLLM's `generate` loop, open: on an abort the request's last output (all its tokens, for
        a request that does not stream) is still at hand, to charge the tenant for them.
        """
        from vllm.inputs import TokensPrompt

        self._counters.started += 1
        started = time.perf_counter()
        trim_prompt = request.sampling_params.n == 1
        collector = await self._engine.add_request(
            request.request_id,
            TokensPrompt(prompt_token_ids=request.prompt_token_ids),
            request.sampling_params,  # vLLM validates here too
            priority=request.priority,
            reasoning_ended=request.reasoning_ended,
            reasoning_parser_kwargs=request.reasoning_parser_kwargs,
            lora_request=lora,
        )
        first, finished = True, False
        try:
            while not finished:
                output = collector.get_nowait() or await collector.get()  # drained without a task switch when ready
                finished = output.finished
                self._counters.generated_tokens += sum(len(c.token_ids) for c in output.outputs)
                if trim_prompt and not first:
                    output.prompt_token_ids = output.prompt_logprobs = None
                first = False
                output.engine_seconds = time.perf_counter() - started if finished else None
                yield output
            self._counters.finished += 1
            logger.info("engine request finished", extra={"engine_request_id": request.request_id})
        except (asyncio.CancelledError, GeneratorExit):
            if not finished:
                self._counters.aborted += 1
                await self._engine.abort(collector.request_id, internal=True)
                self._charge_abandoned(request, collector)
            raise
        except BaseException:
            if not finished and not self._engine.errored:
                await self._engine.abort(collector.request_id, internal=True)
            raise
        finally:
            collector.close()

    def _charge_abandoned(self, request: EngineRequest, collector: Any) -> None:
        """The tokens an abandoned request that does not stream used (prompt and generated), charged
        to its tenant.

        Nothing of it reached the ingress (vLLM sends such a request one final output), which
        settled it for none. vLLM's abort leaves the request's last output, every token so
        far, in its collector. Streams are billed at the ingress for what was sent.
        """
        from vllm.sampling_params import RequestOutputKind

        if request.charge_to is None or self._charges is None:
            return
        if request.sampling_params.output_kind != RequestOutputKind.FINAL_ONLY:
            return
        try:
            last = collector.get_nowait()
        except Exception:  # the collector holds an error instead: nothing to count
            return
        generated = sum(len(c.token_ids) for c in last.outputs) if last is not None else 0
        if generated:  # the prompt was computed too, and the ingress, which got no output, billed none of it
            self._counters.generated_tokens += generated
            self._charges.send((request.charge_to, request.request_id, len(request.prompt_token_ids) + generated))

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics (every few seconds): what the engine-signals policy reads."""
        return self._signals.report(self._engine.get_num_unfinished_requests())
