"""API keys on the real graph: the `limits` application of conftest requires them."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.conftest import ALPHA_KEY, BETA_KEY


def limits_client(graph, key: str):
    return openai.OpenAI(base_url=f"{graph.base_url}/limits/v1", api_key=key, max_retries=0, timeout=60)


def test_a_tenant_key_serves_and_sees_its_models(graph):
    client = limits_client(graph, ALPHA_KEY)
    assert sorted(m.id for m in client.models.list()) == ["shared", "strict"]
    reply = client.completions.create(model="strict", prompt="Hello", max_tokens=3)
    assert reply.usage.completion_tokens == 3


def test_missing_or_wrong_key_is_401(graph):
    url = f"{graph.base_url}/limits/v1/completions"
    body = {"model": "strict", "prompt": "Hello", "max_tokens": 3}
    missing = httpx.post(url, json=body, timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        limits_client(graph, "sk-wrong").completions.create(**body)
    incomplete = httpx.post(url, json={"model": "strict"}, timeout=30)
    assert incomplete.status_code == 401  # who is asking comes before what is asked
    assert httpx.get(f"{graph.base_url}/limits/healthz", timeout=30).status_code == 200


def test_model_outside_the_tenant_is_403_and_unlisted(graph):
    client = limits_client(graph, BETA_KEY)
    assert client.models.list().data == []
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.completions.create(model="strict", prompt="Hello", max_tokens=3)
    assert denied.value.body["code"] == "model_not_allowed"
