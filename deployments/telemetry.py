"""Per-request metrics (Prometheus, through Ray's metrics export) and the JSON access log.

The ingress builds one RequestRecord per finished request and hands it to an observer;
`RequestTelemetry` is the observer the Serve deployment uses. Engine-side series (queue,
running, KV cache) come from vLLM's own Ray stat logger in the engine stage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from pydantic import BaseModel

from servegraph.deployments.errors import as_openai_error
from servegraph.deployments.messages import ResponseChunk
from servegraph.models.config import AuthConfig

# A child of Serve's logger, so lines land in the replica's log file in Serve's encoding
# (JSON when the Serve config's logging_config says so) with Serve's request_id attached.
ACCESS_LOGGER_NAME = "ray.serve.servegraph.access"
DEFAULT_TENANT = "default"  # the caller when auth is off
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
TOKEN_TIME_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28]
REQUEST_TAGS = ("application", "model", "version", "tenant")


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request, as the client saw it."""

    request_id: str
    application: str
    model: str
    version: str
    status: int
    stream: bool
    latency_s: float
    tenant: str = DEFAULT_TENANT
    served_by: str = "-"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    engine_s: float | None = None
    finish_reason: str | None = None
    prompt: str | None = None
    completion: str | None = None
    cached: bool = False  # answered from the ingress's response cache, not by the engine

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.completion_tokens - 1)

    @property
    def graph_s(self) -> float | None:
        """Time the request spent outside the engine: HTTP, hops, tokenization, postprocessing."""
        return None if self.engine_s is None else max(self.latency_s - self.engine_s, 0.0)


OTHER_LABEL = "other"


@dataclass(frozen=True)
class MetricLabels:
    """The values metric labels may take: configured models and tenants only.

    The model name is whatever the client sent; as a label it would let any caller create
    series without bound. Names outside the configuration share one label, `other`.
    """

    models: frozenset[str]
    tenants: frozenset[str]

    @classmethod
    def of(cls, model_names: frozenset[str], auth: AuthConfig) -> MetricLabels:
        return cls(frozenset(model_names), frozenset({DEFAULT_TENANT, *(spec.name for spec in auth.tenants)}))

    def model(self, name: str) -> str:
        return name if name in self.models else OTHER_LABEL

    def tenant(self, name: str) -> str:
        return name if name in self.tenants else OTHER_LABEL

    def tags(self, record: RequestRecord) -> dict[str, str]:
        return {
            "application": record.application,
            "model": self.model(record.model),
            "version": record.version,
            "tenant": self.tenant(record.tenant),
        }


class RequestTelemetry:
    """Records RequestRecords as Ray metrics and one access-log line each."""

    def __init__(self, labels: MetricLabels) -> None:
        from ray.util import metrics

        def histogram(name: str, description: str, buckets: list[float]) -> metrics.Histogram:
            return metrics.Histogram(name, description, boundaries=buckets, tag_keys=REQUEST_TAGS)

        def counter(name: str, description: str, extra_tags: tuple[str, ...] = ()) -> metrics.Counter:
            return metrics.Counter(name, description, tag_keys=REQUEST_TAGS + extra_tags)

        self._requests = counter(
            "servegraph_requests", "Finished requests by HTTP status and what served them.", ("status", "served_by")
        )
        self._prompt_tokens = counter("servegraph_prompt_tokens", "Prompt tokens of finished requests.")
        self._completion_tokens = counter("servegraph_completion_tokens", "Completion tokens of finished requests.")
        self._latency = histogram("servegraph_e2e_latency_seconds", "End-to-end request latency.", LATENCY_BUCKETS_S)
        self._ttft = histogram("servegraph_ttft_seconds", "Time to first streamed token.", LATENCY_BUCKETS_S)
        self._tpot = histogram(
            "servegraph_tpot_seconds", "Time per output token after the first.", TOKEN_TIME_BUCKETS_S
        )
        self._engine = histogram("servegraph_engine_time_seconds", "Time inside the vLLM engine.", LATENCY_BUCKETS_S)
        self._graph = histogram("servegraph_graph_time_seconds", "Time outside the engine.", LATENCY_BUCKETS_S)
        self._log = logging.getLogger(ACCESS_LOGGER_NAME)
        self._labels = labels

    def observe(self, record: RequestRecord) -> None:
        tags = self._labels.tags(record)
        self._requests.inc(1, {**tags, "status": str(record.status), "served_by": record.served_by})
        self._latency.observe(record.latency_s, tags)
        if record.prompt_tokens:
            self._prompt_tokens.inc(record.prompt_tokens, tags)
        if record.completion_tokens:
            self._completion_tokens.inc(record.completion_tokens, tags)
        for histogram, value in [
            (self._ttft, record.ttft_s),
            (self._tpot, record.tpot_s),
            (self._engine, record.engine_s),
            (self._graph, record.graph_s),
        ]:
            if value is not None:
                histogram.observe(value, tags)
        self._log.info("request finished", extra={"servegraph": asdict(record)})


