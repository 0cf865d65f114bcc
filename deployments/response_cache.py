"""The ingress's exact response cache: a repeated deterministic request answered without the engine.

What is cached: requests of a tenant the config lists, on a local model (never an upstream, whose
answers we cannot vouch for), that ask for one choice (`n` absent or 1) and are deterministic:
`temperature` 0 (greedy decoding) or an integer `seed` (vLLM's per-request seeded sampling). A
request without `temperature` gets the model's default, which is not 0, so it is never cached.

The key (`cache_key`) is a SHA-256 over canonical JSON (sorted keys, no spaces) of:
- the tenant: entries are never shared across tenants, even for byte-identical bodies;
- the model version that will serve it (model, version, engine deployment): the traffic split has
  already picked the version, so a canary's answers never stand in for the stable version's;
- the endpoint (completions, chat, responses): one body means different things on each;
- the body, minus what cannot change the output. Only `user` is dropped: vLLM ignores it for
  generation, and the version it steers to is in the key already. Top-level nulls are dropped
  (the ingress's parser reads them as the default, see protocol.parse_vllm), and `stream` is
  normalised to a boolean. Everything else stays, including fields vLLM ignores: an unneeded
  field costs only hit rate, a missing one would return a wrong answer.

Streams and whole bodies are keyed apart (`stream` is in the key): a stream's events (chunking by
`stream_interval`, `stream_options`) cannot be rebuilt faithfully from a JSON body nor the other
way round, so each replays exactly what it sent the first time, with only the response id
replaced by the new request's.

Bounds: each ingress replica keeps its own cache, at most `max_bytes` of response bytes (plus a
fixed overhead per entry), least recently used out first; an entry older than `ttl_s` is never
returned; a response over `max_entry_bytes` is never stored. A model's entries go when its
traffic weights change (`invalidate`), and anything that changes a model's spec changes the app's
args, which restarts every ingress replica with an empty cache.

`Cache-Control: no-cache` skips the lookup but stores the fresh answer; `no-store` does neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from servegraph.deployments.messages import ModelRoute, ResponseChunk
from servegraph.deployments.protocol import ClientRequest
from servegraph.models.config import ResponseCacheConfig

logger = logging.getLogger("servegraph.ingress")

CACHE_HEADER = "X-Servegraph-Cache"  # `hit` or `miss` on every cacheable request
IGNORED_FIELDS = frozenset({"user"})  # body fields that cannot change the output (see the module doc)
ENTRY_OVERHEAD_BYTES = 256  # key, bookkeeping and object headers of one entry, counted against max_bytes

EvictionReason = Literal["size", "expired", "invalidated"]


def cache_directives(cache_control: str | None) -> tuple[bool, bool]:
    """(read, write) as the request's Cache-Control allows: no-cache skips reading, no-store both."""
    directives = {part.split("=", 1)[0].strip().lower() for part in (cache_control or "").split(",")}
    if "no-store" in directives:
        return False, False
    return "no-cache" not in directives, True


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_deterministic(body: Mapping[str, Any]) -> bool:
    """One choice, and greedy (temperature 0) or seeded: the same body gives the same output."""
    if body.get("n") not in (None, 1):
        return False
    temperature, seed = body.get("temperature"), body.get("seed")
    return (is_number(temperature) and temperature == 0) or (isinstance(seed, int) and not isinstance(seed, bool))


def cache_key(tenant: str, route: ModelRoute, request: ClientRequest) -> str:
    """SHA-256 of tenant, model version, endpoint and the output-changing body (see the module doc)."""
    body = {key: value for key, value in request.body.items() if value is not None and key not in IGNORED_FIELDS}
    body["stream"] = request.stream
    material = [tenant, route.model, route.version, route.engine, request.kind, body]
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class CachePlan:
    """What one cacheable request may do: its key, whether it may read and write, and the model's
    generation when it was planned (a store after the model was invalidated is refused)."""

    key: str
    model: str
    tenant: str
    read: bool
    write: bool
    generation: int


