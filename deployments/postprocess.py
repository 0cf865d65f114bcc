"""Postprocessing stage: vLLM's RequestOutputs to OpenAI responses, through vLLM's own serving classes.

The engine detokenizes and applies stop strings; this stage shapes what it produced into
chat or completion responses and SSE events exactly as `vllm serve` does: n choices,
logprobs, echo, tool calls (the model's tool parser), reasoning content, usage.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from servegraph.deployments.embedder import Embeddings, PreparedEmbedding, embedding_serving
from servegraph.deployments.errors import ModelStartingError, OpenAIError, as_openai_error, from_vllm_error
from servegraph.deployments.frontend import Frontend, build_frontend
from servegraph.deployments.messages import STREAM_SERIALIZATION, ModelRoute, PreparedRequest, ResponseChunk, Sealed
from servegraph.deployments.protocol import request_kind
from servegraph.deployments.stage_process import drop_serve_access_lines
from servegraph.deployments.streaming import Deadline
from servegraph.models.spec import ModelSpec

Indexed = tuple[int, Any]  # (prompt index, vLLM RequestOutput)
DONE_EVENT = "data: [DONE]\n\n"
ERROR_EVENT_PREFIX = 'data: {"error"'
RESPONSE_COMPLETED_PREFIX = "event: response.completed\n"  # the Responses API's last event


def unreceived_tokens(decode: Callable[[list[int]], str], token_ids: list[int], received: str) -> int:
    """How many of the last tokens the client never saw any text of: those that only spell the
    stop string vLLM cut from the text. The token where the stop string begins counts as received
    when some of its text was.

    Texts are compared, not lengths: a prefix that ends inside a multi-byte character decodes to
    a replacement character, as long as the whole character. When our decoding disagrees with
    vLLM's incremental one, nothing is taken off: the tenant is billed vLLM's count.
    """
    hidden = 0
    while hidden < len(token_ids) and decode(token_ids[: len(token_ids) - hidden - 1]).startswith(received):
        hidden += 1
    return hidden


@dataclass
class Generated:
    """One choice's tokens and the text the client gets of them."""

    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


class StopStringBilling:
    """Bills a choice that ends on a stop string for the tokens whose text reached the client.

    vLLM counts the stop string's tokens in usage but cuts their text; the tenant is not billed
    for them (the response's `usage` still shows vLLM's count). Tokens are kept only for
    requests with stop strings that are not sent back.
    """

    @classmethod
    def needed_for(cls, prepared: PreparedRequest, tokenizer: Any) -> StopStringBilling | None:
        """A billing for a request with stop strings that are not sent back; None (no work per token) otherwise."""
        params = (r.sampling_params for r in prepared.engine_requests)
        return cls(prepared, tokenizer) if any(p.stop and not p.include_stop_str_in_output for p in params) else None

    def __init__(self, prepared: PreparedRequest, tokenizer: Any) -> None:
        from vllm.sampling_params import RequestOutputKind

        params = [r.sampling_params for r in prepared.engine_requests]
        self._delta = [p.output_kind == RequestOutputKind.DELTA for p in params]
        self._skip_special = [p.skip_special_tokens for p in params]
        self._choices: dict[tuple[int, int], Generated] = {}
        self._tokenizer = tokenizer
        self.unreceived = 0

    def see(self, index: int, completion: Any) -> None:
        choice = self._choices.setdefault((index, completion.index), Generated())
        if self._delta[index]:
            choice.token_ids.extend(completion.token_ids)
            choice.text.append(completion.text)
        else:
            choice.token_ids, choice.text = list(completion.token_ids), [completion.text]
        if completion.finish_reason == "stop" and isinstance(completion.stop_reason, str):
            skip = self._skip_special[index]

            def decode(ids: list[int]) -> str:
                return self._tokenizer.decode(ids, skip_special_tokens=skip)

            self.unreceived += unreceived_tokens(decode, choice.token_ids, "".join(choice.text))


