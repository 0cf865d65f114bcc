"""Ingress stage: the OpenAI-compatible HTTP API, orchestrating the other stages.

A request, top to bottom: a route here reads the body as far as routing needs
(protocol.ClientRequest) and authenticates the tenant (auth.py); admission.py cuts the
fallback chain to what the tenant may use and takes its quota lease; graph_stages.py runs the
request on each link of the chain in turn (fallback.py) through the tokenizer and postprocess
stages; http_stream.py turns the result into SSE events; http_errors.py answers every failure
with an OpenAI error body. The FastAPI app is built by `build_openai_app` over a `GraphStages`
object, so the HTTP behaviour is testable in-process; the Serve deployment plugs in
handle-backed stages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from servegraph.deployments.admission import admit
from servegraph.deployments.api_docs import (
    GENERATION_STATUSES,
    MODEL_STATUSES,
    error_responses,
    generation_responses,
    install_docs,
)
from servegraph.deployments.auth import Tenant, model_not_allowed, require_admin
from servegraph.deployments.batch_api import (
    FILES_PATH,
    MULTIPART_ENVELOPE_BYTES,
    BatchCalls,
    HandleBatchCalls,
    batch_router,
)
from servegraph.deployments.errors import BadRequestError, OpenAIError, model_not_found
from servegraph.deployments.fallback import FallbackChain
from servegraph.deployments.front_door import TENANT_STATE, FrontDoor, TenantDirectory, tenant_of
from servegraph.deployments.graph_client import GraphClient
from servegraph.deployments.graph_stages import GraphStages, HandleStages, LinkAttempts, deadline_of
from servegraph.deployments.http_errors import install_error_handlers, json_object
from servegraph.deployments.http_stream import sse_events
from servegraph.deployments.messages import ModelRoute
from servegraph.deployments.protocol import ClientRequest, ModelCard, ModelList, RequestKind, model_of, new_id
from servegraph.deployments.quota import Quotas
from servegraph.deployments.request_limits import check_limits, over
from servegraph.deployments.response_cache import CachedResponse, CachePlan, IngressResponseCache
from servegraph.deployments.router import Link, TrafficWeights
from servegraph.deployments.telemetry import CacheTelemetry, RequestRecord, RequestTrace, status_of
from servegraph.deployments.usage import UsageReport, read_usage, summarize
from servegraph.models.config import AuthConfig, IngressConfig, LLMAppArgs, RequestLimits

logger = logging.getLogger("servegraph.ingress")


def request_id_of(http_request: Request) -> str:
    """Serve's proxy puts the client's X-Request-Id (or one it made) in the headers."""
    return http_request.headers.get("x-request-id") or new_id("req")


SESSION_HEADER = "x-session-id"
SERVED_BY_HEADER = "X-Servegraph-Served-By"


def session_key_of(http_request: Request, request: ClientRequest) -> str | None:
    """What keeps one conversation on one model version: the `user` field, else a session header."""
    return request.user or http_request.headers.get(SESSION_HEADER)


def check_input_count(body: dict[str, Any], limits: RequestLimits) -> None:
    """An embeddings request's inputs (a list of strings or of token-id lists), held to `max_prompts`."""
    inputs = body.get("input")
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], str | list) and len(inputs) > limits.max_prompts:
        raise over("input", "inputs", len(inputs), limits.max_prompts)


EMBEDDING_RESPONSES = {200: {"description": "The embeddings.", "content": {"application/json": {}}},
                       **error_responses(*GENERATION_STATUSES)}  # fmt: skip


