"""Postprocessing stage: token ids to text, stop strings, finish reasons and usage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.errors import ModelStartingError, as_openai_error
from deployments.messages import ModelRoute, PreparedRequest, TextChunk, TokenChunk, merge_chunks
from deployments.streaming import Deadline, until_finished
from deployments.tokenizer import load_tokenizer
from models.spec import ModelSpec

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing list of token ids into text deltas.

    Decodes a small window (prefix/read offsets, as vLLM and TGI do) so the cost per step
    does not grow with the output, and holds text back while it ends in an incomplete
    UTF-8 sequence so multi-byte characters split across tokens come out whole.
    """

    def __init__(self, tokenizer) -> None:
        self._decode = getattr(tokenizer, "backend_tokenizer", tokenizer).decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def step(self, new_ids: list[int]) -> str:
        self._ids.extend(new_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        new_text = self._decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back, incomplete bytes shown as U+FFFD."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        new_text = self._decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class StopStringMatcher:
    """Finds stop strings across chunk boundaries, holding back text that could start one."""

    def __init__(self, stop_strings: tuple[str, ...]) -> None:
        self._stops = stop_strings
        self._holdback = max((len(s) for s in stop_strings), default=1) - 1
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text that is safe to emit, and whether a stop string ended the output."""
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        cut = max(len(self._pending) - self._holdback, 0)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class TextAssembler:
    """Per-request state that turns engine token chunks into client text chunks."""

    def __init__(self, tokenizer, prepared: PreparedRequest) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopStringMatcher(prepared.stop_strings)
        self._prompt_tokens = prepared.prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def add(self, chunk: TokenChunk) -> TextChunk | None:
        """The client's next chunk, or None while text is held back or after the output ended."""
        if self.finish_reason is not None:
            return None
        self.completion_tokens += len(chunk.token_ids)
        text = self._detokenizer.step(chunk.token_ids)
        if chunk.finish_reason is not None:
            text += self._detokenizer.flush()
        text, hit_stop = self._stops.feed(text)
        if hit_stop:
            self.finish_reason = "stop"
        elif chunk.finish_reason is not None:
            text += self._stops.flush()
            self.finish_reason = chunk.finish_reason
        if not text and self.finish_reason is None:
            return None
        return TextChunk(text, self._prompt_tokens, self.completion_tokens, self.finish_reason, chunk.engine_seconds)


async def assemble_text(
    tokenizer, prepared: PreparedRequest, token_chunks: AsyncIterator[TokenChunk]
) -> AsyncIterator[TextChunk]:
    """Yield text chunks until the engine or a stop string finishes the request."""
    output = TextAssembler(tokenizer, prepared)
    async for token_chunk in token_chunks:
        text_chunk = output.add(token_chunk)
        if text_chunk is not None:
            yield text_chunk
        if output.finish_reason is not None:
            return


def within_cold_start(token_chunks: AsyncIterator[TokenChunk], route: ModelRoute) -> AsyncIterator[TokenChunk]:
    """The engine's chunks; for a model that scales to zero, the first one bounded by its cold-start limit.

    Other models get the engine stream itself: no extra generator on the per-chunk path.
    """
    if route.cold_start_timeout_s is None:
        return token_chunks
    return _first_within(token_chunks, Deadline(route.cold_start_timeout_s, lambda: model_starting(route)))


async def _first_within(token_chunks: AsyncIterator[TokenChunk], cold_start: Deadline) -> AsyncIterator[TokenChunk]:
    iterator = aiter(token_chunks)
    try:
        yield await cold_start.run(anext(iterator))
    except StopAsyncIteration:
        return
    async for chunk in iterator:
        yield chunk


def model_starting(route: ModelRoute) -> ModelStartingError:
    limit = route.cold_start_timeout_s or 0
    return ModelStartingError(
        f"The model `{route.model}` is starting and did not answer within {limit:g} s. "
        "Retry after the time in Retry-After.",
        retry_after_s=min(limit, 10),
    )


@serve.deployment(name="postprocess", ray_actor_options={"num_cpus": 0.25})
class Postprocess:
    """Pulls token ids from the engine chosen by the router and streams text onward.

    Owning the engine stream here keeps one Ray message per chunk per hop; non-streaming
    requests get one reply for the whole output.
    """

    def __init__(self, specs: list[ModelSpec], engines: dict[str, DeploymentHandle], cache_dir: str | None = None):
        cache = Path(cache_dir) if cache_dir else None
        self._tokenizers = {spec.engine_deployment_name: load_tokenizer(spec, cache) for spec in specs}
        self._engines = {name: handle.options(stream=True) for name, handle in engines.items()}

    async def stream(self, prepared: PreparedRequest) -> AsyncIterator[TextChunk]:
        route = prepared.route
        token_chunks = self._engines[route.engine].generate.remote(prepared.engine_request)
        started = within_cold_start(token_chunks, route)
        text_chunks = assemble_text(self._tokenizers[route.engine], prepared, started)
        try:
            async for text_chunk in until_finished(token_chunks, text_chunks):
                yield text_chunk
        except BackPressureError as exc:  # the engine's queue is full: an OpenAI 503 crosses Ray intact
            raise as_openai_error(exc) from None

    async def complete(self, prepared: PreparedRequest) -> TextChunk:
        return merge_chunks([chunk async for chunk in self.stream(prepared)])
