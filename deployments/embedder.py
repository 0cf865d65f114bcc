"""Embedder stage: one vLLM AsyncLLM on the pooling runner per replica; token ids and PoolingParams in,
vLLM's PoolingRequestOutputs out.

The engine deployment of a model with `task: embed` (graphs/builder.py binds it instead of an
Engine). Like an Engine it never sees text: the tokenizer stage renders each input with vLLM's
pooling IO processor, and postprocess shapes the outputs with vLLM's own embedding serving
class (`ServingEmbedding`), so `/v1/embeddings` answers as `vllm serve` does. This module also
holds what those stages hand each other for an embeddings request, and that serving class
built over the front end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ray import serve
from ray.serve.handle import DeploymentHandle

from servegraph.deployments.engine_replica import (
    AsyncLLMReplica,
    ReplicaCounters,
    prepare_vllm_environment,
    start_async_llm,
)
from servegraph.deployments.errors import BadRequestError, EngineCrashedError, EngineUnavailableError
from servegraph.deployments.frontend import EngineShape, Frontend, model_registry
from servegraph.deployments.messages import ModelRoute
from servegraph.deployments.quota import OrderedSender, TokenEntry
from servegraph.models.build import resolve_model_source
from servegraph.models.engine_config import MIN_CPU_KV_CACHE_BYTES, engine_kwargs
from servegraph.models.spec import ModelSpec

logger = logging.getLogger("ray.serve.servegraph.embedder")


@dataclass(frozen=True)
class EmbedRequest:
    """One input of an embeddings request: token ids and vLLM's PoolingParams, all the engine needs."""

    request_id: str
    prompt_token_ids: list[int]
    pooling_params: Any  # vllm.PoolingParams, verified by the tokenizer stage
    priority: int = 0  # vLLM's: lower is scheduled first


@dataclass(frozen=True)
class PreparedEmbedding:
    """The tokenizer's output for an embeddings request: one engine request per input, and how
    postprocess encodes the vectors (vLLM's request fields, not the whole request model)."""

    route: ModelRoute
    engine_requests: list[EmbedRequest]
    response_id: str
    model_name: str  # the name the response carries: what the client asked for
    encoding_format: str = "float"
    embed_dtype: str = "float32"
    endianness: str = "native"
    charge_to: str | None = None  # the limited tenant the engine charges if the request is abandoned

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.engine_requests)


@dataclass
class Embeddings:
    """The engine's answer: vLLM's PoolingRequestOutput per input, in input order, and the time it took."""

    outputs: list[Any]
    engine_seconds: float


def embedding_serving(frontend: Frontend) -> Any:
    """vLLM's ServingEmbedding over the front end (no engine): its IO processor renders the inputs in
    the tokenizer stage, its response builder shapes the vectors in postprocess."""
    from vllm.entrypoints.pooling.embed.serving import ServingEmbedding
    from vllm.renderers.chat_utils import ChatTemplateConfig

    shape = EngineShape(frontend.vllm_config, frontend.renderer)
    models = model_registry(frontend.spec, frontend.model_config)
    return ServingEmbedding(shape, models, request_logger=None, chat_template_config=ChatTemplateConfig())


@dataclass
class EmbedderCounters(ReplicaCounters):
    """What this replica's engine did, for tests and the admin app (the Engine's counters' shape)."""

    prompt_tokens: int = 0


class PoolingEngine(Protocol):
    """The part of vLLM's AsyncLLM the embedder uses (tests give a stand-in)."""

    errored: bool

    def encode(self, prompt: Any, pooling_params: Any, request_id: str, *, priority: int) -> AsyncIterator[Any]: ...