@dataclass(frozen=True)
class CachedResponse:
    """A response as it was sent: the JSON body (one item) or every SSE chunk of the stream."""

    model: str
    events: tuple[str, ...]
    response_id: str  # the id inside the events, replaced by each replay's own
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    text: str  # the completion text, kept only for models that log payloads
    stored_at: float
    nbytes: int

    @classmethod
    def of(
        cls, model: str, events: list[str], response_id: str, last: ResponseChunk, text: str, now: float
    ) -> CachedResponse:
        nbytes = ENTRY_OVERHEAD_BYTES + sum(len(event.encode()) for event in events) + len(text.encode())
        return cls(
            model=model,
            events=tuple(events),
            response_id=response_id,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            finish_reason=last.finish_reason,
            text=text,
            stored_at=now,
            nbytes=nbytes,
        )

    def chunks(self, response_id: str, billed: bool) -> list[ResponseChunk]:
        """The events again under a new response id; the last chunk carries the usage (zero if not billed)."""
        prompt, completion = (self.prompt_tokens, self.completion_tokens) if billed else (0, 0)
        *body, last = [event.replace(self.response_id, response_id) for event in self.events]
        return [ResponseChunk(event, 0, 0) for event in body] + [
            ResponseChunk(last, prompt, completion, self.finish_reason, finished=True, text=self.text)
        ]


class CacheListener(Protocol):
    """What the cache reports, for metrics (telemetry.CacheTelemetry in the ingress)."""

    def hit(self, model: str, tenant: str) -> None: ...
    def miss(self, model: str, tenant: str) -> None: ...
    def evicted(self, model: str, reason: EvictionReason) -> None: ...
    def resized(self, nbytes: int, entries: int) -> None: ...


class SilentListener:
    def hit(self, model: str, tenant: str) -> None:
        pass

    def miss(self, model: str, tenant: str) -> None:
        pass

    def evicted(self, model: str, reason: EvictionReason) -> None:
        pass

    def resized(self, nbytes: int, entries: int) -> None:
        pass


