"""Ingress stage: the OpenAI-compatible HTTP API, orchestrating the other stages.

The FastAPI app is built by `build_openai_app` over a `GraphStages` object, so the HTTP
behaviour is testable in-process; the Serve deployment plugs in handle-backed stages.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import date
from pathlib import Path
from typing import Any, Protocol

import httpx
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.auth import OPEN_TENANT, Tenant, TenantDirectory, model_not_allowed, require_admin
from deployments.errors import (
    BadRequestError,
    OpenAIError,
    RequestTimeoutError,
    as_openai_error,
    invalid_field,
    model_not_found,
)
from deployments.fallback import FallbackChain
from deployments.messages import GenerationCall, ModelRoute, ResponseChunk
from deployments.protocol import ClientRequest, ModelCard, ModelList, RequestKind, new_id
from deployments.quota import HandleQuotas, Quotas
from deployments.router import Link, ModelRegistry, TrafficWeights
from deployments.streaming import Deadline, until_finished
from deployments.telemetry import RequestRecord, RequestTelemetry, RequestTrace, status_of
from deployments.upstream import UpstreamClient, sse
from deployments.usage import UsageLog, UsageRecord, UsageReport, read_usage, summarize
from models.config import AuthConfig, IngressConfig, UsageConfig
from models.spec import UpstreamSpec

logger = logging.getLogger("servegraph.ingress")

OpenAIRequest = ClientRequest  # the body as sent; vLLM's models parse it in the tokenizer stage


class GraphStages(Protocol):
    """The calls the ingress makes into the rest of the graph."""

    async def chain(self, model: str, session_key: str | None) -> list[Link]: ...
    def stream(self, call: GenerationCall) -> AsyncIterator[ResponseChunk]: ...
    async def complete(self, call: GenerationCall) -> ResponseChunk: ...
    def upstream(self, upstream: UpstreamSpec) -> UpstreamClient: ...
    async def model_list(self) -> ModelList: ...
    async def tokenizer_call(self, method: str, route: ModelRoute, body: dict[str, Any]) -> dict[str, Any]: ...


class HandleStages:
    """GraphStages over Serve deployment handles: the tokenizer call (sealed) feeds the postprocess call.

    The router owns the model registry; the ingress fetches it once and resolves names,
    traffic splits and fallback chains in-process, which keeps a Ray hop off every request.
    """

    def __init__(self, router: DeploymentHandle, tokenizer: DeploymentHandle, postprocess: DeploymentHandle):
        self._router = router
        self._registry: ModelRegistry | None = None
        self._traffic: TrafficWeights = {}
        self._tokenizer = tokenizer
        self._postprocess = postprocess
        self._postprocess_stream = postprocess.options(stream=True)
        self._upstreams: dict[str, UpstreamClient] = {}
        self._http = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def registry(self) -> ModelRegistry:
        if self._registry is None:
            registry = await self._router.registry.remote()
            registry.set_traffic(self._traffic)
            self._registry = registry
        return self._registry

    async def set_traffic(self, traffic: TrafficWeights) -> None:
        """New version weights; ValueError (and no change) if they name versions the graph lacks."""
        (await self.registry()).set_traffic(traffic)
        self._traffic = traffic

    async def chain(self, model: str, session_key: str | None) -> list[Link]:
        return (await self.registry()).chain(model, session_key)

    def _prepared(self, call: GenerationCall):
        """The tokenizer stage's PreparedRequest, still in Ray's object store: postprocess takes it from there.

        The ingress never holds it: no wait for it before the postprocess call, and no vLLM
        objects (SamplingParams, request models) to unpickle, so this process never imports vLLM.
        """
        return self._tokenizer.prepare.remote(call.route, call.request, call.request_id, call.priority, call.model_name)

    async def stream(self, call: GenerationCall) -> AsyncIterator[ResponseChunk]:
        chunks = self._postprocess_stream.stream.remote(self._prepared(call))
        async for chunk in until_finished(chunks, chunks):
            yield chunk

    async def complete(self, call: GenerationCall) -> ResponseChunk:
        return await self._postprocess.complete.remote(self._prepared(call))

    def upstream(self, upstream: UpstreamSpec) -> UpstreamClient:
        if upstream.name not in self._upstreams:
            self._upstreams[upstream.name] = UpstreamClient(upstream, self._http)
        return self._upstreams[upstream.name]

    async def model_list(self) -> ModelList:
        return (await self.registry()).model_list()

    async def tokenizer_call(self, method: str, route: ModelRoute, body: dict[str, Any]) -> dict[str, Any]:
        """The tokenizer stage's `tokenize` or `detokenize` for one model version."""
        return await getattr(self._tokenizer, method).remote(route, body)


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


