"""One batch line through the graph, as the ingress runs an interactive request (ingress.generate).

The same steps in the same order: the tenant's fallback chain cut to the models it may use
(admission.allowed_links), its quota lease (admission.take_lease, settled with the request's
tokens when its record is written), each link tried through the tokenizer and postprocess
stages (graph_stages.LinkAttempts, fallback.FallbackChain), and one RequestRecord per finished
line for usage and metrics; embeddings lines as the ingress's /v1/embeddings runs them (local
models only, the inputs' tokens reserved). Two differences: lines never stream, and they always
go to the engines at the batch priority class, behind every interactive request in vLLM's queue.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from servegraph.deployments.admission import admit
from servegraph.deployments.auth import Tenant
from servegraph.deployments.errors import RateLimitError
from servegraph.deployments.fallback import FallbackChain
from servegraph.deployments.graph_stages import GraphStages, LinkAttempts, deadline_of
from servegraph.deployments.messages import ModelRoute, ResponseChunk
from servegraph.deployments.protocol import ClientRequest
from servegraph.deployments.quota import Quotas
from servegraph.deployments.telemetry import RequestRecord, RequestTrace, status_of
from servegraph.models.config import PriorityClass

BATCH_PRIORITY = PriorityClass.batch.engine_priority
ID_PREFIXES = {"chat": "chatcmpl", "completion": "cmpl", "responses": "resp", "embedding": "embd"}


class LineGraph(Protocol):
    """What the batch runner needs of the graph: one request run to its whole response, or an OpenAIError."""

    async def run(self, tenant: Tenant, request: ClientRequest, request_id: str) -> ResponseChunk: ...


class GraphLines:
    """LineGraph over the graph's stages: the ingress's admission, fallback and records, at batch priority.

    A line the tenant's quota refuses (429) raises before any record is written: the runner
    waits and tries it again, and only the attempt that runs is recorded.
    """

    def __init__(
        self,
        stages: GraphStages,
        application: str,
        observe: Callable[[RequestRecord], None],
        quotas: Quotas | None = None,
        fallbacks: FallbackChain | None = None,
    ) -> None:
        self._stages = stages
        self._application = application
        self._observe = observe
        self._quotas = quotas
        self._chain = fallbacks or FallbackChain()

    async def run(self, tenant: Tenant, request: ClientRequest, request_id: str) -> ResponseChunk:
        trace = RequestTrace(self._observe, request_id, self._application, request.model, False, tenant=tenant.name)
        response_id = f"{ID_PREFIXES[request.kind]}-{request_id}"
        admitted = False
        try:
            chain_links = await self._stages.chain(request.model, request.user)
            links, charge_to = await admit(self._quotas, tenant, request, chain_links, response_id, trace)
            admitted = True
            primary = links[0]
            attempts = LinkAttempts(
                self._stages, request, response_id, deadline_of(primary), BATCH_PRIORITY, primary, charge_to
            )
            run = attempts.embed if request.kind == "embedding" else attempts.complete
            link, result = await self._chain.first_served(links, run)
            version = link.target.version if isinstance(link.target, ModelRoute) else "upstream"
            trace.served(link.served_by, version, getattr(link.target, "log_payloads", False), request)
            trace.text(result)
        except BaseException as exc:
            if admitted or not isinstance(exc, RateLimitError):
                trace.finish(status_of(exc))
            raise
        trace.finish(200, result)
        return result
