"""Tokenizer stage: chat template, encoding, token counting and the long-prompt policy."""

from __future__ import annotations

from pathlib import Path

from ray import serve

from deployments.errors import BadRequestError, ContextLengthExceededError
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
        bad = [i for i in request.prompt if not 0 <= i < self._vocab_size]
        if bad:
            raise BadRequestError(f"prompt token ids must be in [0, {self._vocab_size}); got {bad[:5]}", param="prompt")
        return list(request.prompt)

    def _encode_chat(self, request: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # template errors are the client's (e.g. roles the template refuses)
            raise BadRequestError(f"The chat template rejected these messages: {exc}", param="messages") from exc
        return self.tokenizer.encode(text, add_special_tokens=False)


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
