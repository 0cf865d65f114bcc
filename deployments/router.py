"""Router stage: model names and aliases to the engine deployment that serves them."""

from __future__ import annotations

from ray import serve

from deployments.errors import ModelNotFoundError
from deployments.messages import ModelRoute
from deployments.protocol import ModelCard, ModelList
from models.spec import ModelSpec


class ModelRegistry:
    """Resolves every served name (name or alias) of a graph's models."""

    def __init__(self, specs: list[ModelSpec]) -> None:
        self._specs = {spec.name: spec for spec in specs}
        self._routes = {
            served: ModelRoute(
                spec.name, spec.version, spec.engine_deployment_name, spec.log_payloads, spec.request_timeout_s
            )
            for spec in specs
            for served in spec.served_names
        }

    def resolve(self, name: str) -> ModelRoute:
        route = self._routes.get(name)
        if route is None:
            raise ModelNotFoundError(
                f"The model `{name}` does not exist. Available models: {', '.join(sorted(self._routes))}.",
                param="model",
            )
        return route

    def engine_names(self) -> dict[str, str]:
        """Engine deployment name by model name."""
        return {name: spec.engine_deployment_name for name, spec in self._specs.items()}

    def model_list(self) -> ModelList:
        return ModelList(
            data=[
                ModelCard(id=served, root=spec.name, max_model_len=spec.max_model_len, version=spec.version)
                for spec in self._specs.values()
                for served in spec.served_names
            ]
        )


@serve.deployment(name="router", ray_actor_options={"num_cpus": 0})
class Router:
    def __init__(self, specs: list[ModelSpec]) -> None:
        self._registry = ModelRegistry(specs)

    async def registry(self) -> ModelRegistry:
        return self._registry

    async def resolve(self, name: str) -> ModelRoute:
        return self._registry.resolve(name)

    async def model_list(self) -> ModelList:
        return self._registry.model_list()

    async def engine_names(self) -> dict[str, str]:
        return self._registry.engine_names()