class OutputTally:
    """Counts what the engine produced for one request while vLLM's generators consume it.

    completion_tokens is what the tenant is billed: every token generated, less those that
    only spelled a stop string the client never received.
    """

    def __init__(self, prepared: PreparedRequest, tokenizer: Any) -> None:
        self.prompt_tokens = prepared.prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.engine_seconds: float | None = None
        self.error: OpenAIError | None = None
        self._keep_text = prepared.route.log_payloads
        self._text: list[str] = []
        self._stops = StopStringBilling.needed_for(prepared, tokenizer)

    def see(self, index: int, output: Any) -> None:
        for completion in output.outputs:
            self.completion_tokens += len(completion.token_ids)
            self.finish_reason = completion.finish_reason or self.finish_reason
            if self._keep_text:
                self._text.append(completion.text)
            if self._stops is not None:
                self._stops.see(index, completion)
        seconds = getattr(output, "engine_seconds", None)
        if seconds is not None:
            self.engine_seconds = max(seconds, self.engine_seconds or 0.0)

    async def watch(self, first: Indexed, rest: AsyncIterator[Indexed]) -> AsyncIterator[Indexed]:
        """first, then rest, each counted; a failure is kept (for its status) and raised on to vLLM."""
        self.see(*first)
        yield first
        try:
            async for indexed in rest:
                self.see(*indexed)
                yield indexed
        except Exception as exc:
            self.error = as_openai_error(exc)
            raise

    def chunk(self, data: str, finished: bool = False) -> ResponseChunk:
        text = "".join(self._text)
        self._text.clear()
        return ResponseChunk(
            data,
            self.prompt_tokens,
            self.completion_tokens - (self._stops.unreceived if self._stops is not None else 0),
            self.finish_reason if finished else None,
            finished,
            self.engine_seconds if finished else None,
            self.error.status_code if self.error else None,
            text,
        )


async def outputs_only(indexed: AsyncIterator[Indexed]) -> AsyncIterator[Any]:
    async for _, output in indexed:
        yield output


