"""Tokenizer stage: vLLM's renderer (chat template, tools, tokenization) and sampling parameters.

Requests arrive parsed as vLLM's protocol models; this stage renders them exactly as
`vllm serve` would, applies the model's long-prompt policy through vLLM's own truncation
fields, and turns each prompt into an engine request of token ids and vLLM SamplingParams.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ray import serve

from servegraph.deployments.embedder import EmbedRequest, PreparedEmbedding, embedding_serving
from servegraph.deployments.errors import BadRequestError, ContextLengthExceededError, from_vllm_error
from servegraph.deployments.frontend import Frontend, build_frontend
from servegraph.deployments.messages import EngineRequest, GenerationCall, ModelRoute, PreparedRequest, Sealed
from servegraph.deployments.protocol import (
    ClientRequest,
    as_bad_request,
    parse_vllm,
    request_body_schemas,
    with_listed_messages,
)
from servegraph.deployments.stage_process import drop_serve_access_lines
from servegraph.models.spec import LongPromptPolicy, ModelSpec

TRUNCATION_SIDE = {LongPromptPolicy.truncate_left: "left", LongPromptPolicy.truncate_right: "right"}
PROMPT_PARAM = {"chat": "messages", "completion": "prompt", "responses": "input"}  # where a prompt's problems are


class PromptTokenizer:
    """Turns one model's OpenAI requests into engine requests that fit its context."""

    def __init__(self, spec: ModelSpec, frontend: Frontend, max_prompt_tokens: int | None = None) -> None:
        """max_prompt_tokens: the application's cap on a rendered prompt, below the model's context."""
        self.spec = spec
        self._max_prompt_tokens = max_prompt_tokens
        self.frontend = frontend
        self.tokenizer = frontend.tokenizer
        self._vocab_size = len(self.tokenizer)
        self._max_model_len = frontend.model_config.max_model_len
        generation_defaults = frontend.model_config.get_diff_sampling_param()
        # Chat requests without max_tokens get the spec's default, shrunk to the context the prompt leaves.
        self._chat_defaults = {"max_tokens": spec.default_max_tokens, **generation_defaults}
        self._completion_defaults = generation_defaults

    async def prepare(
        self,
        route: ModelRoute,
        client_request: ClientRequest,
        request_id: str,
        priority: int = 0,
        model_name: str | None = None,
        charge_to: str | None = None,
    ) -> PreparedRequest:
        """The body parsed (once, here) by vLLM's request model, rendered into engine requests.

        priority: vLLM's, lower first (see models.config.PriorityClass); charge_to: the tenant
        the engine charges for what an abandoned request generated (see quota.py).
        """
        from vllm.exceptions import VLLMClientError

        request = client_request.parsed()
        kind = client_request.kind
        param = PROMPT_PARAM[kind]
        refuse_unsupported(request)
        try:
            if kind == "responses":
                prepared = await self._prepare_responses(route, request, request_id, priority)
            else:
                prepared = await self._prepare_completion(route, request, request_id, priority, kind == "chat")
        except (ValueError, TypeError, VLLMClientError) as exc:  # vLLM's own validation of the request
            raise vllm_refusal(exc, request, param) from None
        if charge_to is not None or route.adapter is not None:  # the engine serves the route's LoRA adapter
            engine_requests = [replace(r, charge_to=charge_to, lora=route.adapter) for r in prepared.engine_requests]
            prepared = replace(prepared, engine_requests=engine_requests)
        return replace(prepared, model_name=model_name or request.model)

    async def _prepare_completion(
        self, route: ModelRoute, request: Any, request_id: str, priority: int, chat: bool
    ) -> PreparedRequest:
        """Chat and completions requests: one engine request per prompt."""
        self._apply_long_prompt_policy(request, chat)
        conversation, inputs = await self._render(request, chat)
        engine_requests = [
            self._engine_request(request, chat, f"{request_id}-{i}" if len(inputs) > 1 else request_id,
                                 self._token_ids(engine_input, PROMPT_PARAM["chat" if chat else "completion"]),
                                 priority)
            for i, engine_input in enumerate(inputs)
        ]  # fmt: skip
        return PreparedRequest(
            route=route,
            request=request,
            engine_requests=engine_requests,
            prompt_texts=[engine_input.get("prompt") for engine_input in inputs],
            conversation=conversation,
            response_id=request_id,
            model_name=request.model,
        )

    async def _prepare_responses(
        self, route: ModelRoute, request: Any, request_id: str, priority: int
    ) -> PreparedRequest:
        """The Responses API, stateless: the whole conversation comes in `input`, as from vLLM's render server."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.utils.api_utils import get_max_tokens

        for field in ("previous_response_id", "background"):
            if getattr(request, field):
                raise BadRequestError(
                    f"{field} is not supported: this server keeps no responses; send the conversation in `input`.",
                    param=field,
                )
        request.store = False  # nothing is kept between requests (and nothing grows in postprocess)
        request.request_id = request_id
        result = await self.frontend.online_renderer.render_responses(request)
        if isinstance(result, ErrorResponse):
            raise from_vllm_error(result)
        token_ids = self._truncated(self._token_ids(result.engine_input, "input"), request.max_output_tokens or 1)
        requested = request.max_output_tokens
        self._check_fits(token_ids, requested, "max_output_tokens", "input")
        max_tokens = get_max_tokens(self._max_model_len, requested, len(token_ids), self._chat_defaults)
        params = self._verified(request.to_sampling_params(max_tokens, self._chat_defaults))
        reasoning = self._responses_reasoning(request, params)
        engine_request = EngineRequest(request_id, token_ids, params, priority, reasoning_parser_kwargs=reasoning)
        return PreparedRequest(
            route=route,
            request=request,
            engine_requests=[engine_request],
            prompt_texts=[result.engine_input.get("prompt")],
            response_id=request_id,
            model_name=request.model,
        )

    def _responses_reasoning(self, request: Any, params: Any) -> dict[str, Any] | None:
        """As vLLM's Responses server: with a reasoning parser, structured output starts after reasoning."""
        from vllm.config.utils import replace
        from vllm.sampling_params import StructuredOutputsParams

        renderer = self.frontend.online_renderer
        parser_cls = renderer.parser
        if parser_cls is None or parser_cls.reasoning_parser_cls is None:
            return None
        template_kwargs = renderer.effective_chat_template_kwargs(request)
        parser = parser_cls(
            self.tokenizer, request.tools, chat_template_kwargs=template_kwargs, model_config=renderer.model_config
        )
        constraints = params.structured_outputs
        if isinstance(constraints, StructuredOutputsParams) and constraints.all_non_structural_tag_constraints_none():
            tag = parser.reasoning_parser.prepare_structured_tag(constraints.structural_tag, None)
            params.structured_outputs = replace(constraints, structural_tag=tag)
        return {"chat_template_kwargs": template_kwargs}

    def _apply_long_prompt_policy(self, request: Any, chat: bool) -> None:
        """The spec's truncation (_truncate_to_context), leaving a chat request room for the default completion."""
        truncated = self._truncate_to_context(request)
        if truncated and chat and request.max_tokens is None and request.max_completion_tokens is None:
            request.max_tokens = self.spec.default_max_tokens

    def _truncate_to_context(self, request: Any) -> bool:
        """truncate_left/right become vLLM's truncation fields unless the request set its own; whether they did."""
        side = TRUNCATION_SIDE.get(self.spec.long_prompt)
        if side is None or request.truncate_prompt_tokens is not None:
            return False
        request.truncate_prompt_tokens = -1  # vLLM: whatever max_model_len minus max_tokens leaves
        request.truncation_side = side
        return True

    async def _render(self, request: Any, chat: bool) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]]]:
        from jinja2 import TemplateError
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        renderer = self.frontend.online_renderer
        try:
            result = await (renderer.render_chat(request) if chat else renderer.render_completion(request))
        except TemplateError as exc:  # template errors are the client's (e.g. roles the template refuses)
            raise BadRequestError(f"The chat template rejected these messages: {exc}", param="messages") from None
        if isinstance(result, ErrorResponse):
            raise from_vllm_error(result)
        return result if chat else (None, result)

    def _token_ids(self, engine_input: dict[str, Any], param: str) -> list[int]:
        token_ids = list(engine_input.get("prompt_token_ids") or [])
        if not token_ids:
            raise BadRequestError("The prompt is empty.", param=param)
        return self._known_token_ids(token_ids, param)

    def _engine_request(
        self, request: Any, chat: bool, request_id: str, token_ids: list[int], priority: int
    ) -> EngineRequest:
        from vllm.entrypoints.serve.utils.api_utils import get_max_tokens

        defaults = self._chat_defaults if chat else self._completion_defaults
        requested = (request.max_completion_tokens or request.max_tokens) if chat else request.max_tokens
        max_param = "max_completion_tokens" if chat and request.max_completion_tokens else "max_tokens"
        token_ids = self._truncated(token_ids, requested or 1)
        self._check_fits(token_ids, requested, max_param, PROMPT_PARAM["chat" if chat else "completion"])
        max_tokens = get_max_tokens(self._max_model_len, requested, len(token_ids), defaults)
        params = self._verified(request.to_sampling_params(max_tokens, defaults))
        reasoning: dict[str, Any] = {}
        if chat:
            reasoning = self._reasoning_kwargs(request, token_ids)
        return EngineRequest(request_id, token_ids, params, priority, **reasoning)

    def _verified(self, params: Any) -> Any:
        """params, checked here as the engine will check them (logprob limits, token ids, grammars),
        so what the engine would refuse is a 400 before any engine sees it. With structured outputs
        the check runs on a copy: it resolves their backend, which the engine must do itself."""
        config = self.frontend.vllm_config
        checked = params if params.structured_outputs is None else params.clone()  # no deep copy per request
        checked.verify(config.model_config, None, config.structured_outputs_config, self.tokenizer)
        params.stream_interval = self.spec.stream_interval
        return params

    def _check_fits(self, token_ids: list[int], requested: int | None, max_param: str, prompt_param: str) -> None:
        """400 for a prompt over the app's cap, a max_tokens beyond the context, or a prompt leaving it no room."""
        cap = self._max_prompt_tokens
        if cap is not None and len(token_ids) > cap:
            raise BadRequestError(
                f"{prompt_param}: {len(token_ids)} prompt tokens is over this server's limit of {cap}.",
                param=prompt_param,
            )
        limit = self._max_model_len
        if requested is not None and requested >= limit:
            raise BadRequestError(
                f"{max_param}={requested} is beyond this model's limit: it must be less than the "
                f"context length of {limit} tokens.",
                param=max_param,
            )
        if requested is not None and len(token_ids) + requested > limit:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(token_ids) + requested} tokens ({len(token_ids)} in the prompt, {requested} for the "
                f"completion). Please reduce the length of the prompt or {max_param}.",
                param=prompt_param,
            )

    def _truncated(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """The model's truncation policy on token ids (vLLM's truncation fields cover text prompts only)."""
        side = TRUNCATION_SIDE.get(self.spec.long_prompt)
        keep = self._max_model_len - max_tokens
        if side is None or len(token_ids) <= keep:
            return token_ids
        return token_ids[-keep:] if side == "left" else token_ids[:keep]

    def _reasoning_kwargs(self, request: Any, token_ids: list[int]) -> dict[str, Any]:
        """What vLLM's chat server hands its engine for structured outputs after reasoning."""
        renderer = self.frontend.online_renderer
        parser_cls = renderer.parser
        if parser_cls is None or parser_cls.reasoning_parser_cls is None:
            return {"reasoning_ended": request.resolve_reasoning_ended(None, token_ids)}
        template_kwargs = renderer.effective_chat_template_kwargs(request)
        parser = parser_cls(
            self.tokenizer, request.tools, chat_template_kwargs=template_kwargs, model_config=renderer.model_config
        )
        return {
            "reasoning_ended": request.resolve_reasoning_ended(parser, token_ids),
            "reasoning_parser_kwargs": {"chat_template_kwargs": template_kwargs},
        }

    def _known_token_ids(self, token_ids: list[int], param: str) -> list[int]:
        bad = [i for i in token_ids if not 0 <= i < self._vocab_size]
        if bad:
            raise BadRequestError(f"{param} token ids must be in [0, {self._vocab_size}); got {bad[:5]}", param=param)
        return list(token_ids)

    def _render_chat(
        self, messages: list[dict[str, Any]], add_special_tokens: bool = False, **template_kwargs: Any
    ) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
        except Exception as exc:  # template errors are the client's (e.g. roles the template refuses)
            raise BadRequestError(f"The chat template rejected these messages: {exc}", param="messages") from None
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's POST /tokenize: a prompt, or chat messages through the chat template."""
        from vllm.entrypoints.serve.tokenize.protocol import (
            TokenizeChatRequest,
            TokenizeCompletionRequest,
            TokenizeResponse,
        )

        if "messages" in body:
            chat = with_listed_messages(parse_vllm(TokenizeChatRequest, body))
            if chat.chat_template or "chat_template" in (chat.chat_template_kwargs or {}):
                # As vLLM without --trust-request-chat-template: a template is code that runs here.
                raise BadRequestError("A chat template from the request is not accepted.", param="chat_template")
            kwargs = {**(chat.chat_template_kwargs or {}), "add_generation_prompt": chat.add_generation_prompt,
                      "continue_final_message": chat.continue_final_message}  # fmt: skip
            kwargs.pop("tokenize", None)
            if chat.tools:
                kwargs["tools"] = [tool.model_dump(exclude_none=True) for tool in chat.tools]
            messages = [as_message_dict(message) for message in chat.messages]
            token_ids = self._render_chat(messages, chat.add_special_tokens, **kwargs)
            wants_strings = chat.return_token_strs
        else:
            completion = parse_vllm(TokenizeCompletionRequest, body)
            token_ids = self.tokenizer.encode(completion.prompt, add_special_tokens=completion.add_special_tokens)
            wants_strings = completion.return_token_strs
        strings = self.tokenizer.convert_ids_to_tokens(token_ids) if wants_strings else None
        response = TokenizeResponse(
            count=len(token_ids), max_model_len=self.spec.max_model_len, tokens=token_ids, token_strs=strings
        )
        return response.model_dump()

    def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's POST /detokenize: token ids back to text."""
        from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, DetokenizeResponse

        request = parse_vllm(DetokenizeRequest, body)
        token_ids = self._known_token_ids(request.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(token_ids)).model_dump()


API_NAMES = {"chat": "Chat Completions", "completion": "Completions", "responses": "Responses"}
EMBEDDING_ENCODINGS = ("float", "base64")  # vLLM's bytes formats answer raw bytes, not the JSON this graph relays


def not_supported(model: str, api: str) -> BadRequestError:
    """vLLM's answer to an endpoint the model's runner does not serve ("The model does not support ...")."""
    return BadRequestError(f"The model `{model}` does not support the {api} API.", param="model")


class EmbeddingTokenizer(PromptTokenizer):
    """An embedding model's requests: vLLM's embedding request models, rendered by vLLM's pooling IO
    processor into one engine request (token ids, PoolingParams) per input.

    /tokenize and /detokenize work as for any model; the generation endpoints are a 400, as
    `vllm serve` of a pooling model answers them.
    """

    def __init__(self, spec: ModelSpec, frontend: Frontend, max_prompt_tokens: int | None = None) -> None:
        super().__init__(spec, frontend, max_prompt_tokens)
        self._serving = embedding_serving(frontend)

    async def prepare(self, route: ModelRoute, client_request: ClientRequest, *args: Any, **kwargs: Any):
        raise not_supported(route.model, API_NAMES[client_request.kind])

    async def prepare_embedding(self, call: GenerationCall) -> PreparedEmbedding:
        """The body parsed by vLLM's embedding request model and rendered as vLLM's embeddings server
        does: string, strings, token ids or lists of them (or chat messages, through the model's
        template); `dimensions` and the rest checked by vLLM's PoolingParams, each refusal a 400."""
        from vllm.exceptions import VLLMClientError

        route, client_request = call.route, call.request
        request = client_request.parsed()
        if request.encoding_format not in EMBEDDING_ENCODINGS:
            raise BadRequestError(
                f"encoding_format {request.encoding_format!r} is not supported here; use 'float' or 'base64'.",
                param="encoding_format",
            )
        request.model = route.model  # vLLM's registry knows the model by its own name (not a fallback's)
        self._truncate_to_context(request)
        serving = self._serving
        try:
            ctx = await serving._init_ctx(serving.io_processor, request)
            await serving._preprocessing(serving.io_processor, ctx)
        except (ValueError, TypeError, VLLMClientError) as exc:  # vLLM's own validation of the request
            raise vllm_refusal(exc, request, "input") from None
        try:
            ctx.pooling_params.verify(self.frontend.model_config)  # as vLLM's server does before its engine call
        except (ValueError, VLLMClientError) as exc:  # `dimensions` on a model without Matryoshka embeddings
            raise as_bad_request(exc, "dimensions") from None
        engine_requests = [
            EmbedRequest(f"{call.request_id}-{i}", self._embedding_input(engine_input["prompts"]),
                         ctx.pooling_params, call.priority)
            for i, engine_input in enumerate(ctx.engine_inputs)
        ]  # fmt: skip
        return PreparedEmbedding(
            route, engine_requests, call.request_id, call.model_name or client_request.model,
            request.encoding_format, request.embed_dtype, request.endianness, call.charge_to,
        )  # fmt: skip

    def _embedding_input(self, engine_input: dict[str, Any]) -> list[int]:
        token_ids = self._token_ids(engine_input, "input")
        cap = self._max_prompt_tokens
        if cap is not None and len(token_ids) > cap:
            raise BadRequestError(
                f"input: {len(token_ids)} tokens is over this server's limit of {cap}.", param="input"
            )
        return token_ids


def tokenizer_for(spec: ModelSpec, frontend: Frontend, max_prompt_tokens: int | None) -> PromptTokenizer:
    return (EmbeddingTokenizer if spec.task == "embed" else PromptTokenizer)(spec, frontend, max_prompt_tokens)


def refuse_unsupported(request: Any) -> None:
    """Fields vLLM accepts that this graph cannot honour: a 400, never a silently different result."""
    if getattr(request, "use_beam_search", False):
        raise BadRequestError("Beam search is not supported by this server.", param="use_beam_search")
    if getattr(request, "prompt_embeds", None) is not None:
        raise BadRequestError("prompt_embeds are not supported: engines take token ids.", param="prompt_embeds")


def vllm_refusal(exc: Exception, request: Any, param: str) -> BadRequestError:
    """vLLM's validation error as a 400 naming the field its message starts with, else param (the
    prompt's field), which a prompt over the context always names: one answer for every endpoint."""
    error = as_bad_request(exc, param_named_by(exc, request) or param)
    if isinstance(error, ContextLengthExceededError):
        error.param = param
    return error


def param_named_by(exc: Exception, request: Any) -> str | None:
    """The request field a vLLM error message starts with ("min_tokens must be ..."), if any."""
    first_word = str(exc).split(" ", 1)[0]
    return first_word if first_word in type(request).model_fields else None


def as_message_dict(message: Any) -> dict[str, Any]:
    """A chat message as the template takes it. vLLM's request model also parses harmony-format
    messages (`author`, for gpt-oss) into objects no chat template of ours takes: a 400."""
    if not isinstance(message, dict):
        raise BadRequestError("Each message needs `role` and `content` (not harmony).", param="messages")
    return {**message, "content": message_text(message.get("content"))}


def message_text(content: Any) -> Any:
    """A chat message's content as the template sees it: text parts joined, anything else as sent."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


@serve.deployment(name="tokenizer")  # options: graphs/builder.py
class Tokenizer:
    """Holds a PromptTokenizer per model version of the graph."""

    def __init__(self, specs: list[ModelSpec], cache_dir: str | None = None, max_prompt_tokens: int | None = None):
        drop_serve_access_lines()
        cache = Path(cache_dir) if cache_dir else None
        self._by_engine = {
            spec.engine_deployment_name: tokenizer_for(spec, build_frontend(spec, cache), max_prompt_tokens)
            for spec in specs
        }

    async def prepare(
        self,
        route: ModelRoute,
        request: ClientRequest,
        request_id: str,
        priority: int = 0,
        model_name: str | None = None,
        charge_to: str | None = None,
    ) -> Sealed:
        """The PreparedRequest, sealed: the ingress relays it to postprocess without unpickling vLLM objects."""
        tokenizer = self._by_engine[route.engine]
        return Sealed.of(await tokenizer.prepare(route, request, request_id, priority, model_name, charge_to))

    async def prepare_embedding(self, call: GenerationCall) -> Sealed:
        """An embeddings request's PreparedEmbedding, sealed like `prepare`'s; 400 for a generation model.

        It takes the ingress's GenerationCall whole (prepare's arguments, which bench/hops.py passes one
        by one), so the call's fields are written out once."""
        tokenizer = self._by_engine[call.route.engine]
        if not isinstance(tokenizer, EmbeddingTokenizer):
            raise not_supported(call.route.model, "Embeddings")
        return Sealed.of(await tokenizer.prepare_embedding(call))

    async def request_body_schemas(self) -> dict[str, Any]:
        return request_body_schemas()

    async def tokenize(self, route: ModelRoute, body: dict[str, Any]) -> dict[str, Any]:
        return self._by_engine[route.engine].tokenize(body)

    async def detokenize(self, route: ModelRoute, body: dict[str, Any]) -> dict[str, Any]:
        return self._by_engine[route.engine].detokenize(body)
