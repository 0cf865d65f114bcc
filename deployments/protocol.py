"""The OpenAI wire format: the client's body as the ingress routes it, vLLM's own request models, our model list.

Requests are vLLM's protocol models (`vllm serve` accepts the same bodies, with the same
defaults and the same 400s), parsed once, in the tokenizer stage. The ingress reads only
what routing needs (`model`, `stream`, `user`) from the JSON and sends the body on as it
came: importing vLLM's models would put vLLM and torch (about 700 MB) into every ingress
replica. Responses are shaped by vLLM's serving classes in the postprocess stage. Only
/v1/models, which lists the graph's model versions, has a shape of its own.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from servegraph.deployments.errors import BadRequestError, ContextLengthExceededError, invalid_field


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


PARSERS = {"completion": completion_request, "chat": chat_completion_request, "responses": responses_request}


@dataclass(frozen=True)
class ClientRequest:
    """A client's request as the ingress routes it: the endpoint's kind and the JSON body as sent."""

    kind: RequestKind
    body: dict[str, Any]

    @classmethod
    def of(cls, kind: RequestKind, body: dict[str, Any]) -> ClientRequest:
        """400 unless `model` names something: routing needs it before vLLM's models see the body."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequestError("`model` is required: this server serves several models.", param="model")
        return cls(kind, body)

    @property
    def model(self) -> str:
        return self.body["model"]

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def user(self) -> str | None:
        user = self.body.get("user")
        return user if isinstance(user, str) else None

    @property
    def include_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and bool(options.get("include_usage"))

    def parsed(self):
        """The body as vLLM's request model for this endpoint; 400 naming the field it refuses."""
        return PARSERS[self.kind](self.body)

    def prompt_json(self) -> str:
        """The prompt part of the body, for models that log payloads."""
        return json.dumps({k: self.body[k] for k in ("prompt", "messages", "input") if k in self.body})


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