class ResponseShaper:
    """One model's vLLM serving classes (chat, completions, responses), fed by the engine stage's outputs."""

    def __init__(self, frontend: Frontend) -> None:
        self._frontend = frontend
        self._tokenizer = frontend.tokenizer
        self._chat, self._completion, self._responses = frontend.serving()

    def _engine_inputs(self, prepared: PreparedRequest) -> list[dict[str, Any]]:
        return [
            {"type": "token", "prompt_token_ids": r.prompt_token_ids, "prompt": text}
            for r, text in zip(prepared.engine_requests, prepared.prompt_texts, strict=True)
        ]

    def _metadata(self, prepared: PreparedRequest):
        from vllm.entrypoints.generate.base.protocol import RequestResponseMetadata

        return RequestResponseMetadata(request_id=prepared.response_id)

    def _chat_template_kwargs(self, request: Any) -> dict[str, Any]:
        return self._frontend.online_renderer.effective_chat_template_kwargs(request)

    async def _first_output(self, prepared: PreparedRequest, outputs: AsyncIterator[Indexed]) -> Indexed:
        """Awaited before anything is sent on: overload, a dead replica or a cold start still fail
        as errors the ingress answers with a status or a fallback."""
        return await engine_answer(prepared.route, anext(outputs))

    async def stream(self, prepared: PreparedRequest, rest: AsyncIterator[Indexed]) -> AsyncIterator[ResponseChunk]:
        """SSE events as vLLM's server streams them, from the engine's (prompt index, output) stream."""
        tally = OutputTally(prepared, self._tokenizer)
        outputs = tally.watch(await self._first_output(prepared, rest), rest)
        kind = request_kind(prepared.request)
        events = {"chat": self._chat_events, "completion": self._completion_events, "responses": self._responses_events}
        async for event in events[kind](prepared, outputs):
            if tally.error is not None and event.startswith(ERROR_EVENT_PREFIX):
                event = f"data: {json.dumps(tally.error.body())}\n\n"  # our status and code, not vLLM's 400
            yield tally.chunk(event, finished=event == DONE_EVENT or event.startswith(RESPONSE_COMPLETED_PREFIX))

    async def complete(self, prepared: PreparedRequest, rest: AsyncIterator[Indexed]) -> ResponseChunk:
        """The whole response body, as vLLM's server answers a request that does not stream."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        tally = OutputTally(prepared, self._tokenizer)
        outputs = tally.watch(await self._first_output(prepared, rest), rest)
        kind = request_kind(prepared.request)
        shapes = {"chat": self._chat_response, "completion": self._completion_response,
                  "responses": self._responses_response}  # fmt: skip
        response = await shapes[kind](prepared, outputs)
        if isinstance(response, ErrorResponse):
            raise from_vllm_error(response)
        return tally.chunk(response.model_dump_json(by_alias=kind == "responses"), finished=True)

    def _chat_args(self, prepared: PreparedRequest, outputs: AsyncIterator[Indexed]) -> tuple:
        """What vLLM's chat stream and full generators both take first."""
        return (prepared.request, outputs_only(outputs), prepared.response_id, prepared.model_name,
                prepared.conversation or [], self._tokenizer, self._metadata(prepared))  # fmt: skip

    def _chat_events(self, prepared: PreparedRequest, outputs: AsyncIterator[Indexed]) -> AsyncIterator[str]:
        template_kwargs = self._chat_template_kwargs(prepared.request)
        return self._chat.chat_completion_stream_generator(
            *self._chat_args(prepared, outputs), chat_template_kwargs=template_kwargs
        )

    def _completion_events(self, prepared: PreparedRequest, outputs: AsyncIterator[Indexed]) -> AsyncIterator[str]:
        return self._completion.completion_stream_generator(
            prepared.request,
            self._engine_inputs(prepared),
            outputs,
            prepared.response_id,
            int(time.time()),
            prepared.model_name,
            num_prompts=len(prepared.engine_requests),
            tokenizer=self._tokenizer,
            request_metadata=self._metadata(prepared),
        )

    async def _responses_events(self, prepared: PreparedRequest, outputs: AsyncIterator[Indexed]) -> AsyncIterator[str]:
        """The Responses API's typed events, framed as vLLM's server frames them (no [DONE])."""
        context = self._responses_context(prepared)
        events = self._responses.responses_stream_generator(*self._responses_args(prepared, context, outputs))
        async for event in events:
            yield f"event: {event.type}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"

    async def _chat_response(self, prepared: PreparedRequest, outputs: AsyncIterator[Indexed]):
        request = prepared.request
        parser = None
        if self._chat.parser_cls is not None:
            parser = self._chat._make_parser(request, self._tokenizer, self._chat_template_kwargs(request))
        return await self._chat.chat_completion_full_generator(*self._chat_args(prepared, outputs), parser=parser)

    async def _completion_response(self, prepared: PreparedRequest, outputs: AsyncIterator[Indexed]):
        finals: list[Any] = [None] * len(prepared.engine_requests)
        async for index, output in outputs:
            finals[index] = output
        for output, text in zip(finals, prepared.prompt_texts, strict=True):
            output.prompt = output.prompt if output.prompt is not None else text
        return self._completion.request_output_to_completion_response(
            finals,
            prepared.request,
            prepared.response_id,
            int(time.time()),
            prepared.model_name,
            self._tokenizer,
            self._metadata(prepared),
        )

    async def _responses_response(self, prepared: PreparedRequest, outputs: AsyncIterator[Indexed]):
        context = self._responses_context(prepared)
        return await self._responses.responses_full_generator(*self._responses_args(prepared, context, outputs))

    def _responses_context(self, prepared: PreparedRequest):
        """vLLM's single-turn Responses context, with the model's tool and reasoning parser."""
        from vllm.entrypoints.openai.responses.context import SimpleContext

        request = prepared.request
        parser = self._responses._make_response_parser(request, self._tokenizer, self._chat_template_kwargs(request))
        if parser is not None:
            parser.set_prompt_token_ids(prepared.engine_requests[0].prompt_token_ids)
        return SimpleContext(response_parser=parser)

    def _responses_args(self, prepared: PreparedRequest, context: Any, outputs: AsyncIterator[Indexed]) -> tuple:
        prompt_token_ids = prepared.engine_requests[0].prompt_token_ids

        async def contexts() -> AsyncIterator[Any]:
            async for _, output in outputs:
                if output.prompt_token_ids is None:  # the engine sends them once; vLLM reads them off the last
                    output.prompt_token_ids = prompt_token_ids
                context.append_output(output)
                yield context

        sampling_params = prepared.engine_requests[0].sampling_params
        return (prepared.request, sampling_params, contexts(), context, prepared.model_name, self._tokenizer,
                self._metadata(prepared))  # fmt: skip


async def engine_answer(route: ModelRoute, answer: Awaitable[Any]) -> Any:
    """The engine's (first) answer; a full queue or a cold start past the model's bound fail as errors
    the ingress answers with a status or a fallback."""
    try:
        if route.cold_start_timeout_s is None:
            return await answer
        return await Deadline(route.cold_start_timeout_s, lambda: model_starting(route)).run(answer)
    except BackPressureError as exc:  # the engine's queue is full: an OpenAI 503 crosses Ray intact
        raise as_openai_error(exc) from None


