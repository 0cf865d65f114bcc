"""Admin application: what the LLM application's models and engines are doing."""

from __future__ import annotations

import asyncio

from fastapi import Depends, FastAPI, Header
from ray import serve

from servegraph.deployments.auth import Tenant, TenantDirectory, require_admin
from servegraph.deployments.http_errors import install_error_handlers
from servegraph.models.config import AuthConfig


def build_admin_app(llm_app: str, tenants: TenantDirectory) -> FastAPI:
    """Health is open; everything else needs an admin tenant's key (unless auth is off)."""

    def admin_only(authorization: str | None = Header(None)) -> Tenant:
        return require_admin(tenants.authenticate(authorization))

    app = FastAPI(title="servegraph admin")
    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/engines", dependencies=[Depends(admin_only)])
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

    return app


@serve.deployment(name="admin")  # options: graphs/builder.py
@serve.ingress()
class Admin:
    def __init__(self, llm_app: str, auth: AuthConfig) -> None:
        self._llm_app = llm_app
        self._tenants = TenantDirectory(auth)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_admin_app(self._llm_app, self._tenants)
