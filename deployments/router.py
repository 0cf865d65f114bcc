"""Router stage: served names to model versions, traffic splits and fallback chains."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace

from ray import serve

from servegraph.deployments.errors import BadRequestError, ModelNotFoundError, OpenAIError, model_not_found
from servegraph.deployments.messages import LoraAdapter, ModelRoute
from servegraph.deployments.protocol import ModelCard, ModelList
from servegraph.deployments.stage_process import drop_serve_access_lines
from servegraph.models.spec import CircuitBreakerConfig, LoraAdapterSpec, ModelSpec, UpstreamSpec

logger = logging.getLogger("ray.serve.servegraph.router")

TrafficWeights = Mapping[str, Mapping[str, float]]  # model name -> version -> weight


@dataclass(frozen=True)
class Link:
    """One target of a fallback chain: a model version or an upstream, with its breaker settings."""

    target: ModelRoute | UpstreamSpec
    breaker: CircuitBreakerConfig

    @property
    def name(self) -> str:
        """What its circuit breaker is named after: one engine deployment, or one upstream."""
        target = self.target
        return target.engine if isinstance(target, ModelRoute) else f"upstream:{target.name}"

    @property
    def served_by(self) -> str:
        target = self.target
        return target.served_by if isinstance(target, ModelRoute) else f"{target.name}@upstream"

    @property
    def model(self) -> str:
        return self.target.model if isinstance(self.target, ModelRoute) else self.target.name


def route_of(spec: ModelSpec) -> ModelRoute:
    bounds = spec.autoscaling
    return ModelRoute(
        model=spec.name,
        version=spec.version,
        engine=spec.engine_deployment_name,
        log_payloads=spec.log_payloads,
        timeout_s=spec.request_timeout_s,
        default_max_tokens=spec.default_max_tokens,
        cold_start_timeout_s=bounds.cold_start_timeout_s if bounds.min_replicas == 0 else None,
    )


def session_point(session_key: str) -> float:
    """A stable point in [0, 1) per session: the same user lands on the same version."""
    digest = hashlib.sha256(session_key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class TrafficSplit:
    """Picks a version by weight; sticky per session key while the weights stay the same.

    Versions keep their config order on the unit interval, so moving weight from one version
    to the next moves only the sessions at the boundary.
    """

    def __init__(self, weights: Mapping[str, float]) -> None:
        total = sum(weights.values())
        if total <= 0:
            raise ValueError("traffic weights must add up to more than 0")
        self._cumulative: list[tuple[float, str]] = []
        running = 0.0
        for version, weight in weights.items():
            if weight > 0:
                running += weight / total
                self._cumulative.append((running, version))

    def pick(self, session_key: str | None) -> str:
        point = session_point(session_key) if session_key else random.random()
        return next((version for bound, version in self._cumulative if point < bound), self._cumulative[-1][1])


def lora_id_of(source: LoraAdapterSpec, salt: str = "") -> int:
    """vLLM's lora_int_id for an adapter: a hash of what it is (name, path or recipe), so every
    router incarnation gives a configured adapter the same id; salt makes a re-added one new."""
    digest = hashlib.sha256(f"{source.model_dump_json()}|{salt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1) + 1


class AdapterConflictError(OpenAIError):
    status_code = 409


class ModelRegistry:
    """Every served name (name, alias or LoRA adapter) of a graph's models, their versions and fallbacks.

    revision changes with every adapter added or removed at runtime (and per router
    incarnation), so ingress copies know when theirs is stale (RegistryCopy).
    """

    def __init__(self, specs: list[ModelSpec], upstreams: list[UpstreamSpec] | None = None) -> None:
        self._versions: dict[str, dict[str, ModelSpec]] = {}
        for spec in specs:
            self._versions.setdefault(spec.name, {})[spec.version] = spec
        self._names = {served: spec.name for spec in specs for served in (spec.name, *spec.aliases)}
        self._upstreams = {upstream.name: upstream for upstream in upstreams or []}
        self._routes = {(spec.name, spec.version): route_of(spec) for spec in specs}
        self._adapters: dict[str, ModelRoute] = {}  # adapter name -> its route (on its base version's engine)
        for spec in specs:
            for source in spec.lora.adapters if spec.lora else []:
                adapter = LoraAdapter(source, lora_id_of(source), spec.name)
                self._adapters[source.name] = self._adapter_route(adapter, spec.version)
        self._incarnation = uuid.uuid4().hex[:8]
        self._changes = 0
        self._splits: dict[str, TrafficSplit] = {}
        self.set_traffic({})

    @property
    def revision(self) -> str:
        return f"{self._incarnation}:{self._changes}"

    def new_adapter(self, model: str, name: str, path: str, version: str | None = None) -> ModelRoute:
        """The route of a new adapter of `model` (its first version unless named), not registered
        yet: the admin API has an engine load it first. 404/400/409 for what cannot be."""
        versions = self._versions.get(model)
        if versions is None:
            raise model_not_found(model, list(self._versions))
        version = version or next(iter(versions))
        spec = versions.get(version)
        if spec is None:
            raise ModelNotFoundError(f"Model `{model}` has no version `{version}`.", param="version")
        if spec.lora is None:
            raise BadRequestError(f"Model `{model}` serves no LoRA adapters (its config has no `lora`).", param="model")
        self._check_name_free(name)
        source = LoraAdapterSpec(name=name, path=path)
        used = {route.adapter.lora_id for route in self._adapters.values() if route.adapter is not None}
        salt = 0
        while (lora_id := lora_id_of(source, f"{time.time_ns()}-{salt}")) in used:
            salt += 1
        return self._adapter_route(LoraAdapter(source, lora_id, model), version)

    def add_adapter(self, route: ModelRoute) -> None:
        assert route.adapter is not None
        self._check_name_free(route.model)
        self._adapters[route.model] = route
        self._changes += 1

    def remove_adapter(self, name: str) -> LoraAdapter:
        route = self._adapters.pop(name, None)
        if route is None or route.adapter is None:
            raise model_not_found(name, list(self._adapters))
        self._changes += 1
        return route.adapter

    def adapters(self) -> list[ModelRoute]:
        return list(self._adapters.values())

    def _adapter_route(self, adapter: LoraAdapter, version: str) -> ModelRoute:
        return replace(self._routes[(adapter.base_model, version)], model=adapter.name, adapter=adapter)

    def _check_name_free(self, name: str) -> None:
        if name in self._names or name in self._upstreams or name in self._adapters:
            raise AdapterConflictError(f"The name `{name}` is already served.", param="name", code="name_taken")

    def set_traffic(self, traffic: TrafficWeights) -> None:
        """New weights; a model with none sends everything to its first listed version."""
        for model, weights in traffic.items():
            unknown = sorted(set(weights) - set(self._versions.get(model, {})))
            if model not in self._versions or unknown:
                raise ValueError(f"traffic names versions that are not deployed: {model} {unknown or ''}".strip())
        self._splits = {
            model: TrafficSplit(traffic.get(model) or {next(iter(versions)): 1.0})
            for model, versions in self._versions.items()
        }

    def model_name(self, served: str) -> str:
        name = self._names.get(served)
        if name is None:
            raise model_not_found(served, [*self._names, *self._adapters])
        return name

    def resolve(self, served: str, session_key: str | None = None) -> ModelRoute:
        adapter_route = self._adapters.get(served)
        if adapter_route is not None:  # an adapter lives on one version: no traffic split
            return adapter_route
        name = self.model_name(served)
        return self._routes[(name, self._splits[name].pick(session_key))]

    def link(self, served: str, session_key: str | None = None) -> Link:
        if served in self._upstreams:
            upstream = self._upstreams[served]
            return Link(upstream, upstream.circuit_breaker)
        route = self.resolve(served, session_key)
        return Link(route, self.spec(route).circuit_breaker)

    def chain(self, served: str, session_key: str | None = None) -> list[Link]:
        """The model's (or upstream's) link, then each of its fallbacks'."""
        primary = self.link(served, session_key)
        target = primary.target
        fallbacks = self.spec(target).fallbacks if isinstance(target, ModelRoute) else target.fallbacks
        return [primary, *(self.link(name, session_key) for name in fallbacks)]

    def spec(self, route: ModelRoute) -> ModelSpec:
        return self._versions[route.base_model][route.version]

    def engine_names(self) -> list[str]:
        return [route.engine for route in self._routes.values()]

    def model_list(self) -> ModelList:
        return ModelList(
            data=[
                ModelCard(
                    id=served,
                    root=name,
                    max_model_len=max(spec.max_model_len for spec in self._versions[name].values()),
                    versions=list(self._versions[name]),
                )
                for served, name in self._names.items()
            ]
            + [
                ModelCard(  # as vLLM lists adapters: `parent` is the base model
                    id=name,
                    root=name,
                    parent=route.base_model,
                    max_model_len=self.spec(route).max_model_len,
                    versions=[route.version],
                )  # fmt: skip
                for name, route in self._adapters.items()
            ]
            + [
                ModelCard(id=name, root=name, owned_by="upstream", max_model_len=None, versions=[])
                for name in self._upstreams
            ]
        )