class ResponseCache:
    """Entries by key, least recently used first, bounded in bytes, each returned only within its TTL.

    Used from the ingress's event loop only, so it takes no locks.
    """

    def __init__(
        self,
        max_bytes: int,
        max_entry_bytes: int,
        ttl_s: float,
        listener: CacheListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_bytes = max_bytes
        self._max_entry_bytes = max_entry_bytes
        self._ttl_s = ttl_s
        self._listener = listener or SilentListener()
        self._clock = clock
        self._entries: OrderedDict[str, CachedResponse] = OrderedDict()
        self._generations: dict[str, int] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def now(self) -> float:
        return self._clock()

    def generation(self, model: str) -> int:
        return self._generations.get(model, 0)

    def get(self, plan: CachePlan) -> CachedResponse | None:
        """The live entry for plan's key (now the most recently used), or None; a bypassed read is a miss."""
        entry = self._entries.get(plan.key) if plan.read else None
        if entry is not None and self._clock() - entry.stored_at > self._ttl_s:
            self._drop(plan.key, "expired")
            entry = None
        if entry is None:
            self._listener.miss(plan.model, plan.tenant)
            return None
        self._entries.move_to_end(plan.key)
        self._listener.hit(plan.model, plan.tenant)
        return entry

    def put(self, plan: CachePlan, entry: CachedResponse) -> bool:
        """Stores entry unless plan may not write, it is too large, or its model was invalidated since."""
        if not plan.write or entry.nbytes > self._max_entry_bytes or plan.generation != self.generation(plan.model):
            return False
        if plan.key in self._entries:
            self._remove(plan.key)
        self._entries[plan.key] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self._max_bytes:
            self._drop(next(iter(self._entries)), "size")
        self._listener.resized(self.nbytes, len(self._entries))
        return True

    def invalidate(self, model: str) -> int:
        """Drops every entry of model, and refuses stores planned before now; returns how many went."""
        self._generations[model] = self.generation(model) + 1
        doomed = [key for key, entry in self._entries.items() if entry.model == model]
        for key in doomed:
            self._drop(key, "invalidated")
        self._listener.resized(self.nbytes, len(self._entries))
        return len(doomed)

    def _remove(self, key: str) -> CachedResponse:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        return entry

    def _drop(self, key: str, reason: EvictionReason) -> None:
        self._listener.evicted(self._remove(key).model, reason)


class StreamRecorder:
    """Collects a cacheable stream's chunks as they pass; stores them only if the stream completes.

    Past max_bytes (counted in characters, a lower bound on bytes) it stops collecting and
    drops what it had, so a long stream never piles up in memory for nothing.
    """

    def __init__(self, cache: IngressResponseCache, plan: CachePlan, response_id: str, max_bytes: int) -> None:
        self._cache = cache
        self._plan = plan
        self._response_id = response_id
        self._max_bytes = max_bytes
        self._events: list[str] | None = []
        self._texts: list[str] = []
        self._size = 0

    def add(self, chunk: ResponseChunk) -> None:
        if self._events is None:
            return
        self._size += len(chunk.data) + len(chunk.text)
        if self._size > self._max_bytes:
            self._events = None
            return
        self._events.append(chunk.data)
        if chunk.text:
            self._texts.append(chunk.text)

    def complete(self, last: ResponseChunk) -> bool:
        """Called once the stream's last event went out without an error; True if stored."""
        if self._events is None or not last.finished or last.error_status is not None:
            return False
        return self._cache.store_events(self._plan, self._events, self._response_id, last, "".join(self._texts))


async def replayed(chunks: list[ResponseChunk]) -> AsyncIterator[ResponseChunk]:
    for chunk in chunks:
        yield chunk


def changed_models(before: Mapping[str, Mapping[str, float]], after: Mapping[str, Mapping[str, float]]) -> set[str]:
    """Models whose traffic weights differ between two ingress configs (a model gained or lost counts)."""
    return {model for model in before.keys() | after.keys() if before.get(model) != after.get(model)}


class IngressResponseCache:
    """What the ingress asks of the cache: which requests it covers, their hits, stores and replays."""

    def __init__(
        self,
        config: ResponseCacheConfig,
        listener: CacheListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.cache = ResponseCache(config.max_bytes, config.max_entry_bytes, config.ttl_s, listener, clock)
        self._all_tenants = "*" in config.tenants
        self._tenants = frozenset(config.tenants)

    def plan(self, tenant: str, request: ClientRequest, target: object, cache_control: str | None) -> CachePlan | None:
        """The request's plan, or None when the cache does not cover it (tenant, upstream, not deterministic)."""
        if not isinstance(target, ModelRoute) or not (self._all_tenants or tenant in self._tenants):
            return None
        if not is_deterministic(request.body):
            return None
        read, write = cache_directives(cache_control)
        key = cache_key(tenant, target, request)
        return CachePlan(key, target.model, tenant, read, write, self.cache.generation(target.model))

    def lookup(self, plan: CachePlan) -> CachedResponse | None:
        return self.cache.get(plan)

    def replay(
        self, entry: CachedResponse, response_id: str, stream: bool
    ) -> ResponseChunk | AsyncIterator[ResponseChunk]:
        """The cached response under response_id: the whole body, or its stream's chunks."""
        chunks = entry.chunks(response_id, billed=self.config.bill_hits)
        return replayed(chunks) if stream else chunks[-1]

    def headers(self, plan: CachePlan, hit: CachedResponse | None) -> dict[str, str]:
        """`X-Servegraph-Cache: hit|miss`, and a hit's `Age` (seconds since it was stored)."""
        if hit is None:
            return {CACHE_HEADER: "miss"}
        return {CACHE_HEADER: "hit", "Age": str(int(self.cache.now() - hit.stored_at))}

    def store(self, plan: CachePlan, result: ResponseChunk, response_id: str) -> bool:
        """A whole (non-streamed) response, as the postprocess stage answered it."""
        return self.store_events(plan, [result.data], response_id, result, result.text)

    def store_events(
        self, plan: CachePlan, events: list[str], response_id: str, last: ResponseChunk, text: str
    ) -> bool:
        """Stores a served response; a failure here is logged and never fails the request it came from."""
        if not plan.write or last.finish_reason == "abort":
            return False
        try:
            entry = CachedResponse.of(plan.model, events, response_id, last, text, self.cache.now())
            return self.cache.put(plan, entry)
        except Exception:
            logger.exception("response cache: could not store the response of %s", response_id)
            return False

    def recorder(self, plan: CachePlan, response_id: str) -> StreamRecorder | None:
        """A stream's recorder, or None when the plan may not write (then the stream costs nothing extra)."""
        return StreamRecorder(self, plan, response_id, self.config.max_entry_bytes) if plan.write else None

    def traffic_changed(
        self, before: Mapping[str, Mapping[str, float]], after: Mapping[str, Mapping[str, float]]
    ) -> set[str]:
        """Empties the cache of every model whose weights changed; returns those models."""
        models = changed_models(before, after)
        for model in models:
            self.cache.invalidate(model)
        return models
