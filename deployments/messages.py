"""What stages hand each other inside the graph (never seen on the wire)."""

from __future__ import annotations

from dataclasses import dataclass


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
class SamplingSettings:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    top_k: int = 0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class EngineRequest:
    """Token ids in, sampling settings: all an engine needs, no text."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSettings
    priority: int = 0  # vLLM's: lower is scheduled first


@dataclass(frozen=True)
class PreparedRequest:
    """The tokenizer's output: the engine request plus what postprocessing must know."""

    route: ModelRoute
    engine_request: EngineRequest
    stop_strings: tuple[str, ...] = ()
    truncated_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.engine_request.prompt_token_ids)


@dataclass(frozen=True)
class TokenChunk:
    """New token ids from the engine since the previous chunk.

    The last chunk carries how long the request spent inside the engine.
    """

    token_ids: list[int]
    finish_reason: str | None = None
    engine_seconds: float | None = None


@dataclass
class TextChunk:
    """New text for the client, with running usage so the last chunk carries the totals."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    engine_seconds: float | None = None


def merge_chunks(chunks: list[TextChunk]) -> TextChunk:
    """One chunk with all the text; usage and finish reason of the last."""
    last = chunks[-1]
    text = "".join(c.text for c in chunks)
    return TextChunk(text, last.prompt_tokens, last.completion_tokens, last.finish_reason, last.engine_seconds)
