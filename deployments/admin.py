"""Admin application: what the LLM application's models and engines are doing."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from servegraph.deployments.api_docs import error_responses, install_docs
from servegraph.deployments.auth import Tenant, require_admin
from servegraph.deployments.errors import OpenAIError
from servegraph.deployments.front_door import FrontDoor, TenantDirectory, tenant_of
from servegraph.deployments.http_errors import install_error_handlers
from servegraph.deployments.messages import ModelRoute
from servegraph.models.config import AuthConfig
from servegraph.models.spec import NAME_PATTERN

ADMIN_MAX_BODY_BYTES = 64 << 10  # its routes take no bodies


class AdapterAdd(BaseModel):
    """POST /admin/adapters: a LoRA adapter for a model whose config has `lora`, by directory."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The base model's name.")
    name: str = Field(pattern=NAME_PATTERN, max_length=64, description="The name requests use.")
    path: str = Field(min_length=1, description="A PEFT adapter directory, readable on every engine node.")
    version: str | None = Field(None, description="The base model's version; default its first.")


def adapter_view(route: ModelRoute) -> dict[str, Any]:
    adapter = route.adapter
    assert adapter is not None
    source = adapter.source.path if adapter.source.path is not None else "build"
    return {"name": route.model, "model": adapter.base_model, "version": route.version, "engine": route.engine,
            "lora_id": adapter.lora_id, "source": source}  # fmt: skip


async def no_request_bodies() -> dict[str, Any]:
    """The admin routes take no bodies: nothing to add to the document."""
    return {}


def build_admin_app(llm_app: str, tenants: TenantDirectory) -> FastAPI:
    """Health is open; everything else needs an admin tenant's key (unless auth is off)."""

    async def admin_only(http_request: Request) -> Tenant:
        return require_admin(await tenant_of(http_request))

    app = FastAPI(title="servegraph admin", openapi_url=None, docs_url=None, redoc_url=None)
    app.add_middleware(FrontDoor, directory=tenants, max_body_bytes=ADMIN_MAX_BODY_BYTES)
    install_docs(app, tenants.docs, no_request_bodies)
    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/engines", dependencies=[Depends(admin_only)], responses=error_responses(401, 403))
    async def engines() -> dict[str, dict]:
        """Counters of one replica of each engine deployment (aborted requests, tokens, unfinished).

        An engine scaled to zero reports only that: asking it would start it.
        """
        engines = await serve.get_deployment_handle("router", app_name=llm_app).engine_names.remote()
        deployments = (await asyncio.to_thread(serve.status)).applications[llm_app].deployments
        running = {name: deployments[name].replica_states.get("RUNNING", 0) for name in engines}
        return {
            engine: await serve.get_deployment_handle(engine, app_name=llm_app).stats.remote()
            if running[engine]
            else {"running_replicas": 0}
            for engine in sorted(engines)
        }

    @app.get("/quotas", dependencies=[Depends(admin_only)], responses=error_responses(401, 403, 404))
    async def quotas() -> dict[str, dict[str, int]]:
        """Each limited tenant's minute: requests and tokens counted, tokens reserved, requests in flight."""
        deployments = (await asyncio.to_thread(serve.status)).applications[llm_app].deployments
        if "quota" not in deployments:
            raise OpenAIError(f"`{llm_app}` has no tenant with limits.", code="not_found", status_code=404)
        return await serve.get_deployment_handle("quota", app_name=llm_app).snapshot.remote()

    @app.get("/adapters", dependencies=[Depends(admin_only)], responses=error_responses(401, 403))
    async def adapters() -> list[dict[str, Any]]:
        """The LoRA adapters served now: configured and added at runtime."""
        return [adapter_view(route) for route in await router().adapters.remote()]

    @app.post(
        "/adapters",
        status_code=201,
        dependencies=[Depends(admin_only)],
        responses=error_responses(400, 401, 403, 404),
    )
    async def add_adapter(body: AdapterAdd) -> dict[str, Any]:
        """Adds an adapter without restarting any engine: one engine replica loads it first (404 if its
        files are missing, 400 if vLLM refuses them), then the router serves it; ingress replicas learn
        of it on the first request naming it."""
        route = await router().new_adapter.remote(body.model, body.name, body.path, body.version)
        engine = serve.get_deployment_handle(route.engine, app_name=llm_app)
        loaded = await engine.options(multiplexed_model_id=route.adapter.multiplexed_id).load_adapter.remote(
            route.adapter
        )
        await router().add_adapter.remote(route)
        return {**adapter_view(route), "loaded_on": loaded["replica"]}

    @app.delete("/adapters/{name}", dependencies=[Depends(admin_only)], responses=error_responses(401, 403, 404))
    async def remove_adapter(name: str) -> dict[str, Any]:
        """Stops routing to the adapter (ingress copies catch up within seconds); engines drop it as
        they load others (least recently used first)."""
        adapter = await router().remove_adapter.remote(name)
        return {"name": name, "model": adapter.base_model, "deleted": True}

    def router():
        return serve.get_deployment_handle("router", app_name=llm_app)

    return app


@serve.deployment(name="admin")  # options: graphs/builder.py
@serve.ingress()
class Admin:
    def __init__(self, llm_app: str, auth: AuthConfig) -> None:
        self._llm_app = llm_app
        self._tenants = TenantDirectory(auth)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_admin_app(self._llm_app, self._tenants)
