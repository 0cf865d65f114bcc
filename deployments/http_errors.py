"""Every failure answered as OpenAI answers it: an error body with the right status, never a bare 500."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from servegraph.deployments.errors import BadRequestError, OpenAIError, as_openai_error, invalid_field
from servegraph.deployments.request_limits import parse_body

logger = logging.getLogger("servegraph.ingress")


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


def install_error_handlers(app: FastAPI, on_rejected: Callable[[Request, OpenAIError], None] | None = None) -> None:
    """Every failure, including FastAPI's own, answers with an OpenAI error body.

    on_rejected hears of requests refused before any handler ran (unparseable bodies).
    """

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    # Class-specific handlers answer in ExceptionMiddleware; the generic one below re-raises into
    # Serve, whose own backpressure handler would answer 503 in plain text.
    @app.exception_handler(BackPressureError)
    async def _overloaded(_: Request, exc: BackPressureError) -> JSONResponse:
        return error_response(as_openai_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = invalid_field(exc.errors(), code="invalid_request")
        if on_rejected is not None:
            on_rejected(request, error)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(OpenAIError(str(exc.detail), code=str(exc.status_code), status_code=exc.status_code))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        error = as_openai_error(exc)
        if error.status_code >= 500:
            logger.exception("request failed", exc_info=exc)
        return error_response(error)


async def json_object(http_request: Request) -> dict[str, Any]:
    """The body as a JSON object every stage can handle (request_limits.parse_body); 400 for anything else."""
    body = parse_body(await http_request.body())
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object.")
    return body
