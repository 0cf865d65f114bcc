"""JWT bearer tokens from a team's OAuth/OIDC provider: the auth backend beside static keys.

The provider's public keys come from a JWKS file or URL. A URL is fetched when a token names
a key id (`kid`) not seen yet, at most once per `refetch_interval_s`, so rotated keys are
picked up and a flood of made-up key ids cannot make this server hammer the provider. Only
asymmetric algorithms are accepted (models.config.JWT_ALGORITHMS): with a public JWKS, an
HMAC algorithm would let anyone who has the public key sign tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jwt

from servegraph.deployments.auth import Tenant
from servegraph.deployments.errors import AuthenticationError, ServiceUnavailableError
from servegraph.models.config import JWTConfig

JWKS_FETCH_TIMEOUT_S = 5.0
logger = logging.getLogger("ray.serve.servegraph.auth")


def fetch_jwks(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=JWKS_FETCH_TIMEOUT_S) as response:  # noqa: S310 (the config's URL)
        return json.loads(response.read())


def keys_by_id(jwks: dict[str, Any]) -> dict[str | None, jwt.PyJWK]:
    """Signing keys by kid; a set with one key also answers tokens that name none."""
    keys = {key.key_id: key for key in jwt.PyJWKSet.from_dict(jwks).keys if key.public_key_use in (None, "sig")}
    if len(keys) == 1:
        keys[None] = next(iter(keys.values()))
    return keys


class JWTAuthenticator:
    """A token's signature, expiry, issuer and audience checked; its tenant claim names a declared tenant."""

    def __init__(
        self,
        config: JWTConfig,
        tenants: Mapping[str, Tenant],
        fetch: Callable[[str], dict[str, Any]] = fetch_jwks,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._tenants = tenants
        self._fetch = fetch
        self._clock = clock
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        if config.jwks_file:
            self._keys = keys_by_id(json.loads(Path(config.jwks_file).read_text()))

    async def authenticate(self, token: str) -> Tenant:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("The bearer token is not a well-formed JWT.") from None
        key = await self._key(header.get("kid"))
        claims = self._verified_claims(token, key)
        name = claims.get(self._config.tenant_claim)
        tenant = self._tenants.get(name) if isinstance(name, str) else None
        if tenant is None:
            claim = self._config.tenant_claim
            raise AuthenticationError(f"The token's `{claim}` claim names no tenant of this server.")
        return tenant

    def _verified_claims(self, token: str, key: jwt.PyJWK) -> dict[str, Any]:
        config = self._config
        try:
            return jwt.decode(
                token,
                key,
                algorithms=config.algorithms,
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("The token has expired.") from None
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"The token is not valid: {exc}.") from None

    async def _key(self, kid: str | None) -> jwt.PyJWK:
        if kid not in self._keys and self._config.jwks_url and self._may_refetch():
            await self._refetch()
        if not self._keys:
            raise ServiceUnavailableError("The identity provider's keys could not be fetched yet.", retry_after_s=5)
        key = self._keys.get(kid)
        if key is None:
            raise AuthenticationError("The token is signed with a key this server does not know.")
        return key

    def _may_refetch(self) -> bool:
        """At most once per refetch_interval_s; every few seconds while no key has been fetched at all."""
        interval = self._config.refetch_interval_s if self._keys else min(self._config.refetch_interval_s, 5.0)
        return self._fetched_at is None or self._clock() - self._fetched_at >= interval

    async def _refetch(self) -> None:
        """The provider's current keys; kept as they were if it cannot be reached."""
        self._fetched_at = self._clock()
        try:
            self._keys = keys_by_id(await asyncio.to_thread(self._fetch, self._config.jwks_url))
        except (OSError, ValueError, TypeError, AttributeError, KeyError, jwt.PyJWTError):  # a broken JWKS too
            logger.warning("could not fetch the JWKS at %s", self._config.jwks_url, exc_info=True)
