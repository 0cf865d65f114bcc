"""Tenants and API keys: who is calling, and which models it may use.

Keys are kept only as SHA-256 hashes and compared in constant time; a key read from an
environment variable or a file is hashed at load and the plain text dropped. Backends
(static keys, JWTs in jwt_auth.py, a team's own) sit behind one small interface,
`Authenticator`, chosen in the config.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from servegraph.deployments.errors import AdminRequiredError, AuthenticationError, PermissionDeniedError
from servegraph.models.config import AuthConfig, PriorityClass, TenantLimits, TenantSpec
from servegraph.models.spec import imported

BEARER = "bearer "


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    models: frozenset[str]  # model (or upstream) names; "*" for all
    admin: bool = False
    limits: TenantLimits = TenantLimits()
    priority: PriorityClass = PriorityClass.interactive

    @classmethod
    def of(cls, spec: TenantSpec) -> Tenant:
        return cls(spec.name, frozenset(spec.models), spec.admin, spec.limits, spec.priority)

    def allows(self, model: str) -> bool:
        """model: a model's name, never an alias, so every alias of a model is allowed with it."""
        return "*" in self.models or model in self.models


OPEN_TENANT = Tenant("default", frozenset({"*"}), admin=True)


def tenant_key_hashes(spec: TenantSpec, environ: Mapping[str, str]) -> list[str]:
    keys: list[str] = []
    if spec.keys_env:
        keys += environ.get(spec.keys_env, "").split(",")
    if spec.keys_file:
        keys += Path(spec.keys_file).read_text().splitlines()
    return [*spec.key_hashes, *(hash_key(key.strip()) for key in keys if key.strip())]


class Authenticator(Protocol):
    """An auth backend: a bearer token to its tenant, or AuthenticationError.

    A team plugs in its own (`auth.authenticator: module:Class` in the config, constructed
    with the AuthConfig); `Tenant.of(spec)` turns the config's tenants into what it returns.
    """

    async def authenticate(self, token: str) -> Tenant: ...


class KeyAuthenticator:
    """Static API keys, kept as SHA-256 hashes; every entry is compared, so the time says nothing of which matched."""

    def __init__(self, config: AuthConfig, environ: Mapping[str, str] = os.environ) -> None:
        self._by_hash: list[tuple[bytes, Tenant]] = []
        for spec in config.tenants:
            tenant = Tenant.of(spec)
            for key_hash in tenant_key_hashes(spec, environ):
                self._by_hash.append((key_hash.encode(), tenant))

    async def authenticate(self, token: str) -> Tenant:
        presented = hash_key(token).encode()
        found: Tenant | None = None
        for key_hash, tenant in self._by_hash:
            if hmac.compare_digest(presented, key_hash):
                found = tenant
        if found is None:
            raise AuthenticationError("Incorrect API key provided.")
        return found


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


def load_authenticator(import_path: str, config: AuthConfig) -> Authenticator:
    """A team's own backend, named `module:Class` in the config."""
    backend = imported(import_path)(config)
    if not callable(getattr(backend, "authenticate", None)):
        raise TypeError(f"{import_path} has no authenticate(token) method")
    return backend


def require_admin(tenant: Tenant) -> Tenant:
    if not tenant.admin:
        raise AdminRequiredError(f"Tenant `{tenant.name}` is not an admin tenant.")
    return tenant


def model_not_allowed(tenant: Tenant, model: str) -> PermissionDeniedError:
    return PermissionDeniedError(f"Tenant `{tenant.name}` may not use the model `{model}`.", param="model")
