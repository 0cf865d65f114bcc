"""The OpenAI wire format: vLLM's own request models, parsed once at the ingress, and our model list.

Requests are vLLM's protocol models (`vllm serve` accepts the same bodies, with the same
defaults and the same 400s); they travel through the graph already parsed. Responses are
shaped by vLLM's serving classes in the postprocess stage. Only /v1/models, which lists
the graph's model versions, has a shape of its own.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from deployments.errors import BadRequestError, ContextLengthExceededError, invalid_field


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def parse_vllm(model: type, body: dict[str, Any]):
    """body as one of vLLM's protocol models; what it refuses is a 400 naming the field."""
    from vllm.exceptions import VLLMValidationError

    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise invalid_field(exc.errors()) from None
    except VLLMValidationError as exc:
        raise as_bad_request(exc) from None


def as_bad_request(exc: Exception, param: str | None = None) -> BadRequestError:
    """vLLM's validation errors (VLLMValidationError, ValueError) as a 400 naming the parameter."""
    message = str(exc)
    param = getattr(exc, "parameter", None) or param
    if "context length" in message or "maximum context" in message:
        return ContextLengthExceededError(message, param=param)
    return BadRequestError(message, param=param)


def completion_request(body: dict[str, Any]):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return parse_vllm(CompletionRequest, body)


def chat_completion_request(body: dict[str, Any]):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return parse_vllm(ChatCompletionRequest, body)


def responses_request(body: dict[str, Any]):
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    return parse_vllm(ResponsesRequest, body)


RequestKind = Literal["completion", "chat", "responses"]


def request_kind(request: Any) -> RequestKind:
    """Which of vLLM's request models this is (they share no base class that says so)."""
    if hasattr(request, "messages"):
        return "chat"
    return "responses" if hasattr(request, "max_output_tokens") else "completion"


def warm_protocol() -> None:
    """Import vLLM's protocol models now (seconds of imports): at replica start, not in a client's first request."""
    for parse in (completion_request, chat_completion_request, responses_request):
        with contextlib.suppress(BadRequestError):
            parse({})


def is_chat(request: Any) -> bool:
    return request_kind(request) == "chat"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "servegraph"
    root: str
    max_model_len: int | None
    versions: list[str]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