RegistryFetch = Callable[[str | None], Awaitable["ModelRegistry | None"]]


class RegistryCopy:
    """An ingress's copy of the router's registry: no Ray hop per request, refreshed cheaply.

    fetch(revision) returns the router's registry when its revision differs, else None. The copy
    asks when a name is unknown (an adapter just added), at most once per `miss_interval_s`,
    waiting for the answer; and in the background at most once per `refresh_interval_s` while
    requests come (an adapter removed stops being routed within about that long).
    """

    def __init__(
        self,
        fetch: RegistryFetch,
        refresh_interval_s: float = 5.0,
        miss_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._refresh_interval_s = refresh_interval_s
        self._miss_interval_s = miss_interval_s
        self._clock = clock
        self._registry: ModelRegistry | None = None
        self._traffic: TrafficWeights = {}
        self._checked_at = 0.0
        self._missed_at = float("-inf")
        self._refreshing: asyncio.Task | None = None

    async def get(self) -> ModelRegistry:
        if self._registry is None:
            await self._refresh()
        elif self._clock() - self._checked_at >= self._refresh_interval_s and self._refreshing is None:
            self._refreshing = asyncio.create_task(self._refresh())
            self._refreshing.add_done_callback(self._refreshed)
        assert self._registry is not None
        return self._registry

    async def set_traffic(self, traffic: TrafficWeights) -> None:
        (await self.get()).set_traffic(traffic)
        self._traffic = traffic

    async def chain(self, model: str, session_key: str | None) -> list[Link]:
        registry = await self.get()
        try:
            return registry.chain(model, session_key)
        except ModelNotFoundError:
            if self._clock() - self._missed_at < self._miss_interval_s:
                raise
            self._missed_at = self._clock()
            if not await self._refresh():
                raise
        return (await self.get()).chain(model, session_key)

    async def _refresh(self) -> bool:
        """True when a newer registry replaced the copy."""
        self._checked_at = self._clock()
        fresh = await self._fetch(self._registry.revision if self._registry is not None else None)
        if fresh is None:
            return False
        fresh.set_traffic(self._traffic)
        self._registry = fresh
        return True

    def _refreshed(self, task: asyncio.Task) -> None:
        self._refreshing = None
        if not task.cancelled() and task.exception() is not None:  # the router restarting, say: keep the copy
            logger.warning("registry refresh failed: %r", task.exception())


@serve.deployment(name="router")  # options: graphs/builder.py
class Router:
    """Owns the registry; ingress replicas fetch a copy once and route in-process."""

    def __init__(self, specs: list[ModelSpec], upstreams: list[UpstreamSpec] | None = None) -> None:
        drop_serve_access_lines()
        self._registry = ModelRegistry(specs, upstreams)

    async def registry(self) -> ModelRegistry:
        return self._registry

    async def registry_if_changed(self, revision: str | None) -> ModelRegistry | None:
        """The registry, unless the caller's copy is of this revision (see RegistryCopy)."""
        return None if revision == self._registry.revision else self._registry

    async def engine_names(self) -> list[str]:
        return self._registry.engine_names()

    async def new_adapter(self, model: str, name: str, path: str, version: str | None = None) -> ModelRoute:
        """A new adapter's route, for the admin API to load on its engine before `add_adapter`."""
        return self._registry.new_adapter(model, name, path, version)

    async def add_adapter(self, route: ModelRoute) -> str:
        self._registry.add_adapter(route)
        logger.info("adapter %s added to %s (lora id %d)", route.model, route.engine, route.adapter.lora_id)
        return self._registry.revision

    async def remove_adapter(self, name: str) -> LoraAdapter:
        adapter = self._registry.remove_adapter(name)
        logger.info("adapter %s removed from %s", name, adapter.base_model)
        return adapter

    async def adapters(self) -> list[ModelRoute]:
        return self._registry.adapters()
