"""Router stage: served names to model versions, traffic splits and fallback chains."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass

from ray import serve

from servegraph.deployments.errors import model_not_found
from servegraph.deployments.messages import ModelRoute
from servegraph.deployments.protocol import ModelCard, ModelList
from servegraph.deployments.stage_process import drop_serve_access_lines
from servegraph.models.spec import CircuitBreakerConfig, ModelSpec, UpstreamSpec

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


class ModelRegistry:
    """Every served name (name or alias) of a graph's models, their versions and fallbacks."""

    def __init__(self, specs: list[ModelSpec], upstreams: list[UpstreamSpec] | None = None) -> None:
        self._versions: dict[str, dict[str, ModelSpec]] = {}
        for spec in specs:
            self._versions.setdefault(spec.name, {})[spec.version] = spec
        self._names = {served: spec.name for spec in specs for served in spec.served_names}
        self._upstreams = {upstream.name: upstream for upstream in upstreams or []}
        self._routes = {(spec.name, spec.version): route_of(spec) for spec in specs}
        self._splits: dict[str, TrafficSplit] = {}
        self.set_traffic({})

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
            raise model_not_found(served, list(self._names))
        return name

    def resolve(self, served: str, session_key: str | None = None) -> ModelRoute:
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
        return self._versions[route.model][route.version]

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
                ModelCard(id=name, root=name, owned_by="upstream", max_model_len=None, versions=[])
                for name in self._upstreams
            ]
        )


@serve.deployment(name="router")  # options: graphs/builder.py
class Router:
    """Owns the registry; ingress replicas fetch a copy once and route in-process."""

    def __init__(self, specs: list[ModelSpec], upstreams: list[UpstreamSpec] | None = None) -> None:
        drop_serve_access_lines()
        self._registry = ModelRegistry(specs, upstreams)

    async def registry(self) -> ModelRegistry:
        return self._registry

    async def engine_names(self) -> list[str]:
        return self._registry.engine_names()
