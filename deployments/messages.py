"""What stages hand each other inside the graph (never seen on the wire)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

from servegraph.models.spec import LoraAdapterSpec

# How the streaming handles send their items (ResponseChunks; lists of vLLM RequestOutputs): plain
# classes, so the C pickler rather than cloudpickle, whose reducer hook runs in Python for every
# object (about 4 % of each streaming stage's CPU under load).
STREAM_SERIALIZATION = "pickle"


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter as the router registered it: what an engine needs to load and name it.

    lora_id is vLLM's lora_int_id, the key of its adapter cache: the router never gives two
    adapters (or an adapter re-added with other weights) the same one. The source is resolved
    to a directory on the engine's node (a built adapter is built there on first use).
    """

    source: LoraAdapterSpec
    lora_id: int
    base_model: str

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def multiplexed_id(self) -> str:
        """Serve's multiplexed model id: a re-added adapter (new lora_id) is a new model to Serve's routing."""
        return f"{self.name}#{self.lora_id}"


@dataclass(frozen=True)
class ModelRoute:
    """The router's answer: which model, version and engine deployment serve a name."""

    model: str
    version: str
    engine: str
    default_max_tokens: int  # chat and responses requests without max_tokens get this
    log_payloads: bool = False
    timeout_s: float | None = None
    cold_start_timeout_s: float | None = None  # set when the engine may have scaled to zero
    adapter: LoraAdapter | None = None  # a LoRA adapter's route: `model` is the adapter, served on its base's engine

    @property
    def base_model(self) -> str:
        """The model whose spec (and engine) serves the route."""
        return self.adapter.base_model if self.adapter is not None else self.model

    @property
    def served_by(self) -> str:
        return f"{self.model}@{self.version}"


@dataclass(frozen=True)
class Sealed:
    """A value pickled by the stage that made it and unpickled only by the stage that uses it.

    The tokenizer's PreparedRequest holds vLLM objects (its request models, SamplingParams).
    The ingress relays it to postprocess; sealed, the ingress never unpickles them, so it
    never imports vLLM and torch (about 550 MB per replica).
    """

    blob: bytes

    @classmethod
    def of(cls, value: Any) -> Sealed:
        return cls(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))

    def open(self) -> Any:
        return pickle.loads(self.blob)


@dataclass(frozen=True)
class GenerationCall:
    """One attempt at a client's request on one model version: what the tokenizer stage prepares from.

    request is the client's body as the ingress received it (a protocol.ClientRequest);
    model_name is the name responses carry (the client's, or the fallback's).
    """

    route: ModelRoute
    request: Any
    request_id: str
    priority: int = 0
    model_name: str | None = None
    charge_to: str | None = None  # a tenant with a quota lease: see EngineRequest.charge_to


@dataclass(frozen=True)
class EngineRequest:
    """Token ids in, vLLM's SamplingParams: all an engine needs, no text."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any  # vllm.SamplingParams, built by the tokenizer stage from the request
    priority: int = 0  # vLLM's: lower is scheduled first
    reasoning_ended: bool | None = None
    reasoning_parser_kwargs: dict[str, Any] | None = None
    charge_to: str | None = None  # the limited tenant the engine charges if the request is abandoned
    lora: LoraAdapter | None = None  # served with this adapter (vLLM's LoRARequest)


@dataclass(frozen=True)
class PreparedRequest:
    """The tokenizer's output: one engine request per prompt, and what postprocessing must know.

    request is vLLM's parsed protocol model, carried as is (never parsed again); conversation
    is the rendered chat (for echo); prompt_texts are the prompts as text (for echo and logprobs).
    """

    route: ModelRoute
    request: Any  # vLLM's ChatCompletionRequest or CompletionRequest
    engine_requests: list[EngineRequest]
    prompt_texts: list[str | None]
    conversation: list[dict[str, Any]] | None = None
    response_id: str = ""
    model_name: str = ""  # the name responses carry: what the client asked for, or the fallback's

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.engine_requests)


@dataclass
class ResponseChunk:
    """Response bytes for the client, with running usage so the last chunk carries the totals.

    data is one or more SSE events for a stream, or the whole JSON body otherwise; finished
    marks the chunk that ends the response ([DONE] for streams). error_status is set when
    an error event went out inside a 200 stream. text is the completion text, kept only
    for models that log payloads.
    """

    data: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    finished: bool = False
    engine_seconds: float | None = None
    error_status: int | None = None
    text: str = ""