class CacheTelemetry:
    """The response cache's hits, misses, evictions and size as Ray metrics (a response_cache.CacheListener).

    Size is a gauge per ingress replica (each keeps its own cache); labels come from the
    configuration only, as for requests.
    """

    def __init__(self, application: str, replica: str, labels: MetricLabels) -> None:
        from ray.util import metrics

        lookup_tags = ("application", "model", "tenant")
        self._hits = metrics.Counter(
            "servegraph_response_cache_hits", "Requests answered from the response cache.", tag_keys=lookup_tags
        )
        self._misses = metrics.Counter(
            "servegraph_response_cache_misses",
            "Cacheable requests the cache did not answer (absent, expired, or Cache-Control: no-cache/no-store).",
            tag_keys=lookup_tags,
        )
        self._evictions = metrics.Counter(
            "servegraph_response_cache_evictions",
            "Entries dropped: size (LRU), expired (TTL), invalidated (the model's traffic changed).",
            tag_keys=("application", "model", "reason"),
        )
        self._bytes = metrics.Gauge(
            "servegraph_response_cache_bytes", "Bytes held by one ingress replica's response cache.",
            tag_keys=("application", "replica"),
        )  # fmt: skip
        self._entries = metrics.Gauge(
            "servegraph_response_cache_entries", "Entries in one ingress replica's response cache.",
            tag_keys=("application", "replica"),
        )  # fmt: skip
        self._application = application
        self._replica = replica
        self._labels = labels

    def _lookup_tags(self, model: str, tenant: str) -> dict[str, str]:
        labels = self._labels
        return {"application": self._application, "model": labels.model(model), "tenant": labels.tenant(tenant)}

    def hit(self, model: str, tenant: str) -> None:
        self._hits.inc(1, self._lookup_tags(model, tenant))

    def miss(self, model: str, tenant: str) -> None:
        self._misses.inc(1, self._lookup_tags(model, tenant))

    def evicted(self, model: str, reason: str) -> None:
        tags = {"application": self._application, "model": self._labels.model(model), "reason": reason}
        self._evictions.inc(1, tags)

    def resized(self, nbytes: int, entries: int) -> None:
        tags = {"application": self._application, "replica": self._replica}
        self._bytes.set(nbytes, tags)
        self._entries.set(entries, tags)


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away; OpenAI has none


def status_of(exc: BaseException) -> int:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return CLIENT_CLOSED_REQUEST
    return as_openai_error(exc).status_code


@dataclass
class RequestTrace:
    """Follows one request from arrival to its single RequestRecord."""

    observe: Callable[[RequestRecord], None]
    request_id: str
    application: str
    model: str
    stream: bool
    version: str = "-"
    tenant: str = DEFAULT_TENANT
    served_by: str = "-"
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    prompt: str | None = None
    completion_parts: list[str] | None = None
    cached: bool = False

    def served(self, served_by: str, version: str, log_payloads: bool, request: BaseModel) -> None:
        """Only a model whose spec says log_payloads gets its text into the record."""
        self.served_by, self.version = served_by, version
        if log_payloads:
            self.prompt = request.prompt_json()
            self.completion_parts = []

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def text(self, chunk: ResponseChunk) -> None:
        if self.completion_parts is not None:
            self.completion_parts.append(chunk.text)

    def finish(self, status: int, last: ResponseChunk | None = None) -> None:
        self.observe(
            RequestRecord(
                request_id=self.request_id,
                application=self.application,
                model=self.model,
                version=self.version,
                tenant=self.tenant,
                served_by=self.served_by,
                status=status,
                stream=self.stream,
                latency_s=time.perf_counter() - self.started,
                prompt_tokens=last.prompt_tokens if last else 0,
                completion_tokens=last.completion_tokens if last else 0,
                ttft_s=None if self.first_token_at is None else self.first_token_at - self.started,
                engine_s=last.engine_seconds if last else None,
                finish_reason=last.finish_reason if last else None,
                prompt=self.prompt,
                completion=None if self.completion_parts is None else "".join(self.completion_parts),
                cached=self.cached,
            )
        )