def build_openai_app(
    stages: GraphStages,
    application: str = "llm",
    observe: Callable[[RequestRecord], None] = lambda record: None,
    fallbacks: FallbackChain | None = None,
    tenants: TenantDirectory | None = None,
    quotas: Quotas | None = None,
    usage_dir: Path | None = None,
    limits: RequestLimits | None = None,
    response_cache: IngressResponseCache | None = None,
    batches: BatchCalls | None = None,
    max_file_bytes: int = 200 << 20,
) -> FastAPI:
    """The OpenAI API over stages; observe gets one RequestRecord per finished request.

    Without a tenant directory, auth is off (every caller is the `default` tenant); with one,
    FrontDoor checks credentials before any route runs. Tenants with limits are admitted by
    quotas; /v1/usage reads the records kept in usage_dir. With a response cache, repeated
    deterministic requests are answered from it (after auth and quota admission, which a hit
    passes like any request).
    """
    directory = tenants or TenantDirectory(AuthConfig(enabled=False))
    limits = limits or RequestLimits()
    app = FastAPI(
        title="servegraph",
        description="OpenAI-compatible multi-model serving graph",
        openapi_url=None,  # api_docs.py serves the document with vLLM's request bodies
        docs_url=None,
        redoc_url=None,
    )
    uploads = {FILES_PATH: max_file_bytes + MULTIPART_ENVELOPE_BYTES} if batches is not None else {}
    app.add_middleware(FrontDoor, directory=directory, max_body_bytes=limits.max_body_bytes, path_body_limits=uploads)
    install_docs(app, directory.docs, stages.request_body_schemas)
    chain = fallbacks or FallbackChain()

    def on_rejected(http_request: Request, error: OpenAIError) -> None:
        """A caller's request refused before its route ran (a bad query): recorded under its tenant."""
        tenant = getattr(http_request.state, TENANT_STATE, None)
        if tenant is not None:
            trace = RequestTrace(observe, request_id_of(http_request), application, "-", False, tenant=tenant.name)
            trace.finish(error.status_code)

    install_error_handlers(app, on_rejected)

    def cache_lookup(
        http_request: Request, request: ClientRequest, tenant: Tenant, primary: Link
    ) -> tuple[CachePlan | None, CachedResponse | None]:
        """The request's cache plan and hit; (None, None) when the cache is off or does not cover it."""
        if response_cache is None:
            return None, None
        cache_control = http_request.headers.get("cache-control")
        plan = response_cache.plan(tenant.name, request, primary.target, cache_control)
        return plan, None if plan is None else response_cache.lookup(plan)

    def cache_headers(plan: CachePlan | None, hit: CachedResponse | None) -> dict[str, str]:
        return {} if plan is None or response_cache is None else response_cache.headers(plan, hit)

    async def served(
        request: ClientRequest, attempts: LinkAttempts, links: list[Link], hit: CachedResponse | None, response_id: str
    ) -> tuple[Link, Any]:
        """The first link of the chain that serves the request, and its result; a cache hit is the primary's replay."""
        if hit is None:
            return await chain.first_served(links, attempts.stream if request.stream else attempts.complete)
        return links[0], response_cache.replay(hit, response_id, request.stream)

    def respond(
        request: ClientRequest,
        response_id: str,
        trace: RequestTrace,
        result: Any,
        headers: dict[str, str],
        keep: CachePlan | None,
    ) -> Response:
        """SSE or JSON for a served result; `keep` (a cache plan) stores it in the response cache."""
        if request.stream:
            recorder = response_cache.recorder(keep, response_id) if keep is not None else None
            events = sse_events(result, response_id, trace, recorder)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        trace.text(result)
        if keep is not None:
            response_cache.store(keep, result, response_id)
        return Response(result.data, media_type="application/json", headers=headers)

    async def generate(http_request: Request, request: ClientRequest, id_prefix: str, tenant: Tenant):
        trace = RequestTrace(
            observe, request_id_of(http_request), application, request.model, request.stream, tenant=tenant.name
        )
        response_id = new_id(id_prefix)
        try:
            chain_links = await stages.chain(request.model, session_key_of(http_request, request))
            links, charge_to = await admit(quotas, tenant, request, chain_links, response_id, trace)
            primary = links[0]
            plan, hit = cache_lookup(http_request, request, tenant, primary)
            priority = tenant.priority.engine_priority
            attempts = LinkAttempts(stages, request, response_id, deadline_of(primary), priority, primary, charge_to)
            link, result = await served(request, attempts, links, hit, response_id)
            trace.cached = hit is not None
            target = link.target
            version = target.version if isinstance(target, ModelRoute) else "upstream"
            trace.served(link.served_by, version, getattr(target, "log_payloads", False), request)
            headers = {SERVED_BY_HEADER: link.served_by, **cache_headers(plan, hit)}
            keep = plan if plan is not None and hit is None and link is primary else None  # the keyed link's answer
            response = respond(request, response_id, trace, result, headers, keep)
        except BaseException as exc:
            trace.finish(status_of(exc))
            raise
        if not request.stream:  # a stream's trace finishes with its last event (sse_events)
            trace.finish(200, result)
        return response

    async def embed(http_request: Request, request: ClientRequest, tenant: Tenant) -> Response:
        """An embeddings request on the model's chain (local models only): no stream, no response cache.
        The quota reserves the inputs' tokens (estimated from their text) and settles the exact count."""
        trace = RequestTrace(
            observe, request_id_of(http_request), application, request.model, False, tenant=tenant.name
        )
        response_id = new_id("embd")
        try:
            chain_links = await stages.chain(request.model, session_key_of(http_request, request))
            links, charge_to = await admit(quotas, tenant, request, chain_links, response_id, trace)
            primary = links[0]
            priority = tenant.priority.engine_priority
            attempts = LinkAttempts(stages, request, response_id, deadline_of(primary), priority, primary, charge_to)
            link, result = await chain.first_served(links, attempts.embed)
            trace.served(link.served_by, link.target.version, link.target.log_payloads, request)
            response = Response(result.data, media_type="application/json", headers={SERVED_BY_HEADER: link.served_by})
        except BaseException as exc:
            trace.finish(status_of(exc))
            raise
        trace.finish(200, result)
        return response

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", responses=error_responses(401))
    async def models(tenant: Tenant = Depends(tenant_of)) -> ModelList:
        listed = await stages.model_list()
        return ModelList(data=[card for card in listed.data if tenant.allows(card.root)])

    @app.get("/v1/models/{model_id:path}", responses=error_responses(401, 404))
    async def model(model_id: str, tenant: Tenant = Depends(tenant_of)) -> ModelCard:
        visible = [card for card in (await stages.model_list()).data if tenant.allows(card.root)]
        card = next((card for card in visible if card.id == model_id), None)
        if card is None:
            raise model_not_found(model_id, [card.id for card in visible])
        return card

    async def tokenizer_call(method: str, http_request: Request, tenant: Tenant) -> JSONResponse:
        """vLLM's /tokenize and /detokenize: the body is validated by vLLM's own models in the tokenizer stage."""
        body = await json_object(http_request)
        check_limits(body, limits)
        model = model_of(body)
        primary = (await stages.chain(model, None))[0]
        if not tenant.allows(primary.model):
            raise model_not_allowed(tenant, model)
        if not isinstance(primary.target, ModelRoute):
            raise BadRequestError(f"`{model}` is an external upstream: it has no tokenizer here.", param="model")
        return JSONResponse(await stages.tokenizer_call(method, primary.target, body))

    @app.post("/tokenize", response_model=None, responses=error_responses(*MODEL_STATUSES))
    async def tokenize(http_request: Request, tenant: Tenant = Depends(tenant_of)) -> JSONResponse:
        return await tokenizer_call("tokenize", http_request, tenant)

    @app.post("/detokenize", response_model=None, responses=error_responses(*MODEL_STATUSES))
    async def detokenize(http_request: Request, tenant: Tenant = Depends(tenant_of)) -> JSONResponse:
        return await tokenizer_call("detokenize", http_request, tenant)

    @app.get("/v1/usage", responses=error_responses(400, 401, 403, 404))
    async def usage(
        tenant: Tenant = Depends(tenant_of),
        of_tenant: str | None = Query(None, alias="tenant", description="Admin keys only: another tenant."),
        start: date | None = None,
        end: date | None = None,
    ) -> UsageReport:
        """Requests and tokens per model and day: the caller's own, or (admin key) every tenant's."""
        if usage_dir is None:
            raise OpenAIError("This application keeps no usage records.", code="not_found", status_code=404)
        if of_tenant not in (None, tenant.name):
            require_admin(tenant)
        who = of_tenant or (None if tenant.admin else tenant.name)

        def report() -> UsageReport:  # file reads and Arrow work, off the event loop
            table = read_usage(usage_dir, since=start, until=end)
            return summarize(table, tenant=who, application=application, since=start, until=end)

        return await asyncio.to_thread(report)

    async def client_request(http_request: Request, kind: RequestKind, tenant: Tenant) -> ClientRequest:
        """The body, checked only as far as routing needs; a refused body still leaves its record."""
        try:
            body = await json_object(http_request)
            check_limits(body, limits)
            if kind == "embedding":
                check_input_count(body, limits)
            return ClientRequest.of(kind, body)
        except OpenAIError as error:
            trace = RequestTrace(
                observe, request_id_of(http_request), application, "-", stream=False, tenant=tenant.name
            )
            trace.finish(error.status_code)
            raise

    @app.post("/v1/completions", response_model=None, responses=generation_responses())
    async def completions(http_request: Request, tenant: Tenant = Depends(tenant_of)):
        """vLLM's CompletionRequest: every field `vllm serve` takes, with its defaults."""
        request = await client_request(http_request, "completion", tenant)
        return await generate(http_request, request, "cmpl", tenant)

    @app.post("/v1/responses", response_model=None, responses=generation_responses())
    async def responses(http_request: Request, tenant: Tenant = Depends(tenant_of)):
        """vLLM's ResponsesRequest, stateless (no previous_response_id or background): text, streaming, tools."""
        request = await client_request(http_request, "responses", tenant)
        return await generate(http_request, request, "resp", tenant)

    @app.post("/v1/chat/completions", response_model=None, responses=generation_responses())
    async def chat_completions(http_request: Request, tenant: Tenant = Depends(tenant_of)):
        """vLLM's ChatCompletionRequest: tools, response_format, logprobs, n and the rest, as `vllm serve`."""
        request = await client_request(http_request, "chat", tenant)
        return await generate(http_request, request, "chatcmpl", tenant)

    @app.post("/v1/embeddings", response_model=None, responses=EMBEDDING_RESPONSES)
    async def embeddings(http_request: Request, tenant: Tenant = Depends(tenant_of)):
        """vLLM's embeddings request (text, token ids, lists of them), for models with `task: embed`."""
        request = await client_request(http_request, "embedding", tenant)
        return await embed(http_request, request, tenant)

    if batches is not None:  # /v1/files and /v1/batches, served by the BatchRunner replica
        app.include_router(batch_router(batches, max_file_bytes))
    return app


