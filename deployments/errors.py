"""Errors every stage can raise; the ingress turns them into OpenAI error bodies."""

from __future__ import annotations

from typing import Any


class OpenAIError(Exception):
    """An error with an HTTP status and the OpenAI error body's fields.

    Raised inside any deployment, it crosses Ray handles intact (see __reduce__) so the
    ingress answers with the status and message of the stage that found the problem.
    """

    status_code = 400
    error_type = "invalid_request_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.param, self.code, self.headers, self.status_code))

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


def _rebuild(
    cls: type[OpenAIError], message: str, param: str | None, code: str | None, headers: dict, status_code: int
) -> OpenAIError:
    return cls(message, param=param, code=code, headers=headers, status_code=status_code)


class BadRequestError(OpenAIError):
    status_code = 400


class ContextLengthExceededError(BadRequestError):
    default_code = "context_length_exceeded"


class PayloadTooLargeError(OpenAIError):
    status_code = 413
    default_code = "payload_too_large"


class AuthenticationError(OpenAIError):
    status_code = 401
    default_code = "invalid_api_key"


class PermissionDeniedError(OpenAIError):
    status_code = 403
    error_type = "permission_error"
    default_code = "model_not_allowed"


class AdminRequiredError(PermissionDeniedError):
    default_code = "admin_required"


class ModelNotFoundError(OpenAIError):
    status_code = 404
    default_code = "model_not_found"


class ServiceUnavailableError(OpenAIError):
    """Cannot serve now; the client should retry after the pause in Retry-After."""

    status_code = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **kwargs: Any) -> None:
        headers = kwargs.pop("headers", None) or {"Retry-After": str(max(1, round(retry_after_s)))}
        super().__init__(message, headers=headers, **kwargs)


class OverloadedError(ServiceUnavailableError):
    """A bounded queue is full: never an unbounded wait."""

    default_code = "overloaded"


class ModelStartingError(ServiceUnavailableError):
    """The model scaled to zero and its engine did not start within the cold-start bound."""

    default_code = "model_starting"


class ModelUnavailableError(ServiceUnavailableError):
    """The model's circuit breaker is open and no fallback could serve the request."""

    default_code = "model_unavailable"


class EngineUnavailableError(ServiceUnavailableError):
    """A replica on the request's path died (or is unreachable) before answering."""

    default_code = "engine_unavailable"


class UpstreamError(OpenAIError):
    """An external upstream could not be reached or failed (5xx)."""

    status_code = 502
    error_type = "upstream_error"
    default_code = "upstream_unavailable"


class RateLimitError(OpenAIError):
    """A tenant's own quota is used up: its problem, so never a reason to fall back."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class RequestTimeoutError(OpenAIError):
    status_code = 504
    error_type = "timeout_error"
    default_code = "timeout"


class InternalServerError(OpenAIError):
    status_code = 500
    error_type = "internal_server_error"


class EngineCrashedError(InternalServerError):
    """The engine process died while this request ran in it.

    The request may be what killed it (a poison request), so it is never retried on another
    replica or a fallback; the breaker still counts the failure and Serve replaces the replica.
    """

    default_code = "engine_crashed"


def model_not_found(served: str, available: list[str]) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"The model `{served}` does not exist. Available models: {', '.join(sorted(available))}.", param="model"
    )


def invalid_field(errors: list[dict[str, Any]], code: str | None = None) -> BadRequestError:
    """A 400 from pydantic's (or FastAPI's) validation errors: the first one, naming its field."""
    first = errors[0]
    if first.get("type") == "json_invalid":  # its location is a byte offset, not a field
        message = f"The request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        return BadRequestError(message, code=code)
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    return BadRequestError(f"{param}: {first['msg']}" if param else first["msg"], param=param, code=code)


def from_vllm_error(response: Any) -> OpenAIError:
    """vLLM's ErrorResponse (its serving classes return rather than raise them) as our error."""
    info = response.error
    status = int(info.code) if 400 <= int(info.code or 500) < 600 else 500
    error = OpenAIError(info.message, param=info.param, status_code=status, code=None)
    error.error_type = info.type
    return error


def as_openai_error(exc: BaseException) -> OpenAIError:
    """The OpenAIError behind exc, unwrapping Ray's task error; anything else becomes a 500."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, OpenAIError):
        return cause
    if isinstance(cause, BackPressureError):
        return OverloadedError(
            "The model is overloaded: its queue is full. Retry after the time in Retry-After.",
            retry_after_s=cause.retry_after_s or 1.0,
        )
    if isinstance(cause, RayActorError):
        return EngineUnavailableError(
            "A replica serving this request stopped before it finished; Serve is replacing it. Retry the request."
        )
    return InternalServerError(f"internal error: {type(exc).__name__}")