class EmbeddingShaper:
    """An embedding model's vLLM serving class: the engine's PoolingRequestOutputs as vLLM's embeddings
    response (`encoding_format` float or base64, `usage`)."""

    def __init__(self, frontend: Frontend) -> None:
        self._serving = embedding_serving(frontend)

    async def complete(self, prepared: PreparedEmbedding, embeddings: Awaitable[Embeddings]) -> ResponseChunk:
        result: Embeddings = await engine_answer(prepared.route, embeddings)
        response = self._serving._openai_json_response(
            result.outputs, prepared.response_id, int(time.time()), prepared.model_name,
            prepared.encoding_format, prepared.embed_dtype, prepared.endianness,
        )  # fmt: skip
        prompt_tokens = sum(len(output.prompt_token_ids) for output in result.outputs)
        return ResponseChunk(
            response.body.decode(), prompt_tokens, 0, finished=True, engine_seconds=result.engine_seconds
        )


def shaper_for(spec: ModelSpec, frontend: Frontend) -> ResponseShaper | EmbeddingShaper:
    return EmbeddingShaper(frontend) if spec.task == "embed" else ResponseShaper(frontend)


def model_starting(route: ModelRoute) -> ModelStartingError:
    limit = route.cold_start_timeout_s or 0
    return ModelStartingError(
        f"The model `{route.model}` is starting and did not answer within {limit:g} s. "
        "Retry after the time in Retry-After.",
        retry_after_s=min(limit, 10),
    )


@serve.deployment(name="postprocess")  # options: graphs/builder.py
class Postprocess:
    """Pulls outputs from the engine replicas Serve picks and shapes them into the client's response."""

    def __init__(self, specs: list[ModelSpec], engines: dict[str, DeploymentHandle], cache_dir: str | None = None):
        drop_serve_access_lines()
        cache = Path(cache_dir) if cache_dir else None
        self._shapers = {spec.engine_deployment_name: shaper_for(spec, build_frontend(spec, cache)) for spec in specs}
        self._engines = {
            name: handle.options(stream=True, response_serialization=STREAM_SERIALIZATION)
            for name, handle in engines.items()
        }
        self._embedders = engines  # embedding models' engines answer once: no stream
        self._adapter_engines: dict[tuple[str, str], DeploymentHandle] = {}

    def _outputs(self, prepared: PreparedRequest):
        route = prepared.route
        engine = self._engines[route.engine] if route.adapter is None else self._adapter_engine(route)
        return engine.generate.remote(prepared.engine_requests)

    def _adapter_engine(self, route: ModelRoute) -> DeploymentHandle:
        """The engine's handle for a LoRA adapter, as Serve model multiplexing: routed to a replica
        that has the adapter loaded when one can take it, else to one that loads it (engine.py)."""
        assert route.adapter is not None
        key = (route.engine, route.adapter.multiplexed_id)
        handle = self._adapter_engines.get(key)
        if handle is None:
            handle = self._engines[route.engine].options(multiplexed_model_id=route.adapter.multiplexed_id)
            self._adapter_engines[key] = handle
        return handle

    async def stream(self, sealed: Sealed) -> AsyncIterator[ResponseChunk]:
        prepared: PreparedRequest = sealed.open()
        outputs = self._outputs(prepared)
        finished = False
        try:
            async for chunk in self._shapers[prepared.route.engine].stream(prepared, outputs):
                finished = chunk.finished
                yield chunk
        finally:
            if not finished:  # client gone, deadline or failure: abort the engine request
                outputs.cancel()

    async def complete(self, sealed: Sealed) -> ResponseChunk:
        prepared: PreparedRequest = sealed.open()
        outputs = self._outputs(prepared)
        try:
            return await self._shapers[prepared.route.engine].complete(prepared, outputs)
        except BaseException:
            outputs.cancel()
            raise

    async def embed(self, sealed: Sealed) -> ResponseChunk:
        """An embeddings request (PreparedEmbedding): one engine call for every input, one JSON body."""
        prepared: PreparedEmbedding = sealed.open()
        engine = prepared.route.engine
        embeddings = self._embedders[engine].embed.remote(prepared.engine_requests, prepared.charge_to)
        try:
            return await self._shapers[engine].complete(prepared, embeddings)
        except BaseException:
            embeddings.cancel()
            raise
