"""Tokenizer stage: chat template, encoding, token counting and the long-prompt policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray import serve

from deployments.errors import BadRequestError, ContextLengthExceededError, invalid_field
from deployments.messages import EngineRequest, ModelRoute, PreparedRequest, SamplingSettings
from deployments.protocol import ChatCompletionRequest, CompletionRequest
from models.build import resolve_model_source
from models.spec import LongPromptPolicy, ModelSpec

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def load_tokenizer(spec: ModelSpec, cache_dir: Path | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_source(spec, cache_dir))


class PromptTokenizer:
    """Turns one model's OpenAI requests into engine requests that fit its context."""

    def __init__(self, spec: ModelSpec, tokenizer) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self._vocab_size = len(tokenizer)
        # The engine has no tokenizer (skip_tokenizer_init), so EOS must be named explicitly;
        # vLLM's ignore_eos does not cover explicit stop_token_ids.
        self._stop_token_ids = tuple(i for i in [tokenizer.eos_token_id] if i is not None)

    def prepare(
        self,
        route: ModelRoute,
        request: CompletionRequest | ChatCompletionRequest,
        request_id: str,
        priority: int = 0,
    ) -> PreparedRequest:
        """priority: vLLM's, lower first (see graphs.config.PriorityClass)."""
        if isinstance(request, ChatCompletionRequest):
            prompt_ids, param = self._encode_chat(request), "messages"
            requested, default = request.requested_max_tokens, self.spec.default_max_tokens
        else:
            prompt_ids, param = self._encode_completion(request), "prompt"
            requested, default = request.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS
        prompt_ids, max_tokens, truncated = self.fit_context(prompt_ids, requested, default, param)
        if (request.min_tokens or 0) > max_tokens:  # vLLM refuses it too, but as the engine's failure
            source = "" if requested is not None else ", the default for this request"
            raise BadRequestError(
                f"min_tokens={request.min_tokens} must be at most max_tokens ({max_tokens}{source}).",
                param="min_tokens",
            )
        sampling = SamplingSettings(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
            top_k=request.top_k or 0,
            min_tokens=request.min_tokens or 0,
            repetition_penalty=request.repetition_penalty or 1.0,
            stop_token_ids=() if request.ignore_eos else self._stop_token_ids,
        )
        return PreparedRequest(
            route=route,
            engine_request=EngineRequest(request_id, prompt_ids, sampling, priority),
            stop_strings=tuple(request.stop_strings),
            truncated_tokens=truncated,
        )

    def fit_context(
        self, prompt_ids: list[int], requested: int | None, default: int, param: str
    ) -> tuple[list[int], int, int]:
        """Apply max_tokens limits and the long-prompt policy.

        Returns the prompt ids to send, the max_tokens to use and how many prompt tokens
        were cut. An explicit max_tokens is never shrunk; the default one shrinks to
        whatever context the prompt leaves.
        """
        limit = self.spec.max_model_len
        if requested is not None and requested >= limit:
            raise BadRequestError(
                f"max_tokens={requested} is beyond this model's limit: it must be less than the "
                f"context length of {limit} tokens.",
                param="max_tokens",
            )
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise BadRequestError("The prompt is empty.", param=param)
        max_tokens = requested or min(default, limit - 1)
        if n_prompt + max_tokens <= limit:
            return prompt_ids, max_tokens, 0
        if requested is None and n_prompt < limit:
            return prompt_ids, limit - n_prompt, 0
        keep = limit - max_tokens
        policy = self.spec.long_prompt
        if policy is LongPromptPolicy.reject:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the completion). "
                "Please reduce the length of the prompt or max_tokens.",
                param=param,
            )
        kept = prompt_ids[-keep:] if policy is LongPromptPolicy.truncate_left else prompt_ids[:keep]
        return kept, max_tokens, n_prompt - keep

    def _encode_completion(self, request: CompletionRequest) -> list[int]:
        if isinstance(request.prompt, str):
            return self.tokenizer.encode(request.prompt, add_special_tokens=True)
        return self._known_token_ids(request.prompt, "prompt")

    def _known_token_ids(self, token_ids: list[int], param: str) -> list[int]:
        bad = [i for i in token_ids if not 0 <= i < self._vocab_size]
        if bad:
            raise BadRequestError(f"{param} token ids must be in [0, {self._vocab_size}); got {bad[:5]}", param=param)
        return list(token_ids)

    def _encode_chat(self, request: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        return self._render_chat(messages, add_generation_prompt=True)

    def _render_chat(
        self, messages: list[dict[str, Any]], add_special_tokens: bool = False, **template_kwargs: Any
    ) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
        except Exception as exc:  # template errors are the client's (e.g. roles the template refuses)
            raise BadRequestError(f"The chat template rejected these messages: {exc}", param="messages") from exc
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's POST /tokenize: a prompt, or chat messages through the chat template."""
        from vllm.entrypoints.serve.tokenize.protocol import (
            TokenizeChatRequest,
            TokenizeCompletionRequest,
            TokenizeResponse,
        )

        if "messages" in body:
            chat = parse_vllm(TokenizeChatRequest, body)
            if chat.chat_template or "chat_template" in (chat.chat_template_kwargs or {}):
                # As vLLM without --trust-request-chat-template: a template is code that runs here.
                raise BadRequestError("A chat template from the request is not accepted.", param="chat_template")
            kwargs = {**(chat.chat_template_kwargs or {}), "add_generation_prompt": chat.add_generation_prompt,
                      "continue_final_message": chat.continue_final_message}  # fmt: skip
            kwargs.pop("tokenize", None)
            if chat.tools:
                kwargs["tools"] = [tool.model_dump(exclude_none=True) for tool in chat.tools]
            messages = [{**message, "content": message_text(message.get("content"))} for message in chat.messages]
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


def message_text(content: Any) -> Any:
    """A chat message's content as the template sees it: text parts joined, anything else as sent."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def parse_vllm(model: type, body: dict[str, Any]):
    """body as one of vLLM's protocol models; what it refuses is a 400 naming the field."""
    from vllm.exceptions import VLLMValidationError

    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise invalid_field(exc.errors()) from None
    except VLLMValidationError as exc:
        raise BadRequestError(str(exc), param=exc.parameter) from None


@serve.deployment(name="tokenizer", ray_actor_options={"num_cpus": 0.25})
class Tokenizer:
    """Holds a PromptTokenizer per model version of the graph."""

    def __init__(self, specs: list[ModelSpec], cache_dir: str | None = None) -> None:
        cache = Path(cache_dir) if cache_dir else None
        self._by_engine = {
            spec.engine_deployment_name: PromptTokenizer(spec, load_tokenizer(spec, cache)) for spec in specs
        }

    async def prepare(
        self,
        route: ModelRoute,
        request: CompletionRequest | ChatCompletionRequest,
        request_id: str,
        priority: int = 0,
    ) -> PreparedRequest:
        return self._by_engine[route.engine].prepare(route, request, request_id, priority)

    async def tokenize(self, route: ModelRoute, body: dict[str, Any]) -> dict[str, Any]:
        return self._by_engine[route.engine].tokenize(body)

    async def detokenize(self, route: ModelRoute, body: dict[str, Any]) -> dict[str, Any]:
        return self._by_engine[route.engine].detokenize(body)
