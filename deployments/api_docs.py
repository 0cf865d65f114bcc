"""The API's OpenAPI document and docs page: every status the API answers, and vLLM's request bodies.

Routes read their bodies themselves (the ingress never imports vLLM), so FastAPI alone would
document no bodies. The request schemas are vLLM's own models, made once by the tokenizer
stage and fetched on the first request for the document; every error status is documented
with OpenAI's error body. The docs routes are off, or answered behind a key or publicly
(front_door.py), as the config says.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse

from servegraph.deployments.protocol import ErrorBody
from servegraph.models.config import DocsAccess

ERROR_STATUSES: dict[int, str] = {
    400: "The request is invalid: a field vLLM refuses, a limit passed, unparseable JSON.",
    401: "No valid credentials.",
    403: "The tenant may not use this model, or this needs an admin tenant.",
    404: "No such model (or route).",
    413: "The body is larger than the server's limit.",
    429: "The tenant is over its quota; see Retry-After.",
    500: "The engine crashed while running this request (it is not retried).",
    502: "An external upstream failed.",
    503: "Overloaded, starting or unavailable; see Retry-After.",
    504: "The model's deadline passed.",
}
GENERATION_STATUSES = tuple(ERROR_STATUSES)
# One server-sent event: `data` is a JSON chunk (or [DONE]); the Responses API also names each `event`.
SSE_EVENT = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
    "required": ["data"],
}
MODEL_STATUSES = (400, 401, 403, 404, 413, 500, 503)  # tokenize, detokenize, model lookups


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": ERROR_STATUSES[status]} for status in statuses}


def generation_responses() -> dict[int | str, dict[str, Any]]:
    """200 as JSON, or as server-sent events when the request says `stream`; every error status."""
    ok = {
        "description": "The response; with `stream: true`, server-sent events ending in `data: [DONE]`.",
        "content": {"application/json": {}, "text/event-stream": {"schema": SSE_EVENT}},
    }
    return {200: ok, **error_responses(*GENERATION_STATUSES)}


def openapi_document(app: FastAPI, root_path: str, schemas: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document with each generation route's body as vLLM validates it."""
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    if root_path:
        document["servers"] = [{"url": root_path}]
    components = document.setdefault("components", {}).setdefault("schemas", {})
    components.update(copy.deepcopy(schemas.get("components", {})))
    for path, body_schema in schemas.get("bodies", {}).items():
        operation = document["paths"].get(path, {}).get("post")
        if operation is not None:
            content = {"application/json": {"schema": body_schema}}
            operation["requestBody"] = {"required": True, "content": content}
    return document


def install_docs(app: FastAPI, docs: DocsAccess, body_schemas: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """/openapi.json and /docs, unless the docs are off; body_schemas is asked once, on first use."""
    if docs == "off":
        return
    made: list[dict[str, Any]] = []

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        if not made:
            made.append(openapi_document(app, request.scope.get("root_path", ""), await body_schemas()))
        return JSONResponse(made[0])

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json", title=app.title)
