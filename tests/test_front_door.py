"""The front door without Ray or vLLM: credentials before the body, auth backends, docs, limits, safe parsing.

The app is the real ingress app over stages that fail the test if a request reaches them:
everything here must be decided before the graph is asked anything.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient

from servegraph.deployments.auth import Tenant, hash_key
from servegraph.deployments.errors import (
    AuthenticationError,
    BadRequestError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)
from servegraph.deployments.front_door import FrontDoor, TenantDirectory, bounded
from servegraph.deployments.ingress import build_openai_app
from servegraph.deployments.jwt_auth import JWTAuthenticator
from servegraph.deployments.protocol import ModelCard, ModelList
from servegraph.deployments.request_limits import check_limits, parse_body
from servegraph.deployments.telemetry import MetricLabels, RequestRecord
from servegraph.models.config import AuthConfig, JWTConfig, RequestLimits, TenantSpec
from tests.fakes import FakeClock, IdentityProvider

KEY = "sk-front-a"


class GraphNeverAsked:
    """GraphStages that list one model and fail the test if a request gets further."""

    async def model_list(self) -> ModelList:
        return ModelList(data=[ModelCard(id="tiny", root="tiny", max_model_len=512, versions=["v1"])])

    async def request_body_schemas(self) -> dict[str, Any]:
        return {"bodies": {"/v1/completions": {"$ref": "#/components/schemas/Body"}}, "components": {"Body": {}}}

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a request the front door should have refused reached the graph ({name})")


def keyed(docs: str = "key", **extra: Any) -> AuthConfig:
    return AuthConfig(tenants=[TenantSpec(name="a", key_hashes=[hash_key(KEY)])], docs=docs, **extra)


def client_for(auth: AuthConfig, limits: RequestLimits | None = None, records: list | None = None) -> TestClient:
    observe = records.append if records is not None else lambda record: None
    app = build_openai_app(GraphNeverAsked(), observe=observe, tenants=TenantDirectory(auth), limits=limits)
    return TestClient(app, raise_server_exceptions=False)


BEARER = {"Authorization": f"Bearer {KEY}"}
COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 2}


def asgi_call(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, bool]:
    """The status app answers with, and whether it read any of the body."""
    read: list[bool] = []
    sent: list[dict] = []

    async def receive() -> dict:
        read.append(True)
        return {"type": "http.request", "body": b"{not json", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "headers": headers,
             "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("t", 80),
             "client": ("c", 1)}  # fmt: skip
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], bool(read)


def test_credentials_are_checked_before_a_byte_of_the_body_is_read():
    app = build_openai_app(GraphNeverAsked(), tenants=TenantDirectory(keyed()))
    huge = [(b"content-length", str(10**9).encode()), (b"content-type", b"application/json")]
    assert asgi_call(app, "/v1/completions", huge) == (401, False)
    assert asgi_call(app, "/v1/chat/completions", [(b"authorization", b"Bearer sk-wrong"), *huge]) == (401, False)
    assert asgi_call(app, "/v1/completions", [(b"authorization", f"Bearer {KEY}".encode()), *huge]) == (413, False)
    short = [(b"authorization", f"Bearer {KEY}".encode()), (b"content-length", b"9")]
    assert asgi_call(app, "/v1/completions", short) == (400, True)  # authenticated: now the body is read


def test_unauthenticated_requests_are_not_metered_and_health_is_open():
    records: list[RequestRecord] = []
    client = client_for(keyed(), records=records)
    assert client.post("/v1/completions", content=b"{broken").status_code == 401
    assert client.post("/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer x"}).status_code == 401
    assert client.get("/v1/usage").status_code == 401
    assert client.get("/healthz").status_code == 200
    assert records == []
    assert client.post("/v1/completions", content=b"{broken", headers=BEARER).status_code == 400
    assert [(r.tenant, r.status) for r in records] == [("a", 400)]


@pytest.mark.parametrize(
    "docs, anonymous, with_key",
    [("key", 401, 200), ("off", 401, 404), ("public", 200, 200)],
)
def test_docs_are_behind_a_key_off_or_public(docs, anonymous, with_key):
    client = client_for(keyed(docs))
    for path in ("/docs", "/openapi.json"):
        assert client.get(path).status_code == anonymous
        assert client.get(path, headers=BEARER).status_code == with_key


def test_the_document_lists_every_status_with_openais_error_body_and_the_request_bodies():
    document = client_for(keyed()).get("/openapi.json", headers=BEARER).json()
    completions = document["paths"]["/v1/completions"]["post"]
    assert completions["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Body"}
    assert set(completions["responses"]) == {
        "200",
        "400",
        "401",
        "403",
        "404",
        "413",
        "429",
        "500",
        "502",
        "503",
        "504",
    }
    assert set(completions["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    error = completions["responses"]["401"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorBody"} and "ErrorDetail" in document["components"]["schemas"]
    assert set(document["paths"]["/v1/models"]["get"]["responses"]) >= {"200", "401"}
    assert "/openapi.json" not in document["paths"] and "/docs" not in document["paths"]


def test_chunked_body_past_the_limit_is_refused_as_it_arrives():
    chunks = [{"type": "http.request", "body": b"x" * 600, "more_body": True}] * 3

    async def read_all() -> int:
        pending = iter(chunks)

        async def receive() -> dict:
            return next(pending)

        bounded_receive, total = bounded(receive, 1000), 0
        for _ in chunks:
            total += len((await bounded_receive())["body"])
        return total

    with pytest.raises(PayloadTooLargeError, match="1000 bytes"):
        asyncio.run(read_all())


def test_a_big_body_is_413_with_the_limit():
    client = client_for(keyed(), RequestLimits(max_body_bytes=2048))
    refused = client.post("/v1/completions", json={**COMPLETION, "prompt": "x" * 4096}, headers=BEARER)
    assert refused.status_code == 413 and "2048 bytes" in refused.json()["error"]["message"]


LIMITS = RequestLimits(
    max_prompt_bytes=100, max_messages=2, max_stop_strings=2, max_prompts=2, max_n=2, max_tokens=50, max_tools=1
)
TOOL = {"type": "function", "function": {"name": "f", "parameters": {}}}
MESSAGE = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    "path, body, param, numbers",
    [
        ("/v1/completions", {**COMPLETION, "prompt": "é" * 60}, "prompt", ("120", "100")),
        ("/v1/chat/completions", {"model": "tiny", "messages": [MESSAGE] * 3}, "messages", ("3", "2")),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 101}]},
         "messages", ("105", "100")),  # roles count too
        ("/v1/completions", {**COMPLETION, "stop": ["a", "b", "c"]}, "stop", ("3", "2")),
        ("/v1/completions", {**COMPLETION, "prompt": ["a", "b", "c"]}, "prompt", ("3", "2")),
        ("/v1/completions", {**COMPLETION, "prompt": [[1], [2], [3]]}, "prompt", ("3", "2")),
        ("/v1/completions", {**COMPLETION, "n": 3}, "n", ("3", "2")),
        ("/v1/completions", {**COMPLETION, "max_tokens": 51}, "max_tokens", ("51", "50")),
        ("/v1/chat/completions", {"model": "tiny", "messages": [MESSAGE], "max_completion_tokens": 99},
         "max_completion_tokens", ("99", "50")),
        ("/v1/responses", {"model": "tiny", "input": "hi", "max_output_tokens": 60}, "max_output_tokens", ("60", "50")),
        ("/v1/chat/completions", {"model": "tiny", "messages": [MESSAGE], "tools": [TOOL, TOOL]}, "tools", ("2", "1")),
        ("/v1/responses", {"model": "tiny", "input": "y" * 101}, "input", ("101", "100")),
    ],
)  # fmt: skip
def test_each_limit_is_a_400_naming_the_parameter_and_both_numbers(path, body, param, numbers):
    refused = client_for(keyed(), LIMITS).post(path, json=body, headers=BEARER)
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == param
    assert all(number in error["message"] for number in numbers), error["message"]


def test_numbers_sent_as_strings_or_floats_are_held_to_the_limits_as_vllm_reads_them():
    for lax in ("51", 51.0, " 51"):
        with pytest.raises(BadRequestError, match="51 tokens"):
            check_limits({**COMPLETION, "max_tokens": lax}, LIMITS)
    with pytest.raises(BadRequestError, match="3 choices"):
        check_limits({**COMPLETION, "n": "3"}, LIMITS)


def test_within_limits_passes_and_token_id_prompts_are_one_prompt():
    check_limits({**COMPLETION, "prompt": [1, 2, 3, 4, 5], "stop": ["a", "b"], "n": 2}, LIMITS)
    check_limits({"model": "tiny", "messages": [MESSAGE, MESSAGE], "tools": [TOOL]}, LIMITS)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "\\udc80", "prompt": "x"}',
        b'{"model": "tiny", "prompt": "ok \\ud800 then"}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}',
        b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
        b'{"model": "tiny", "prompt": "x", "temperature": -Infinity}',
        b'{"model": "tiny", "prompt": "x", "temperature": 1e400}',
        b'{"model": "tiny", "prompt": "x", "seed": 123456789012345678901234567890}',
        b'{"model": "tiny", "prompt": "x", "max_tokens": -99999999999999999999}',
        b'{"model": "tiny", "prompt": "\xff\xfe"}',
        json.dumps({"model": "tiny", "prompt": "\udc80", "t": float("nan")}).encode("utf-16"),  # scan-proof bytes
        b'{"model": "tiny", "prompt": "x", "logit_bias": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
)
def test_input_no_stage_could_handle_is_a_400_at_the_door(raw):
    with pytest.raises(BadRequestError):
        parse_body(raw)
    refused = client_for(keyed()).post("/v1/completions", content=raw, headers=BEARER)
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"


def test_valid_surrogate_pairs_and_ordinary_numbers_still_parse():
    assert parse_body(b'{"prompt": "\\ud83d\\ude00", "seed": 9223372036854775807, "t": 1e300}') == {
        "prompt": "\U0001f600",
        "seed": 2**63 - 1,
        "t": 1e300,
    }
    assert parse_body(b'{"prompt": "NaN and Infinity are words here"}')["prompt"].startswith("NaN")


def test_an_overlong_model_name_is_refused_before_routing():
    refused = client_for(keyed()).post("/v1/completions", json={**COMPLETION, "model": "m" * 300}, headers=BEARER)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "model"


def test_metric_labels_take_only_configured_models_and_tenants():
    labels = MetricLabels.of(frozenset({"tiny", "tiny-chat"}), keyed())
    record = RequestRecord("r", "llm", "made-up-by-a-client", "-", 404, False, 0.1, tenant="a")
    assert labels.tags(record) == {"application": "llm", "model": "other", "version": "-", "tenant": "a"}
    known = RequestRecord("r", "llm", "tiny-chat", "v1", 200, False, 0.1, tenant="intruder")
    assert labels.tags(known)["model"] == "tiny-chat" and labels.tags(known)["tenant"] == "other"


# JWT backend: tokens signed by a provider whose public keys are in a JWKS.


@pytest.fixture(scope="module")
def provider(tmp_path_factory) -> IdentityProvider:
    return IdentityProvider(tmp_path_factory.mktemp("idp"))


def jwt_auth(provider: IdentityProvider) -> AuthConfig:
    return AuthConfig(tenants=[TenantSpec(name="a"), TenantSpec(name="ops", admin=True)], jwt=provider.config())


def test_jwt_names_a_tenant_whose_token_is_signed_current_and_meant_for_us(provider):
    directory = TenantDirectory(jwt_auth(provider))
    assert asyncio.run(directory.authenticate(f"Bearer {provider.token('a')}")).name == "a"
    assert asyncio.run(directory.authenticate(f"Bearer {provider.token('ops')}")).admin
    refused = {
        "expired": provider.token("a", expires_in_s=-120),
        "issuer": provider.token("a", iss="https://evil.example"),
        "(?i)audience": provider.token("a", aud="someone-else"),
        "claim names no tenant": provider.token("stranger"),
        "does not know": provider.token("a", kid="k9"),
        "not valid": provider.token("a")[:-4] + "AAAA",
    }
    for reason, bearer in refused.items():
        with pytest.raises(AuthenticationError, match=reason):
            asyncio.run(directory.authenticate(f"Bearer {bearer}"))


def test_jwt_signed_with_hmac_over_the_public_key_is_refused(provider):
    """The algorithm-confusion attack: HS256 keyed with the public key the JWKS publishes."""
    directory = TenantDirectory(jwt_auth(provider))
    public_pem = jwt.algorithms.RSAAlgorithm.from_jwk(provider.jwks["keys"][0])
    forged = jwt.encode({"tenant": "ops", "exp": time.time() + 60}, str(public_pem), algorithm="HS256",
                        headers={"kid": "k1"})  # fmt: skip
    with pytest.raises(AuthenticationError):
        asyncio.run(directory.authenticate(f"Bearer {forged}"))
    with pytest.raises(ValueError, match="algorithms"):
        JWTConfig(jwks_file="x", issuer="i", audience="a", algorithms=["HS256"])


def test_jwks_url_is_fetched_for_a_new_key_id_at_most_once_per_interval(provider):
    fetched: list[str] = []
    clock = FakeClock(1000.0)
    served = {"keys": []}

    def fetch(url: str) -> dict:
        fetched.append(url)
        return served

    config = JWTConfig(jwks_url="https://idp.test/jwks", issuer=provider.ISSUER, audience=provider.AUDIENCE)
    backend = JWTAuthenticator(config, {"a": Tenant("a", frozenset({"*"}))}, fetch=fetch, clock=clock)
    with pytest.raises(ServiceUnavailableError, match="could not be fetched"):  # no keys at all yet
        asyncio.run(backend.authenticate(provider.token("a")))
    served = provider.jwks  # the provider publishes its key
    with pytest.raises(ServiceUnavailableError):  # without keys, asked again only after a few seconds
        asyncio.run(backend.authenticate(provider.token("a")))
    clock.now += 5
    assert asyncio.run(backend.authenticate(provider.token("a"))).name == "a"
    assert asyncio.run(backend.authenticate(provider.token("a"))).name == "a"  # known kid: no fetch
    with pytest.raises(AuthenticationError, match="does not know"):  # a new kid within the minute: not fetched
        asyncio.run(backend.authenticate(provider.token("a", kid="rotated")))
    assert len(fetched) == 2
    clock.now += 60
    for _ in range(3):  # fetched once more, then not again: made-up kids cannot make us hammer the provider
        with pytest.raises(AuthenticationError, match="does not know"):
            asyncio.run(backend.authenticate(provider.token("a", kid="rotated")))
    assert fetched == ["https://idp.test/jwks"] * 3


class PrefixAuthenticator:
    """A team's own backend, as the config names it: `tests.test_front_door:PrefixAuthenticator`."""

    def __init__(self, config: AuthConfig) -> None:
        self._tenants = {spec.name: Tenant.of(spec) for spec in config.tenants}

    async def authenticate(self, token: str) -> Tenant:
        name = token.removeprefix("team:")
        if name not in self._tenants:
            raise AuthenticationError("Unknown team.")
        return self._tenants[name]


def test_a_custom_backend_chosen_in_config_replaces_the_keys():
    auth = AuthConfig(
        tenants=[TenantSpec(name="a")], authenticator="tests.test_front_door:PrefixAuthenticator", docs="off"
    )
    client = client_for(auth)
    assert client.get("/v1/models", headers={"Authorization": "Bearer team:a"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer team:z"}).status_code == 401
    assert client.get("/v1/models", headers=BEARER).status_code == 401


def test_jwt_tenants_need_no_keys_but_key_tenants_do():
    with pytest.raises(ValueError, match="needs key_hashes"):
        AuthConfig(tenants=[TenantSpec(name="a")])
    AuthConfig(
        tenants=[TenantSpec(name="a")], jwt={"jwks_url": "https://idp.test/jwks", "issuer": "i", "audience": "a"}
    )
    with pytest.raises(ValueError, match="audience"):  # tokens the provider issued to other applications
        JWTConfig(jwks_url="https://idp.test/jwks", issuer="i")


def test_front_door_lets_websockets_and_lifespan_pass():
    seen: list[str] = []

    async def app(scope, receive, send) -> None:
        seen.append(scope["type"])

    door = FrontDoor(app, TenantDirectory(keyed()))
    asyncio.run(door({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]
