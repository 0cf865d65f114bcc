"""The front door of every HTTP application: credentials first, then a bounded body.

`FrontDoor` is ASGI middleware, so it runs before any route, dependency or body parsing:
a request without valid credentials is answered 401 without a byte of its body read, and
nothing about it is metered. A body larger than the limit is refused 413 from its
Content-Length, or, sent chunked, as soon as the bytes read pass the limit.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from fastapi import Request

from servegraph.deployments.auth import (
    BEARER,
    OPEN_TENANT,
    Authenticator,
    KeyAuthenticator,
    Tenant,
    load_authenticator,
    looks_like_jwt,
)
from servegraph.deployments.errors import AuthenticationError, BadRequestError, OpenAIError, PayloadTooLargeError
from servegraph.deployments.http_errors import error_response
from servegraph.deployments.jwt_auth import JWTAuthenticator
from servegraph.models.config import AuthConfig

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEALTH_PATHS = frozenset({"/healthz"})
DOCS_PATHS = frozenset({"/docs", "/openapi.json"})  # api_docs.py
TENANT_STATE = "tenant"


class TenantDirectory:
    """An Authorization header to its tenant, through the configured backend; with auth off, everyone is `default`."""

    def __init__(self, config: AuthConfig, environ: Mapping[str, str] = os.environ) -> None:
        self.enabled = config.enabled
        self.docs = config.docs
        tenants = {spec.name: Tenant.of(spec) for spec in config.tenants}
        self._custom = load_authenticator(config.authenticator, config) if config.authenticator else None
        self._keys: Authenticator = KeyAuthenticator(config, environ)
        self._jwt: Authenticator | None = JWTAuthenticator(config.jwt, tenants) if config.jwt else None

    async def authenticate(self, authorization: str | None) -> Tenant:
        if not self.enabled:
            return OPEN_TENANT
        token = bearer_token(authorization)
        if self._custom is not None:
            return await self._custom.authenticate(token)
        if self._jwt is not None and looks_like_jwt(token):
            return await self._jwt.authenticate(token)
        return await self._keys.authenticate(token)

    def open_paths(self) -> frozenset[str]:
        """Routes answered without credentials: health always, the docs when configured public."""
        return HEALTH_PATHS | (DOCS_PATHS if self.docs == "public" or not self.enabled else frozenset())


def bearer_token(authorization: str | None) -> str:
    token = authorization[len(BEARER) :].strip() if authorization and authorization.lower().startswith(BEARER) else ""
    if not token:
        raise AuthenticationError("Missing API key: send `Authorization: Bearer <key>`.")
    return token


def route_path(scope: Scope) -> str:
    """The path inside the application: Serve mounts it under its route prefix (the ASGI root_path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def bounded(receive: Receive, limit: int) -> Receive:
    """receive, raising 413 once the body read passes limit (a chunked body has no Content-Length to check)."""
    read = 0

    async def receive_bounded() -> Message:
        nonlocal read
        message = await receive()
        if message["type"] == "http.request":
            read += len(message.get("body", b""))
            if read > limit:
                raise body_too_large(limit)
        return message

    return receive_bounded


def body_too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The request body is larger than this server's limit of {limit} bytes.")


class FrontDoor:
    """ASGI middleware: the caller's tenant (in request.state) before anything else runs, then the body bounded."""

    def __init__(
        self,
        app: ASGIApp,
        directory: TenantDirectory,
        max_body_bytes: int | None = None,
        path_body_limits: Mapping[str, int] | None = None,
    ) -> None:
        """path_body_limits: a limit of its own for a route whose bodies are meant to be larger (batch uploads)."""
        self.app = app
        self._directory = directory
        self._open_paths = directory.open_paths()
        self._max_body_bytes = max_body_bytes
        self._path_body_limits = dict(path_body_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            receive = await self._admit(scope, receive)
        except OpenAIError as error:
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _admit(self, scope: Scope, receive: Receive) -> Receive:
        path = route_path(scope)
        if path in self._open_paths:
            return receive
        tenant = await self._directory.authenticate(header(scope, b"authorization"))
        scope.setdefault("state", {})[TENANT_STATE] = tenant
        limit = self._path_body_limits.get(path, self._max_body_bytes)
        if limit is None:
            return receive
        length = header(scope, b"content-length")
        if length is None:
            return bounded(receive, limit)
        if not (length.isascii() and length.isdigit()):
            raise BadRequestError("The Content-Length header is not a number.")
        if int(length) > limit:
            raise body_too_large(limit)
        return receive


async def tenant_of(http_request: Request) -> Tenant:
    """The tenant FrontDoor found for this request (a FastAPI dependency).

    `async` so FastAPI calls it in the event loop: a plain function dependency runs in its
    thread pool, a thread hop on every request (about 5 % of the ingress's CPU under load).
    """
    return http_request.state.tenant
