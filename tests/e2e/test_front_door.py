"""The front door on the real graph: credentials before bodies, JWTs, docs behind a key, limits, safe input, labels.

The `limits` application (keys and JWTs from conftest's identity provider) and the default
application (open) answer through Serve's proxy, as a client sees them.
"""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest

from servegraph.deployments.usage import read_usage
from tests.e2e.conftest import ALPHA_KEY, PROMPT_TOKEN_CAP, Graph, poll
from tests.e2e.test_observability import scrape


def limits_url(graph: Graph, path: str) -> str:
    return f"{graph.base_url}/limits{path}"


def test_no_credentials_no_body_read_no_docs_and_nothing_metered(graph):
    garbage = httpx.post(limits_url(graph, "/v1/completions"), content=b"{not json", timeout=30)
    assert garbage.status_code == 401 and garbage.json()["error"]["code"] == "invalid_api_key"
    marker = f"anon-{uuid.uuid4().hex[:8]}"
    body = {"model": "shared", "prompt": "Hello", "max_tokens": 2, "user": marker}
    assert httpx.post(limits_url(graph, "/v1/completions"), json=body, timeout=30).status_code == 401
    for path in ("/openapi.json", "/docs"):
        assert httpx.get(limits_url(graph, path), timeout=30).status_code == 401
    assert httpx.get(f"{graph.base_url}/limits-admin/openapi.json", timeout=30).status_code == 401
    assert httpx.get(limits_url(graph, "/healthz"), timeout=30).status_code == 200
    records = read_usage(graph.usage_dir).to_pylist()
    assert not [r for r in records if r["application"] == "limits" and r["http_status"] == 401]


def test_the_openapi_document_has_vllms_bodies_and_every_status(graph):
    headers = {"Authorization": f"Bearer {ALPHA_KEY}"}
    document = httpx.get(limits_url(graph, "/openapi.json"), headers=headers, timeout=120).json()
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    assert "messages" in document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"400", "401", "403", "404", "413", "429", "503", "504"} <= set(chat["responses"])
    assert document["servers"] == [{"url": "/limits"}]


def test_a_body_over_the_limit_is_413_before_it_is_parsed(graph):
    headers = {"Authorization": f"Bearer {ALPHA_KEY}", "Content-Type": "application/json"}
    huge = b'{"model": "shared", "prompt": "' + b"x" * (9 << 20) + b'"}'  # the default limit is 8 MiB
    refused = httpx.post(limits_url(graph, "/v1/completions"), content=huge, headers=headers, timeout=60)
    assert refused.status_code == 413 and "8388608 bytes" in refused.json()["error"]["message"]


def test_a_jwt_from_the_trusted_provider_serves_its_tenant(graph):
    def client(token: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=limits_url(graph, "/v1"), api_key=token, max_retries=0, timeout=60)

    calm = client(graph.idp.token("calm"))
    assert sorted(model.id for model in calm.models.list()) == ["shared", "strict"]
    assert calm.completions.create(model="shared", prompt="Hello", max_tokens=2).usage.completion_tokens == 2
    for token in (graph.idp.token("calm", expires_in_s=-300), graph.idp.token("stranger")):
        with pytest.raises(openai.AuthenticationError):
            client(token).models.list()


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "\\udc80", "prompt": "Hello"}',
        b'{"model": "tiny", "prompt": "\\udc80"}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "tiny", "prompt": "Hello", "temperature": NaN}',
        b'{"model": "tiny", "prompt": "Hello", "seed": 99999999999999999999999999}',
        b'{"model": "tiny", "prompt": "Hello", "top_p": 1e999}',
    ],
)
def test_input_that_no_stage_can_handle_is_a_400_not_a_500(graph, raw):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    refused = httpx.post(f"{graph.base_url}{path}", content=raw, headers={"Content-Type": "application/json"})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["type"] == "invalid_request_error"


def test_the_prompt_token_cap_is_a_400_with_both_numbers(graph):
    body = {"model": "elastic", "prompt": [5] * (PROMPT_TOKEN_CAP + 50), "max_tokens": 2}  # context 512
    refused = httpx.post(f"{graph.base_url}/resilience/v1/completions", json=body, timeout=60)
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == "prompt", refused.text
    assert f"limit of {PROMPT_TOKEN_CAP}" in error["message"]


def test_model_names_clients_make_up_share_one_metric_label(graph):
    made_up = f"made-up-{uuid.uuid4().hex[:10]}"
    for _ in range(3):
        body = {"model": made_up, "prompt": "Hello", "max_tokens": 2}
        assert httpx.post(f"{graph.base_url}/v1/completions", json=body, timeout=30).status_code == 404

    def other_counted() -> bool:
        samples = scrape(graph)
        labels = {value for (name, tags) in samples for key, value in tags if key == "model"}
        assert made_up not in labels
        return any(
            name == "ray_servegraph_requests_total" and ("model", "other") in tags and ("status", "404") in tags
            for name, tags in samples
        )

    poll(other_counted, 60, "the 404s to be counted under model=other")
