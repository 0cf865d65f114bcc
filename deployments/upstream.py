"""External OpenAI-compatible upstreams: one HTTP client each, with our own rate limit towards it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Callable

import httpx

from servegraph.deployments.errors import BadRequestError, OpenAIError, OverloadedError, UpstreamError
from servegraph.deployments.messages import ResponseChunk
from servegraph.deployments.protocol import ClientRequest
from servegraph.models.spec import UpstreamSpec


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


def upstream_body(spec: UpstreamSpec, request: ClientRequest) -> dict:
    """The client's request for the upstream, as the client sent it, under the upstream's model id.

    Streams always ask for usage, which metering needs; the client sees it only if it asked.
    """
    body = {**request.body, "model": spec.upstream_model}
    if request.stream:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return body


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


class UpstreamClient:
    """Relays one upstream's responses under the client's model name; its failures as OpenAI errors."""

    def __init__(self, spec: UpstreamSpec, http: httpx.AsyncClient) -> None:
        self.spec = spec
        self._http = http
        self._rate = RequestRate(spec.requests_per_minute) if spec.requests_per_minute else None
        api_key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _admit(self) -> None:
        wait = self._rate.take() if self._rate else None
        if wait is not None:
            raise OverloadedError(f"The rate limit towards upstream `{self.spec.name}` is used up.", retry_after_s=wait)

    def _url(self, request: ClientRequest) -> str:
        kind = request.kind
        if kind == "responses":
            raise BadRequestError(
                f"The Responses API is served by this graph's own models, not by upstream `{self.spec.name}`.",
                param="model",
            )
        path = "chat/completions" if kind == "chat" else "completions"
        return f"{self.spec.base_url.rstrip('/')}/{path}"

    async def complete(self, request: ClientRequest, model_name: str) -> ResponseChunk:
        url = self._url(request)
        self._admit()
        try:
            response = await self._http.post(
                url, json=upstream_body(self.spec, request), headers=self._headers,
                timeout=self.spec.timeout_s,
            )  # fmt: skip
        except httpx.HTTPError as exc:
            raise UpstreamError(f"Upstream `{self.spec.name}` failed: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise self._refusal(response.status_code, response.text)
        payload = response.json()
        usage = payload.get("usage") or {}
        finish = next((c.get("finish_reason") for c in payload.get("choices") or []), None)
        return ResponseChunk(
            json.dumps({**payload, "model": model_name}),
            usage.get("prompt_tokens", 0),
            usage.get("completion_tokens", 0),
            finish,
            finished=True,
            text=choice_text(payload),
        )

    async def stream(self, request: ClientRequest, model_name: str) -> AsyncIterator[ResponseChunk]:
        url = self._url(request)
        self._admit()
        wants_usage = request.include_usage
        try:
            async with self._http.stream(
                "POST", url, json=upstream_body(self.spec, request), headers=self._headers,
                timeout=self.spec.timeout_s,
            ) as response:  # fmt: skip
                if response.status_code != 200:
                    raise self._refusal(response.status_code, (await response.aread()).decode(errors="replace"))
                async for chunk in self._chunks(response, model_name, wants_usage):
                    yield chunk
        except httpx.HTTPError as exc:
            raise UpstreamError(f"Upstream `{self.spec.name}` failed: {type(exc).__name__}: {exc}") from None

    async def _chunks(
        self, response: httpx.Response, model_name: str, wants_usage: bool
    ) -> AsyncIterator[ResponseChunk]:
        """Each event under the client's model name; [DONE] last, with the finish reason and usage."""
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
            choices = payload.get("choices") or []
            finish_reason = next((c["finish_reason"] for c in choices if c.get("finish_reason")), finish_reason)
            if choices or wants_usage:
                event = sse(json.dumps({**payload, "model": model_name}))
                yield ResponseChunk(event, prompt_tokens, completion_tokens, text=choice_text(payload))
        if finish_reason is None:
            raise UpstreamError(f"Upstream `{self.spec.name}` ended the stream before finishing.")
        yield ResponseChunk(sse("[DONE]"), prompt_tokens, completion_tokens, finish_reason, finished=True)

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


def choice_text(payload: dict) -> str:
    """The text of a response or stream event's choices: completions' text, chat's content or delta."""
    parts = []
    for choice in payload.get("choices") or []:
        message = choice.get("message") or choice.get("delta") or {}
        parts.append(choice.get("text") or message.get("content") or "")
    return "".join(parts)