@dataclass
class EmbeddingRunner:
    """Runs one client request's inputs on a pooling engine, batched by vLLM, and collects the finals.

    An abandoned request (client gone, deadline) is aborted by vLLM's own encode loop; the inputs
    already embedded by then are charged to the tenant, since the ingress, which received
    nothing, settled the request for none.
    """

    engine: PoolingEngine
    charge: Callable[[TokenEntry], None] | None = None  # to the quota replica (its charge_all)
    counters: EmbedderCounters = field(default_factory=EmbedderCounters)

    async def embed(self, requests: list[EmbedRequest], charge_to: str | None = None) -> Embeddings:
        """charge_to: the limited tenant charged for what an abandoned request embedded."""
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.utils.async_utils import merge_async_iterators
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.engine.errored:  # dead before this request: another replica may serve it
            raise EngineUnavailableError("This engine replica has failed and is being replaced. Retry the request.")
        started = time.perf_counter()
        self.counters.started += len(requests)
        finals: list[Any] = [None] * len(requests)
        streams = [
            self.engine.encode(
                TokensPrompt(prompt_token_ids=r.prompt_token_ids), r.pooling_params, r.request_id, priority=r.priority
            )
            for r in requests
        ]
        try:
            async for index, output in merge_async_iterators(*streams):
                if output.finished:
                    finals[index] = output
        except (asyncio.CancelledError, GeneratorExit):
            self.counters.aborted += sum(final is None for final in finals)
            self._charge_abandoned(requests, finals, charge_to)
            raise
        except EngineDeadError:
            self.counters.crashed += 1
            raise EngineCrashedError(
                "The model's engine crashed while serving this request; it is being restarted. The request "
                "was not retried, since it may have caused the crash."
            ) from None
        except VLLMClientError as exc:  # vLLM's own validation: the client's mistake, never the model's
            raise BadRequestError(str(exc), param=getattr(exc, "parameter", None)) from None
        self.counters.finished += len(requests)
        self.counters.prompt_tokens += sum(len(r.prompt_token_ids) for r in requests)
        return Embeddings(finals, time.perf_counter() - started)

    def _charge_abandoned(self, requests: list[EmbedRequest], finals: list[Any], charge_to: str | None) -> None:
        """The inputs of an abandoned request that were embedded: their tokens, charged to its tenant."""
        embedded = sum(len(r.prompt_token_ids) for r, final in zip(requests, finals, strict=True) if final is not None)
        if self.charge is not None and charge_to is not None and embedded:
            self.charge((charge_to, requests[0].request_id, embedded))


def pooling_engine_kwargs(spec: ModelSpec, source: str, on_cpu: bool) -> dict[str, Any]:
    """The Engine's vLLM arguments on the pooling runner. An encoder-only model (BERT) keeps no KV cache
    (vLLM's EncoderOnlyAttention): with prefix caching on, vLLM's scheduler refuses to start ("requires
    at least one cacheable group"), and on CPU the smallest budget is set, as vLLM's default takes a
    share of host memory. The spec's engine_args still win (e.g. `convert: embed` for a decoder model,
    whose prefix cache does work)."""
    kwargs = {**engine_kwargs(spec, source, on_cpu), "runner": "pooling", "enable_prefix_caching": False}
    if on_cpu:
        kwargs.setdefault("kv_cache_memory_bytes", MIN_CPU_KV_CACHE_BYTES)
    return {**kwargs, **spec.engine_args}


@serve.deployment  # options: graphs/builder.py and models/placement.py
class Embedder(AsyncLLMReplica):
    """An embedding model's engine replica: vLLM's AsyncLLM on the pooling runner."""

    def __init__(self, spec: ModelSpec, cache_dir: str | None = None, quota: DeploymentHandle | None = None) -> None:
        prepare_vllm_environment(spec)
        from vllm.platforms import current_platform

        source = resolve_model_source(spec, Path(cache_dir) if cache_dir else None)
        self._engine = start_async_llm(pooling_engine_kwargs(spec, source, current_platform.is_cpu()))
        charges = OrderedSender(quota.charge_all) if quota is not None else None
        self._runner = EmbeddingRunner(self._engine, charges.send if charges is not None else None)
        self._counters = self._runner.counters

    async def embed(self, requests: list[EmbedRequest], charge_to: str | None = None) -> Embeddings:
        """Every input of one client request in one call: vLLM batches them."""
        return await self._runner.embed(requests, charge_to)
