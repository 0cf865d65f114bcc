"""Traffic splits, fallback chains, circuit breakers and upstream parsing, without Ray."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
from fastapi.testclient import TestClient

from servegraph.autoscale.policy import StageKind, engine_scaling, replicas_for_load, stage_autoscaling
from servegraph.deployments.errors import ContextLengthExceededError, EngineCrashedError, OpenAIError, RateLimitError
from servegraph.deployments.fallback import (
    BreakerState,
    CircuitBreaker,
    DefaultFallbackPolicy,
    FallbackChain,
    load_fallback_policy,
)
from servegraph.deployments.ingress import SERVED_BY_HEADER, build_openai_app
from servegraph.deployments.protocol import ClientRequest
from servegraph.deployments.router import ModelRegistry, TrafficSplit
from servegraph.deployments.upstream import RequestRate, UpstreamClient
from servegraph.models.config import IngressConfig, LLMAppArgs
from servegraph.models.spec import CircuitBreakerConfig, EngineAutoscaling, UpstreamSpec
from tests.fakes import FakeClock, InProcessStages, ScriptedEngine


class CountingEngine(ScriptedEngine):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls = 0

    async def generate(self, prepared):
        self.calls += 1
        async for chunk in super().generate(prepared):
            yield chunk


@pytest.fixture
def two_models(tiny_spec):
    """`tiny` (64-token context, falls back to `roomy`) and `roomy` (512 tokens)."""
    tiny = tiny_spec.model_copy(update={"fallbacks": ["roomy"], "circuit_breaker": CircuitBreakerConfig(
        failure_threshold=2, cooldown_s=10)})  # fmt: skip
    roomy = tiny_spec.model_copy(update={"name": "roomy", "aliases": [], "max_model_len": 512})
    return tiny, roomy


def chain_client(two_models, frontend_for, engines, clock=None) -> TestClient:
    stages = InProcessStages(list(two_models), frontend_for, engines)
    app = build_openai_app(stages, "llm", fallbacks=FallbackChain(clock or FakeClock()))
    return TestClient(app, raise_server_exceptions=False)


BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 3}


def test_overloaded_model_falls_back_and_says_who_served(two_models, frontend_for):
    from ray.serve.exceptions import BackPressureError

    engines = {"engine-tiny-v1": ScriptedEngine(fail_after=0, error=BackPressureError(1, 1)),
               "engine-roomy-v1": ScriptedEngine()}  # fmt: skip
    client = chain_client(two_models, frontend_for, engines)
    for stream in (False, True):
        response = client.post("/v1/completions", json={**BODY, "stream": stream})
        assert response.status_code == 200, response.text
        assert response.headers[SERVED_BY_HEADER] == "roomy@v1"
        assert '"model":"roomy"' in response.text  # the fallback's name, as it served the request


def test_prompt_over_the_context_goes_to_a_longer_model(two_models, frontend_for):
    engines = {"engine-tiny-v1": CountingEngine(), "engine-roomy-v1": ScriptedEngine()}
    client = chain_client(two_models, frontend_for, engines)
    long_prompt = "hello world " * 40
    response = client.post("/v1/completions", json={**BODY, "prompt": long_prompt})
    assert response.status_code == 200 and response.headers[SERVED_BY_HEADER] == "roomy@v1"
    assert engines["engine-tiny-v1"].calls == 0
    too_long = client.post("/v1/completions", json={**BODY, "prompt": long_prompt * 10})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert "64 tokens" in too_long.json()["error"]["message"]  # the requested model's error


def test_tenant_rate_limit_never_falls_back(two_models, frontend_for):
    roomy = CountingEngine()
    engines = {"engine-tiny-v1": ScriptedEngine(fail_after=0, error=RateLimitError("quota used up")),
               "engine-roomy-v1": roomy}  # fmt: skip
    response = chain_client(two_models, frontend_for, engines).post("/v1/completions", json=BODY)
    assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limit_exceeded"
    assert roomy.calls == 0


def test_request_running_when_its_engine_crashed_is_not_retried_but_counts_on_the_breaker(two_models, frontend_for):
    crash = EngineCrashedError("The model's engine crashed while serving this request (r-1).")
    tiny = CountingEngine(fail_after=0, error=crash)
    roomy = CountingEngine()
    client = chain_client(two_models, frontend_for, {"engine-tiny-v1": tiny, "engine-roomy-v1": roomy})
    for stream in (False, True):  # a stream that has sent nothing yet gets a plain error response too
        response = client.post("/v1/completions", json={**BODY, "stream": stream})
        assert response.status_code == 500, response.text
        assert response.json()["error"]["code"] == "engine_crashed" and "r-1" in response.json()["error"]["message"]
    assert tiny.calls == 2 and roomy.calls == 0  # no second replica, no fallback model
    served = client.post("/v1/completions", json=BODY).headers[SERVED_BY_HEADER]
    assert served == "roomy@v1"  # two failures opened tiny's breaker, as for any other failure


def test_breaker_opens_skips_the_model_then_probes_and_closes(two_models, frontend_for):
    clock = FakeClock()
    tiny = CountingEngine(fail_after=0)
    client = chain_client(two_models, frontend_for, {"engine-tiny-v1": tiny, "engine-roomy-v1": ScriptedEngine()},
                          clock)  # fmt: skip
    served = [client.post("/v1/completions", json=BODY).headers[SERVED_BY_HEADER] for _ in range(4)]
    assert served == ["roomy@v1"] * 4
    assert tiny.calls == 2  # two failures opened the breaker; later requests skipped tiny
    clock.now = 11  # past the cool-down: one probe
    tiny.fail_after = None
    assert client.post("/v1/completions", json=BODY).headers[SERVED_BY_HEADER] == "tiny@v1"
    assert tiny.calls == 3


def test_breaker_states_with_a_clock():
    clock = FakeClock()
    breaker = CircuitBreaker("x", CircuitBreakerConfig(failure_threshold=3, cooldown_s=5), clock)
    for _ in range(2):
        breaker.failed()
    assert breaker.state is BreakerState.closed and breaker.allow()
    breaker.succeeded()
    for _ in range(3):
        breaker.failed()
    assert breaker.state is BreakerState.open and not breaker.allow()
    clock.now = 5
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.failed()  # the probe failed: open again for a full cool-down
    assert breaker.state is BreakerState.open
    clock.now = 10
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.state is BreakerState.closed


def test_unavailable_everywhere_is_503_from_the_first_model(two_models, frontend_for):
    from ray.serve.exceptions import BackPressureError

    busy = ScriptedEngine(fail_after=0, error=BackPressureError(1, 1, retry_after_s=2))
    client = chain_client(two_models, frontend_for, {"engine-tiny-v1": busy, "engine-roomy-v1": busy})
    response = client.post("/v1/completions", json=BODY)
    assert response.status_code == 503 and response.headers["retry-after"] == "2"


def test_traffic_split_weights_and_stickiness(tiny_spec, frontend_for):
    v2 = tiny_spec.model_copy(update={"version": "v2"})
    registry = ModelRegistry([tiny_spec, v2])
    assert {registry.resolve("tiny", f"user-{i}").version for i in range(50)} == {"v1"}  # first version by default
    registry.set_traffic({"tiny": {"v1": 80, "v2": 20}})
    picks = Counter(registry.resolve("tiny-chat", f"user-{i}").version for i in range(2000))
    assert 300 < picks["v2"] < 500
    assert len({registry.resolve("tiny", "alice").version for _ in range(20)}) == 1  # sticky
    with pytest.raises(ValueError, match="not deployed"):
        registry.set_traffic({"tiny": {"v3": 1}})


def test_moving_weight_moves_only_sessions_at_the_boundary():
    before, after = TrafficSplit({"v1": 90, "v2": 10}), TrafficSplit({"v1": 50, "v2": 50})
    users = [f"u{i}" for i in range(1000)]
    assert all(after.pick(u) == "v2" for u in users if before.pick(u) == "v2")


def test_sticky_session_header_and_version_in_response(tiny_spec, frontend_for):
    v2 = tiny_spec.model_copy(update={"version": "v2"})
    stages = InProcessStages([tiny_spec, v2], frontend_for, {"engine-tiny-v1": ScriptedEngine(),
                                                               "engine-tiny-v2": ScriptedEngine()})  # fmt: skip
    stages.registry.set_traffic({"tiny": {"v1": 50, "v2": 50}})
    client = TestClient(build_openai_app(stages), raise_server_exceptions=False)
    by_session = {
        session: {client.post("/v1/completions", json=BODY, headers={"x-session-id": session}).headers[
            SERVED_BY_HEADER] for _ in range(5)}
        for session in ("a", "b", "c", "d", "e", "f")
    }  # fmt: skip
    assert all(len(versions) == 1 for versions in by_session.values())
    assert set().union(*by_session.values()) == {"tiny@v1", "tiny@v2"}


def test_config_refuses_unknown_fallbacks_and_duplicate_versions(tiny_spec):
    tiny = tiny_spec.model_dump()
    with pytest.raises(ValueError, match="fallback 'nope'"):
        LLMAppArgs.model_validate({"models": [{**tiny, "fallbacks": ["nope"]}], "auth": {"enabled": False}})
    with pytest.raises(ValueError, match="version 'v1' twice"):
        LLMAppArgs.model_validate({"models": [tiny, tiny], "auth": {"enabled": False}})
    with pytest.raises(ValueError, match="add up to more than 0"):
        IngressConfig.model_validate({"traffic": {"tiny": {"v1": 0}}})


def test_engine_autoscaling_target_follows_batch_capacity(tiny_spec):
    small = tiny_spec.model_copy(update={"max_num_seqs": 8, "autoscaling": EngineAutoscaling(max_replicas=4)})
    large = tiny_spec.model_copy(update={"max_num_seqs": 64, "autoscaling": EngineAutoscaling(max_replicas=4)})
    assert engine_scaling(small).target_ongoing_requests == 6
    assert engine_scaling(large).target_ongoing_requests == 48
    assert replicas_for_load(engine_scaling(small), 20) == 4 and replicas_for_load(engine_scaling(large), 20) == 1
    zero = EngineAutoscaling(min_replicas=0, max_replicas=2)
    assert replicas_for_load(engine_scaling(tiny_spec.model_copy(update={"autoscaling": zero})), 0) == 0
    assert stage_autoscaling(StageKind.router)["max_replicas"] == 1
    with pytest.raises(ValueError, match="min_replicas <= initial_replicas"):
        EngineAutoscaling(min_replicas=2, max_replicas=1)


def test_request_rate_refills():
    clock = FakeClock()
    rate = RequestRate(60, clock)
    assert all(rate.take() is None for _ in range(60))
    assert rate.take() == pytest.approx(1.0)
    clock.now = 1.0
    assert rate.take() is None


def upstream_client(handler, **spec) -> UpstreamClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return UpstreamClient(UpstreamSpec(name="ext", base_url="http://upstream/v1", model="remote", **spec), http)


async def collect(client: UpstreamClient, request) -> list:
    return [chunk async for chunk in client.stream(request, "ext")]


def test_upstream_stream_is_relayed_under_the_clients_model_name_with_usage():
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        body = (
            'data: {"choices":[{"delta":{"content":"Hel"},"finish_reason":null}]}\n\n'
            'data: {"choices":[{"delta":{"content":"lo"},"finish_reason":"stop"}]}\n\n'
            'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\ndata: [DONE]\n\n'
        )
        return httpx.Response(200, text=body)

    request = ClientRequest.of(
        "chat", {"model": "ext", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    chunks = asyncio.run(collect(upstream_client(handler, api_key_env="HOME"), request))
    assert "".join(c.text for c in chunks) == "Hello"
    assert [c.data.count('"model": "ext"') for c in chunks] == [1, 1, 0]  # the usage event: not asked for
    assert chunks[-1].data == "data: [DONE]\n\n" and chunks[-1].finished
    assert (chunks[-1].finish_reason, chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == ("stop", 7, 2)
    assert sent[0].url.path == "/v1/chat/completions" and b'"model":"remote"' in sent[0].content
    assert sent[0].headers["authorization"].startswith("Bearer ")


@pytest.mark.parametrize(
    ("status", "code"), [(500, "upstream_unavailable"), (429, "overloaded"), (400, "upstream_rejected")]
)
def test_upstream_refusals_become_openai_errors(status, code):
    client = upstream_client(lambda request: httpx.Response(status, json={"error": {"message": "no"}}))
    request = ClientRequest.of(
        "chat", {"model": "ext", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    with pytest.raises(Exception) as caught:
        asyncio.run(collect(client, request))
    assert caught.value.code == code


class NoContextWindowFallback(DefaultFallbackPolicy):
    """A team's policy, named in its config: a prompt too long for the model is the client's to shorten."""

    def moves_on(self, error: OpenAIError) -> bool:
        return not isinstance(error, ContextLengthExceededError) and super().moves_on(error)


@dataclass(frozen=True)
class Target:
    name: str
    breaker: CircuitBreakerConfig = CircuitBreakerConfig()


def test_the_fallback_policy_named_in_config_decides_what_moves_on():
    short, long = Target("short"), Target("long")

    async def attempt(target: Target) -> str:
        if target is short:
            raise ContextLengthExceededError("the prompt is longer than the context")
        return "served"

    default = FallbackChain(FakeClock(), load_fallback_policy(None))
    assert asyncio.run(default.first_served([short, long], attempt)) == (long, "served")
    custom = FallbackChain(FakeClock(), load_fallback_policy("tests.test_resilience:NoContextWindowFallback"))
    with pytest.raises(ContextLengthExceededError):
        asyncio.run(custom.first_served([short, long], attempt))
    with pytest.raises(ValueError, match="fallback_policy"):  # the config field that names it: module:Class
        LLMAppArgs.model_validate({"models": [], "auth": {"enabled": False}, "fallback_policy": "not a path"})
