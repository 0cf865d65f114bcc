"""External OpenAI-compatible upstreams: one HTTP client each, with our own rate limit towards it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Callable

import httpx

from deployments.errors import OpenAIError, OverloadedError, UpstreamError
from deployments.messages import TextChunk
from deployments.protocol import ChatCompletionRequest, CompletionRequest
from models.spec import UpstreamSpec


class RequestRate:
    """A token bucket of requests per minute, refilled continuously."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = float(per_minute)
        self._tokens = float(per_minute)
        self._per_second = per_minute / 60
        self._clock = clock
        self._at = clock()

    def take(self) -> float | None:
        """None if a request may go now, else the seconds until one may."""
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._at) * self._per_second)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return None
        return (1 - self._tokens) / self._per_second


def upstream_body(spec: UpstreamSpec, request: CompletionRequest | ChatCompletionRequest) -> dict:
    """The client's request for the upstream: its model id, always streamed, usage included."""
    body = request.model_dump(exclude_none=True, exclude_defaults=True)
    return {**body, "model": spec.upstream_model, "stream": True, "stream_options": {"include_usage": True}}


def chunk_text(payload: dict) -> tuple[str, str | None]:
    if not payload.get("choices"):
        return "", None
    choice = payload["choices"][0]
    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
    return text or "", choice.get("finish_reason")


class UpstreamClient:
    """Streams one upstream's completions as TextChunks; its failures as OpenAI errors."""

    def __init__(self, spec: UpstreamSpec, http: httpx.AsyncClient) -> None:
        self.spec = spec
        self._http = http
        self._rate = RequestRate(spec.requests_per_minute) if spec.requests_per_minute else None
        api_key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def stream(self, request: CompletionRequest | ChatCompletionRequest) -> AsyncIterator[TextChunk]:
        wait = self._rate.take() if self._rate else None
        if wait is not None:
            raise OverloadedError(f"The rate limit towards upstream `{self.spec.name}` is used up.", retry_after_s=wait)
        path = "chat/completions" if isinstance(request, ChatCompletionRequest) else "completions"
        url = f"{self.spec.base_url.rstrip('/')}/{path}"
        body = upstream_body(self.spec, request)
        try:
            async with self._http.stream(
                "POST", url, json=body, headers=self._headers, timeout=self.spec.timeout_s
            ) as response:
                if response.status_code != 200:
                    raise self._refusal(response.status_code, (await response.aread()).decode(errors="replace"))
                async for chunk in self._chunks(response):
                    yield chunk
        except httpx.HTTPError as exc:
            raise UpstreamError(f"Upstream `{self.spec.name}` failed: {type(exc).__name__}: {exc}") from None

    async def _chunks(self, response: httpx.Response) -> AsyncIterator[TextChunk]:
        """Text as it comes; then one empty chunk with the finish reason and usage, which arrives last."""
        prompt_tokens = completion_tokens = 0
        finish_reason: str | None = None
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[len("data: ") :])
            if "error" in payload:
                raise UpstreamError(f"Upstream `{self.spec.name}` failed mid-stream: {payload['error']}")
            usage = payload.get("usage") or {}
            prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
            completion_tokens = usage.get("completion_tokens", completion_tokens)
            text, finish = chunk_text(payload)
            finish_reason = finish or finish_reason
            if text:
                yield TextChunk(text, prompt_tokens, completion_tokens)
        if finish_reason is None:
            raise UpstreamError(f"Upstream `{self.spec.name}` ended the stream before finishing.")
        yield TextChunk("", prompt_tokens, completion_tokens, finish_reason)

    def _refusal(self, status: int, text: str) -> OpenAIError:
        if status == 429:
            return OverloadedError(f"Upstream `{self.spec.name}` is rate limiting us.", retry_after_s=1)
        if status >= 500:
            return UpstreamError(f"Upstream `{self.spec.name}` answered {status}: {text[:300]}")
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text[:300]
        return OpenAIError(f"Upstream `{self.spec.name}`: {message}", status_code=status, code="upstream_rejected")
