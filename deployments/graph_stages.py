"""What the ingress calls in the rest of the graph, and how one request runs on one link of its chain.

`GraphStages` is the ingress's whole view of the graph: in Serve, `HandleStages` over
deployment handles; in tests, every stage in one process (tests/fakes.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx
from ray.serve.handle import DeploymentHandle

from servegraph.deployments.errors import RequestTimeoutError
from servegraph.deployments.http_stream import open_stream
from servegraph.deployments.messages import STREAM_SERIALIZATION, GenerationCall, ModelRoute, ResponseChunk
from servegraph.deployments.protocol import ClientRequest, ModelList
from servegraph.deployments.router import Link, ModelRegistry, RegistryCopy, TrafficWeights
from servegraph.deployments.streaming import Deadline, until_finished
from servegraph.deployments.upstream import UpstreamClient
from servegraph.models.spec import UpstreamSpec


class GraphStages(Protocol):
    """The calls the ingress makes into the rest of the graph."""

    async def chain(self, model: str, session_key: str | None) -> list[Link]: ...
    def stream(self, call: GenerationCall) -> AsyncIterator[ResponseChunk]: ...
    async def complete(self, call: GenerationCall) -> ResponseChunk: ...
    async def embed(self, call: GenerationCall) -> ResponseChunk: ...
    def upstream(self, upstream: UpstreamSpec) -> UpstreamClient: ...
    async def model_list(self) -> ModelList: ...
    async def tokenizer_call(self, method: str, route: ModelRoute, body: dict[str, Any]) -> dict[str, Any]: ...
    async def request_body_schemas(self) -> dict[str, Any]: ...


class HandleStages:
    """GraphStages over Serve deployment handles: the tokenizer call (sealed) feeds the postprocess call.

    The router owns the model registry; the ingress fetches it once and resolves names,
    traffic splits and fallback chains in-process, which keeps a Ray hop off every request.
    """

    def __init__(self, router: DeploymentHandle, tokenizer: DeploymentHandle, postprocess: DeploymentHandle):
        self._router = router
        self._registry = RegistryCopy(lambda revision: router.registry_if_changed.remote(revision))
        self._tokenizer = tokenizer
        self._postprocess = postprocess
        self._postprocess_stream = postprocess.options(stream=True, response_serialization=STREAM_SERIALIZATION)
        self._upstreams: dict[str, UpstreamClient] = {}
        self._http = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def registry(self) -> ModelRegistry:
        return await self._registry.get()

    async def set_traffic(self, traffic: TrafficWeights) -> None:
        """New version weights; ValueError (and no change) if they name versions the graph lacks."""
        await self._registry.set_traffic(traffic)

    async def chain(self, model: str, session_key: str | None) -> list[Link]:
        """The model's chain; a name the copy does not know (an adapter added since) refreshes it first."""
        return await self._registry.chain(model, session_key)

    def _prepared(self, call: GenerationCall):
        """The tokenizer stage's PreparedRequest, still in Ray's object store: postprocess takes it from there.

        The ingress never holds it: no wait for it before the postprocess call, and no vLLM
        objects (SamplingParams, request models) to unpickle, so this process never imports vLLM.
        """
        return self._tokenizer.prepare.remote(
            call.route, call.request, call.request_id, call.priority, call.model_name, call.charge_to
        )

    async def stream(self, call: GenerationCall) -> AsyncIterator[ResponseChunk]:
        chunks = self._postprocess_stream.stream.remote(self._prepared(call))
        async for chunk in until_finished(chunks, chunks):
            yield chunk

    async def complete(self, call: GenerationCall) -> ResponseChunk:
        return await self._postprocess.complete.remote(self._prepared(call))

    async def embed(self, call: GenerationCall) -> ResponseChunk:
        """An embeddings request: the tokenizer's PreparedEmbedding (sealed) goes to postprocess as `prepare`'s does."""
        return await self._postprocess.embed.remote(self._tokenizer.prepare_embedding.remote(call))

    def upstream(self, upstream: UpstreamSpec) -> UpstreamClient:
        if upstream.name not in self._upstreams:
            self._upstreams[upstream.name] = UpstreamClient(upstream, self._http)
        return self._upstreams[upstream.name]

    async def model_list(self) -> ModelList:
        return (await self.registry()).model_list()

    async def tokenizer_call(self, method: str, route: ModelRoute, body: dict[str, Any]) -> dict[str, Any]:
        """The tokenizer stage's `tokenize` or `detokenize` for one model version."""
        return await getattr(self._tokenizer, method).remote(route, body)

    async def request_body_schemas(self) -> dict[str, Any]:
        """vLLM's request models as OpenAPI schemas (protocol.request_body_schemas), made in the tokenizer stage."""
        return await self._tokenizer.request_body_schemas.remote()


def timeout_error(model: str, timeout_s: float | None) -> RequestTimeoutError:
    return RequestTimeoutError(f"The request to model `{model}` did not finish within {timeout_s:g} s.")


def link_timeout(link: Link) -> float | None:
    target = link.target
    return target.timeout_s


def deadline_of(primary: Link) -> Deadline:
    """A request's time limit: its chain's first link's timeout, shared by every link it tries."""
    return Deadline(link_timeout(primary), lambda: timeout_error(primary.model, link_timeout(primary)))


class LinkAttempts:
    """Runs one request on one link of its fallback chain: a local model version or an upstream.

    Responses name the model the client asked for, or the fallback's when one serves.
    """

    def __init__(
        self,
        stages: GraphStages,
        request: ClientRequest,
        response_id: str,
        deadline: Deadline,
        priority: int,
        primary: Link,
        charge_to: str | None = None,
    ) -> None:
        self._stages = stages
        self._charge_to = charge_to
        self._request = request
        self._response_id = response_id
        self._deadline = deadline
        self._priority = priority
        self._primary = primary

    def _model_name(self, link: Link) -> str:
        return self._request.model if link is self._primary else link.model

    def _call(self, link: Link) -> GenerationCall:
        return GenerationCall(
            link.target, self._request, self._response_id, self._priority, self._model_name(link), self._charge_to
        )

    async def stream(self, link: Link) -> AsyncIterator[ResponseChunk]:
        if isinstance(link.target, UpstreamSpec):
            chunks = self._stages.upstream(link.target).stream(self._request, self._model_name(link))
        else:
            chunks = self._stages.stream(self._call(link))
        return await open_stream(chunks, self._deadline)

    async def embed(self, link: Link) -> ResponseChunk:
        """Local models only: upstreams are called for generation alone (the ingress leaves them out)."""
        return await self._deadline.run(self._stages.embed(self._call(link)))

    async def complete(self, link: Link) -> ResponseChunk:
        if isinstance(link.target, UpstreamSpec):
            upstream = self._stages.upstream(link.target)
            return await self._deadline.run(upstream.complete(self._request, self._model_name(link)))
        return await self._deadline.run(self._stages.complete(self._call(link)))
