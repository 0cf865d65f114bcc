"""Stand-ins the unit-level test modules share: a fake clock, a scripted engine, every stage in one process.

ScriptedEngine and InProcessStages still run vLLM's real front end and build vLLM's output objects,
so tests that use them (through the `frontend_for` fixture) are marked `e2e` and stay out of
`make test-unit` (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from servegraph.deployments.messages import EngineRequest, GenerationCall, PreparedRequest, ResponseChunk, Sealed
from servegraph.deployments.postprocess import ResponseShaper
from servegraph.deployments.protocol import request_body_schemas
from servegraph.deployments.router import ModelRegistry
from servegraph.deployments.tokenizer import PromptTokenizer


class FakeClock:
    """A clock that moves only when a test sets `now`, so windows and cool-downs need no sleeping."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ScriptedEngine:
    """Echoes the prompt's token ids back as vLLM RequestOutputs; can fail after a few tokens or be slow.

    Streams get one delta per token, other requests one final output, as vLLM's output kinds do.
    """

    def __init__(self, fail_after: int | None = None, error: Exception | None = None, delay_s: float = 0) -> None:
        self.fail_after = fail_after
        self.error = error or RuntimeError("engine died")
        self.delay_s = delay_s
        self.tokenizer = None  # set by InProcessStages

    async def generate(self, requests: list[EngineRequest]) -> AsyncIterator[tuple[int, object]]:
        for index, request in enumerate(requests):
            async for output in self._outputs(request):
                yield index, output

    async def _outputs(self, request: EngineRequest) -> AsyncIterator:
        from vllm.outputs import CompletionOutput, RequestOutput
        from vllm.sampling_params import RequestOutputKind

        ids, params = request.prompt_token_ids, request.sampling_params
        delta = params.output_kind is RequestOutputKind.DELTA
        produced: list[int] = []
        for i in range(params.max_tokens):
            if self.fail_after is not None and i == self.fail_after:
                raise self.error
            if i and self.delay_s:
                await asyncio.sleep(self.delay_s)  # the engine's pace, not a wait in the test
            produced.append(ids[i % len(ids)])
            last = i == params.max_tokens - 1
            if not (delta or last):
                continue
            new = produced[-1:] if delta else produced
            text = self.tokenizer.decode(new)
            finish = "length" if last else None
            completion = CompletionOutput(index=0, text=text, token_ids=new, cumulative_logprob=None, logprobs=None,
                                          finish_reason=finish)  # fmt: skip
            prompt_ids = ids if len(produced) == 1 or not delta else None  # as the engine: once, when streaming
            output = RequestOutput(request.request_id, None, prompt_ids, None, [completion], finished=last)
            output.engine_seconds = 0.5 if last else None
            yield output


class InProcessStages:
    """Every stage in this process: vLLM's real renderer and serving classes, a scripted engine per model version."""

    def __init__(self, specs, frontend_for, engines: dict[str, ScriptedEngine], upstreams=()) -> None:
        self.registry = ModelRegistry(specs, list(upstreams))
        self._prompts = {spec.engine_deployment_name: PromptTokenizer(spec, frontend_for(spec)) for spec in specs}
        self._shapers = {spec.engine_deployment_name: ResponseShaper(frontend_for(spec)) for spec in specs}
        self._engines = engines
        for engine in engines.values():
            engine.tokenizer = frontend_for(specs[0]).tokenizer

    async def chain(self, model: str, session_key: str | None):
        return self.registry.chain(model, session_key)

    async def _prepare(self, call: GenerationCall) -> PreparedRequest:
        """As the tokenizer stage prepares it, sealed (pickled) as it crosses to postprocess in Serve."""
        tokenizer = self._prompts[call.route.engine]
        prepared = await tokenizer.prepare(call.route, copy.deepcopy(call.request), call.request_id, call.priority,
                                           call.model_name, call.charge_to)  # fmt: skip
        return Sealed.of(prepared).open()

    def _outputs(self, prepared: PreparedRequest) -> AsyncIterator:
        return self._engines[prepared.route.engine].generate(prepared.engine_requests)

    async def stream(self, call: GenerationCall) -> AsyncIterator[ResponseChunk]:
        prepared = await self._prepare(call)
        async for chunk in self._shapers[prepared.route.engine].stream(prepared, self._outputs(prepared)):
            yield chunk

    async def complete(self, call: GenerationCall) -> ResponseChunk:
        prepared = await self._prepare(call)
        return await self._shapers[prepared.route.engine].complete(prepared, self._outputs(prepared))

    def upstream(self, upstream):
        raise AssertionError("no upstream in these tests")

    async def model_list(self):
        return self.registry.model_list()

    async def tokenizer_call(self, method, route, body):
        return getattr(self._prompts[route.engine], method)(body)

    async def request_body_schemas(self):
        return request_body_schemas()


class IdentityProvider:
    """A stand-in OAuth/OIDC provider: an RSA signing key, its JWKS file, and the JWTs it issues."""

    ISSUER = "https://idp.test"
    AUDIENCE = "servegraph-tests"
    KEY_ID = "test-1"

    def __init__(self, directory: Path) -> None:
        import jwt
        from cryptography.hazmat.primitives.asymmetric import rsa

        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key()))
        self.jwks = {"keys": [{**public, "kid": self.KEY_ID, "use": "sig", "alg": "RS256"}]}
        self.jwks_file = directory / "jwks.json"
        self.jwks_file.write_text(json.dumps(self.jwks))

    def config(self) -> dict[str, str]:
        """The `auth.jwt` section of a config trusting this provider."""
        return {"jwks_file": str(self.jwks_file), "issuer": self.ISSUER, "audience": self.AUDIENCE}

    def token(self, tenant: str, expires_in_s: float = 300, kid: str = KEY_ID, **claims: object) -> str:
        import jwt

        payload = {"tenant": tenant, "iss": self.ISSUER, "aud": self.AUDIENCE, "exp": time.time() + expires_in_s}
        return jwt.encode({**payload, **claims}, self._key, algorithm="RS256", headers={"kid": kid})