@serve.deployment(name="ingress")  # options: graphs/builder.py
@serve.ingress()
class Ingress:
    """user_config (see models.config.IngressConfig) carries traffic weights: no restart to change them."""

    def __init__(
        self,
        router: DeploymentHandle,
        tokenizer: DeploymentHandle,
        postprocess: DeploymentHandle,
        args: LLMAppArgs,
        quota: DeploymentHandle | None = None,
        batch_runner: DeploymentHandle | None = None,
    ):
        self._graph = GraphClient(HandleStages(router, tokenizer, postprocess), args, quota)
        replica = serve.get_replica_context()
        self._response_cache = (
            IngressResponseCache(
                args.response_cache, CacheTelemetry(replica.app_name, replica.replica_id.unique_id, self._graph.labels)
            )
            if args.response_cache.enabled
            else None
        )
        self._traffic: TrafficWeights = {}
        self._tenants = TenantDirectory(args.auth)
        self._limits = args.limits
        self._batches = HandleBatchCalls(batch_runner) if batch_runner is not None else None
        self._forwarding: asyncio.Task | None = None
        self._max_file_bytes = args.batch.max_file_bytes

    async def reconfigure(self, user_config: dict) -> None:
        config = IngressConfig.model_validate(user_config)
        await self._graph.stages.set_traffic(config.traffic)
        if self._response_cache is not None:
            emptied = self._response_cache.traffic_changed(self._traffic, config.traffic)
            logger.info("response cache emptied for %s: traffic changed", sorted(emptied) or "no model")
        self._traffic = config.traffic
        logger.info("traffic weights now %s", config.traffic)
        if self._batches is not None:  # batch lines split as requests do; not awaited: the runner may be starting
            if self._forwarding is not None:
                self._forwarding.cancel()  # older weights must not arrive after these
            self._forwarding = asyncio.get_running_loop().create_task(self._forward_traffic(config.traffic))

    async def _forward_traffic(self, traffic: TrafficWeights) -> None:
        assert self._batches is not None
        try:
            await self._batches.set_traffic(traffic)
        except Exception as exc:  # the runner keeps its last weights; the next reconfigure sends them again
            logger.warning("traffic weights not sent to the batch runner: %r", exc)

    def __serve_build_asgi_app__(self) -> FastAPI:
        application = serve.get_replica_context().app_name
        return build_openai_app(
            self._graph.stages,
            application,
            self._graph.observe,
            fallbacks=self._graph.fallbacks,
            tenants=self._tenants,
            quotas=self._graph.quotas,
            usage_dir=self._graph.usage.directory,
            limits=self._limits,
            response_cache=self._response_cache,
            batches=self._batches,
            max_file_bytes=self._max_file_bytes,
        )

    def __del__(self) -> None:
        graph = getattr(self, "_graph", None)
        if graph is not None:
            graph.close()
