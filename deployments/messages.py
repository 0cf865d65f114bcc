"""What stages hand each other inside the graph (never seen on the wire)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelRoute:
    """The router's answer: which model, version and engine deployment serve a name."""

    model: str
    version: str
    engine: str
    log_payloads: bool = False
    timeout_s: float | None = None
    cold_start_timeout_s: float | None = None  # set when the engine may have scaled to zero

    @property
    def served_by(self) -> str:
        return f"{self.model}@{self.version}"


@dataclass(frozen=True)
class EngineRequest:
    """Token ids in, vLLM's SamplingParams: all an engine needs, no text."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any  # vllm.SamplingParams, built by the tokenizer stage from the request
    priority: int = 0  # vLLM's: lower is scheduled first
    reasoning_ended: bool | None = None
    reasoning_parser_kwargs: dict[str, Any] | None = None


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
    chat_template_kwargs: dict[str, Any] | None = None
    response_id: str = ""
    model_name: str = ""  # the name responses carry: what the client asked for, or the fallback's

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.engine_requests)

    @property
    def stream(self) -> bool:
        return bool(self.request.stream)


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