def install_error_handlers(app: FastAPI, on_rejected: Callable[[Request, OpenAIError], None] | None = None) -> None:
    """Every failure, including FastAPI's own, answers with an OpenAI error body.

    on_rejected hears of requests refused before any handler ran (unparseable bodies).
    """

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    # Class-specific handlers answer in ExceptionMiddleware; the generic one below re-raises into
    # Serve, whose own backpressure handler would answer 503 in plain text.
    @app.exception_handler(BackPressureError)
    async def _overloaded(_: Request, exc: BackPressureError) -> JSONResponse:
        return error_response(as_openai_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = invalid_field(exc.errors(), code="invalid_request")
        if on_rejected is not None:
            on_rejected(request, error)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(OpenAIError(str(exc.detail), code=str(exc.status_code), status_code=exc.status_code))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        error = as_openai_error(exc)
        if error.status_code >= 500:
            logger.exception("request failed", exc_info=exc)
        return error_response(error)


async def json_object(http_request: Request) -> dict[str, Any]:
    """The request body as a JSON object; 400 for anything else."""
    try:
        body = json.loads(await http_request.body())
    except ValueError as exc:  # UnicodeDecodeError included
        raise BadRequestError(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object.")
    return body


async def open_stream(chunks: AsyncIterator[ResponseChunk], deadline: Deadline) -> AsyncIterator[ResponseChunk]:
    """The text stream, once its first chunk is in: until then a failure (overload, timeout)
    still gets its own HTTP status, or a fallback, instead of an error event inside a 200 stream."""
    chunks = deadline.iterate(chunks)
    try:
        first = await anext(chunks)
    except BaseException:
        await chunks.aclose()
        raise

    async def replay() -> AsyncIterator[ResponseChunk]:
        yield first
        async for chunk in chunks:
            yield chunk

    return replay()


async def sse_events(chunks: AsyncIterator[ResponseChunk], response_id: str, trace: RequestTrace) -> AsyncIterator[str]:
    """The postprocess stage's SSE events as they come; a failure after the headers becomes an error event."""
    last: ResponseChunk | None = None
    status = 200
    try:
        async for chunk in chunks:
            trace.first_token()
            trace.text(chunk)
            last = chunk
            status = chunk.error_status or status
            yield chunk.data
    except Exception as exc:  # headers are gone: report the failure in the stream itself
        error = as_openai_error(exc)
        status = error.status_code
        logger.warning("stream %s failed: %s", response_id, error.message)
        yield sse(json.dumps(error.body()))
        yield sse("[DONE]")
    except BaseException as exc:  # the client went away
        status = status_of(exc)
        raise
    finally:
        trace.finish(status, last)


def timeout_error(model: str, timeout_s: float | None) -> RequestTimeoutError:
    return RequestTimeoutError(f"The request to model `{model}` did not finish within {timeout_s:g} s.")


def request_id_of(http_request: Request) -> str:
    """Serve's proxy puts the client's X-Request-Id (or one it made) in the headers."""
    return http_request.headers.get("x-request-id") or new_id("req")


UNKNOWN_TENANT = "-"
SESSION_HEADER = "x-session-id"
SERVED_BY_HEADER = "X-Servegraph-Served-By"


def session_key_of(http_request: Request, request: OpenAIRequest) -> str | None:
    """What keeps one conversation on one model version: the `user` field, else a session header."""
    return request.user or http_request.headers.get(SESSION_HEADER)


def link_timeout(link: Link) -> float | None:
    target = link.target
    return target.timeout_s


class LinkAttempts:
    """Runs one request on one link of its fallback chain: a local model version or an upstream.

    Responses name the model the client asked for, or the fallback's when one serves.
    """

    def __init__(
        self,
        stages: GraphStages,
        request: OpenAIRequest,
        response_id: str,
        deadline: Deadline,
        priority: int,
        primary: Link,
    ) -> None:
        self._stages = stages
        self._request = request
        self._response_id = response_id
        self._deadline = deadline
        self._priority = priority
        self._primary = primary

    def _model_name(self, link: Link) -> str:
        return self._request.model if link is self._primary else link.model

    def _call(self, link: Link) -> GenerationCall:
        return GenerationCall(link.target, self._request, self._response_id, self._priority, self._model_name(link))

    async def stream(self, link: Link) -> AsyncIterator[ResponseChunk]:
        if isinstance(link.target, UpstreamSpec):
            chunks = self._stages.upstream(link.target).stream(self._request, self._model_name(link))
        else:
            chunks = self._stages.stream(self._call(link))
        return await open_stream(chunks, self._deadline)

    async def complete(self, link: Link) -> ResponseChunk:
        if isinstance(link.target, UpstreamSpec):
            upstream = self._stages.upstream(link.target)
            return await self._deadline.run(upstream.complete(self._request, self._model_name(link)))
        return await self._deadline.run(self._stages.complete(self._call(link)))


def allowed_links(tenant: Tenant, requested: str, links: list[Link]) -> list[Link]:
    """The chain this tenant may use: 403 for the model asked for, fallbacks it may not use dropped."""
    primary, *fallbacks = links
    if not tenant.allows(primary.model):
        raise model_not_allowed(tenant, requested)
    return [primary, *(link for link in fallbacks if tenant.allows(link.model))]


def settling(observe: Callable[[RequestRecord], None], quotas: Quotas, tenant: str, lease: str):
    """observe, after telling the quota store the request's tokens and freeing its slot."""

    def finished(record: RequestRecord) -> None:
        quotas.settle(tenant, lease, record.prompt_tokens + record.completion_tokens)
        observe(record)

    return finished


def build_openai_app(
    stages: GraphStages,
    application: str = "llm",
    observe: Callable[[RequestRecord], None] = lambda record: None,
    fallbacks: FallbackChain | None = None,
    tenants: TenantDirectory | None = None,
    quotas: Quotas | None = None,
    usage_dir: Path | None = None,
) -> FastAPI:
    """The OpenAI API over stages; observe gets one RequestRecord per finished request.

    Without a tenant directory, auth is off (every caller is the `default` tenant). Tenants
    with limits are admitted by quotas; /v1/usage reads the records kept in usage_dir.
    """
    app = FastAPI(title="servegraph", description="OpenAI-compatible multi-model serving graph")
    chain = fallbacks or FallbackChain()
    directory = tenants or TenantDirectory(AuthConfig(enabled=False))

    def tenant_of(authorization: str | None = Header(None)) -> Tenant:
        return directory.authenticate(authorization)

    def on_rejected(http_request: Request, error: OpenAIError) -> None:
        who = UNKNOWN_TENANT if directory.enabled else OPEN_TENANT.name  # refused before auth ran
        trace = RequestTrace(observe, request_id_of(http_request), application, "-", stream=False, tenant=who)
        trace.finish(error.status_code)

    install_error_handlers(app, on_rejected)

    async def generate(http_request: Request, request: OpenAIRequest, id_prefix: str, tenant: Tenant):
        trace = RequestTrace(
            observe, request_id_of(http_request), application, request.model, request.stream, tenant=tenant.name
        )
        response_id = new_id(id_prefix)
        try:
            chain_links = await stages.chain(request.model, session_key_of(http_request, request))
            links = allowed_links(tenant, request.model, chain_links)
            if quotas is not None and tenant.limits.any:
                await quotas.admit(tenant.name, response_id)
                trace.observe = settling(trace.observe, quotas, tenant.name, response_id)
            primary = links[0]
            deadline = Deadline(link_timeout(primary), lambda: timeout_error(primary.model, link_timeout(primary)))
            attempts = LinkAttempts(stages, request, response_id, deadline, tenant.priority.engine_priority, primary)
            link, result = await chain.first_served(links, attempts.stream if request.stream else attempts.complete)
            target = link.target
            version = target.version if isinstance(target, ModelRoute) else "upstream"
            trace.served(link.served_by, version, getattr(target, "log_payloads", False), request)
            headers = {SERVED_BY_HEADER: link.served_by}
            if request.stream:
                events = sse_events(result, response_id, trace)
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            trace.text(result)
        except BaseException as exc:
            trace.finish(status_of(exc))
            raise
        trace.finish(200, result)
        return Response(result.data, media_type="application/json", headers=headers)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(tenant: Tenant = Depends(tenant_of)) -> ModelList:
        listed = await stages.model_list()
        return ModelList(data=[card for card in listed.data if tenant.allows(card.root)])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, tenant: Tenant = Depends(tenant_of)) -> ModelCard:
        visible = [card for card in (await stages.model_list()).data if tenant.allows(card.root)]
        card = next((card for card in visible if card.id == model_id), None)
        if card is None:
            raise model_not_found(model_id, [card.id for card in visible])
        return card

    async def tokenizer_call(method: str, http_request: Request, tenant: Tenant) -> JSONResponse:
        """vLLM's /tokenize and /detokenize: the body is validated by vLLM's own models in the tokenizer stage."""
        body = await json_object(http_request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequestError("`model` is required: this server serves several models.", param="model")
        primary = (await stages.chain(model, None))[0]
        if not tenant.allows(primary.model):
            raise model_not_allowed(tenant, model)
        if not isinstance(primary.target, ModelRoute):
            raise BadRequestError(f"`{model}` is an external upstream: it has no tokenizer here.", param="model")
        return JSONResponse(await stages.tokenizer_call(method, primary.target, body))

    @app.post("/tokenize", response_model=None)
    async def tokenize(http_request: Request, tenant: Tenant = Depends(tenant_of)) -> JSONResponse:
        return await tokenizer_call("tokenize", http_request, tenant)

    @app.post("/detokenize", response_model=None)
    async def detokenize(http_request: Request, tenant: Tenant = Depends(tenant_of)) -> JSONResponse:
        return await tokenizer_call("detokenize", http_request, tenant)

    @app.get("/v1/usage")
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
        table = await asyncio.to_thread(read_usage, usage_dir)
        return summarize(table, tenant=who, application=application, since=start, until=end)

    async def client_request(http_request: Request, kind: RequestKind, tenant: Tenant) -> ClientRequest:
        """The body, checked only as far as routing needs; a refused body still leaves its record."""
        try:
            return ClientRequest.of(kind, await json_object(http_request))
        except OpenAIError as error:
            trace = RequestTrace(
                observe, request_id_of(http_request), application, "-", stream=False, tenant=tenant.name
            )
            trace.finish(error.status_code)
            raise

    @app.post("/v1/completions", response_model=None)
    async def completions(http_request: Request, tenant: Tenant = Depends(tenant_of)):
        """vLLM's CompletionRequest: every field `vllm serve` takes, with its defaults."""
        request = await client_request(http_request, "completion", tenant)
        return await generate(http_request, request, "cmpl", tenant)

    @app.post("/v1/responses", response_model=None)
    async def responses(http_request: Request, tenant: Tenant = Depends(tenant_of)):
        """vLLM's ResponsesRequest, stateless (no previous_response_id or background): text, streaming, tools."""
        request = await client_request(http_request, "responses", tenant)
        return await generate(http_request, request, "resp", tenant)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(http_request: Request, tenant: Tenant = Depends(tenant_of)):
        """vLLM's ChatCompletionRequest: tools, response_format, logprobs, n and the rest, as `vllm serve`."""
        request = await client_request(http_request, "chat", tenant)
        return await generate(http_request, request, "chatcmpl", tenant)

    return app


@serve.deployment(name="ingress", ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Ingress:
    """user_config (see models.config.IngressConfig) carries traffic weights: no restart to change them."""

    def __init__(
        self,
        router: DeploymentHandle,
        tokenizer: DeploymentHandle,
        postprocess: DeploymentHandle,
        auth: AuthConfig,
        usage: UsageConfig,
        quota: DeploymentHandle | None = None,
    ):
        self._stages = HandleStages(router, tokenizer, postprocess)
        self._telemetry = RequestTelemetry()
        self._tenants = TenantDirectory(auth)
        self._quotas = HandleQuotas(quota) if quota is not None else None
        self._usage = UsageLog(usage, serve.get_replica_context().replica_id.unique_id)

    def _observe(self, record: RequestRecord) -> None:
        self._usage.write(UsageRecord.of(record))
        self._telemetry.observe(record)

    async def reconfigure(self, user_config: dict) -> None:
        config = IngressConfig.model_validate(user_config)
        await self._stages.set_traffic(config.traffic)
        logger.info("traffic weights now %s", config.traffic)

    def __serve_build_asgi_app__(self) -> FastAPI:
        application = serve.get_replica_context().app_name
        return build_openai_app(
            self._stages,
            application,
            self._observe,
            tenants=self._tenants,
            quotas=self._quotas,
            usage_dir=self._usage.directory,
        )

    def __del__(self) -> None:
        """Serve's graceful shutdown: the open usage segment becomes Parquet now."""
        usage = getattr(self, "_usage", None)
        if usage is not None:
            usage.close()
