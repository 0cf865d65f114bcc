"""The OpenAI wire format: the client's body as the ingress routes it, vLLM's own request models, our model list.

Requests are vLLM's protocol models (`vllm serve` accepts the same bodies, with the same
defaults and the same 400s), parsed once, in the tokenizer stage. The ingress reads only
what routing needs (`model`, `stream`, `user`) from the JSON and sends the body on as it
came: importing vLLM's models would put vLLM and torch (about 700 MB) into every ingress
replica. Responses are shaped by vLLM's serving classes in the postprocess stage. Only
/v1/models, which lists the graph's model versions, has a shape of its own.
"""

from __future__ import annotations

import importlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from servegraph.deployments.errors import BadRequestError, ContextLengthExceededError, invalid_field

MAX_MODEL_NAME_CHARS = 256  # names reach logs and usage records: no megabyte model names


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def parse_vllm(model: type, body: dict[str, Any]):
    """body as one of vLLM's protocol models; what it refuses is a 400 naming the field.

    A top-level `null` means the field's default, as OpenAI's API reads it: some of vLLM's
    models take null where their responses cannot (`background: null` fails when the Responses
    API builds its answer), so nulls are dropped before validation.
    """
    from vllm.exceptions import VLLMValidationError

    try:
        return model.model_validate({key: value for key, value in body.items() if value is not None})
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

    return with_listed_messages(parse_vllm(ChatCompletionRequest, body))


def with_listed_messages(request: Any) -> Any:
    """request, its messages' lazily validated iterables made lists now.

    pydantic validates an `Iterable[...]` field given a non-list (an assistant `content` sent as
    an object, say) lazily, as a one-shot iterator that cannot be pickled to the next stage:
    listing it here validates it (a 400 if it is wrong) and makes it plain data.
    """
    for message in request.messages:
        if isinstance(message, dict):
            for key, value in message.items():
                if isinstance(value, Iterator):
                    try:
                        message[key] = list(value)
                    except ValidationError as exc:
                        raise BadRequestError(
                            f"messages: `{key}`: {exc.errors()[0]['msg']}", param="messages"
                        ) from None
    return request


def responses_request(body: dict[str, Any]):
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    return parse_vllm(ResponsesRequest, body)


def embedding_request(body: dict[str, Any]):
    """vLLM's embeddings request model for the body's shape, as its EmbeddingRequest union tells them
    apart: `input` as text or token ids (one or a list), or chat conversations in `messages` or `input`."""
    from vllm.entrypoints.pooling.embed import protocol
    from vllm.exceptions import VLLMValidationError

    try:
        protocol.reject_removed_pooling_parameters(body)
    except VLLMValidationError as exc:
        raise as_bad_request(exc) from None
    conversations = body.get("messages", body.get("input"))
    if protocol._is_batched_chat_messages(conversations):
        model = protocol.EmbeddingBatchChatRequest if "messages" in body else protocol.EmbeddingBatchChatInputRequest
    elif "messages" in body or protocol._is_chat_messages(conversations):
        model = protocol.EmbeddingChatRequest if "messages" in body else protocol.EmbeddingChatInputRequest
    else:
        model = protocol.EmbeddingCompletionRequest
    return parse_vllm(model, body)


RequestKind = Literal["completion", "chat", "responses", "embedding"]


def request_kind(request: Any) -> RequestKind:
    """Which of vLLM's request models this is (they share no base class that says so)."""
    if hasattr(request, "messages"):
        return "chat"
    return "responses" if hasattr(request, "max_output_tokens") else "completion"


PARSERS = {"completion": completion_request, "chat": chat_completion_request, "responses": responses_request,
           "embedding": embedding_request}  # fmt: skip


def model_of(body: dict[str, Any]) -> str:
    """The body's `model`, which routing needs before vLLM's models see the body; 400 without one."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequestError("`model` is required: this server serves several models.", param="model")
    if len(model) > MAX_MODEL_NAME_CHARS:
        raise BadRequestError(f"`model` is longer than {MAX_MODEL_NAME_CHARS} characters.", param="model")
    return model


@dataclass(frozen=True)
class ClientRequest:
    """A client's request as the ingress routes it: the endpoint's kind and the JSON body as sent."""

    kind: RequestKind
    body: dict[str, Any]

    @classmethod
    def of(cls, kind: RequestKind, body: dict[str, Any]) -> ClientRequest:
        """400 unless `model` names something: routing needs it before vLLM's models see the body."""
        model_of(body)
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
    parent: str | None = None  # a LoRA adapter's base model, as vLLM lists adapters
    max_model_len: int | None
    versions: list[str]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error body: what every non-2xx answer of the API carries (errors.OpenAIError.body)."""

    error: ErrorDetail


# Each route's request body as vLLM's own models: (module, class names; several means any of them).
REQUEST_BODY_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "/v1/completions": ("vllm.entrypoints.openai.completion.protocol", ("CompletionRequest",)),
    "/v1/chat/completions": ("vllm.entrypoints.openai.chat_completion.protocol", ("ChatCompletionRequest",)),
    "/v1/responses": ("vllm.entrypoints.openai.responses.protocol", ("ResponsesRequest",)),
    "/v1/embeddings": ("vllm.entrypoints.pooling.embed.protocol", ("EmbeddingCompletionRequest",)),
    "/tokenize": ("vllm.entrypoints.serve.tokenize.protocol", ("TokenizeCompletionRequest", "TokenizeChatRequest")),
    "/detokenize": ("vllm.entrypoints.serve.tokenize.protocol", ("DetokenizeRequest",)),
}
COMPONENT_REF = "#/components/schemas/{model}"


def request_body_schemas() -> dict[str, Any]:
    """vLLM's request models as OpenAPI pieces: each route's body schema, and the components they refer to.

    Made where vLLM is imported (the tokenizer stage) and handed to the ingress, which documents
    the bodies exactly as vLLM validates them without importing vLLM itself.
    """
    from pydantic.json_schema import models_json_schema

    models = {
        path: [getattr(importlib.import_module(module), name) for name in names]
        for path, (module, names) in REQUEST_BODY_MODELS.items()
    }
    unique = list({model for group in models.values() for model in group})
    refs, definitions = models_json_schema([(model, "validation") for model in unique], ref_template=COMPONENT_REF)
    bodies = {}
    for path, group in models.items():
        choices = [refs[(model, "validation")] for model in group]
        bodies[path] = choices[0] if len(choices) == 1 else {"anyOf": choices}
    return {"bodies": bodies, "components": definitions.get("$defs", {})}
