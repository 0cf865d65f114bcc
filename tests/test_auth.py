"""Tenants and API keys without Ray: the directory, and the HTTP layer's 401/403."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from servegraph.deployments.auth import hash_key
from servegraph.deployments.errors import AuthenticationError
from servegraph.deployments.front_door import TenantDirectory
from servegraph.deployments.ingress import build_openai_app
from servegraph.models.config import AuthConfig, TenantSpec
from tests.fakes import InProcessStages, ScriptedEngine


def auth(**tenants: dict) -> AuthConfig:
    return AuthConfig(tenants=[TenantSpec(name=name, **spec) for name, spec in tenants.items()])


def test_keys_from_hashes_env_and_file(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("sk-file-1\n\nsk-file-2\n")
    directory = TenantDirectory(
        auth(a={"key_hashes": [hash_key("sk-a")]}, b={"keys_env": "B_KEYS"}, c={"keys_file": str(key_file)}),
        environ={"B_KEYS": "sk-b1, sk-b2"},
    )
    assert asyncio.run(directory.authenticate("Bearer sk-a")).name == "a"
    assert asyncio.run(directory.authenticate("bearer sk-b2")).name == "b"
    assert asyncio.run(directory.authenticate("Bearer sk-file-2")).name == "c"
    for header in (None, "", "Bearer", "Basic sk-a", "Bearer sk-nope", "Bearer " + hash_key("sk-a")):
        with pytest.raises(AuthenticationError):
            asyncio.run(directory.authenticate(header))


def test_config_refuses_plain_keys_and_silent_defaults():
    with pytest.raises(ValueError, match="not keys"):
        TenantSpec(name="a", key_hashes=["sk-plain-key"])
    with pytest.raises(ValueError, match="no tenants are declared"):
        AuthConfig()
    with pytest.raises(ValueError, match="needs key_hashes"):
        AuthConfig(tenants=[TenantSpec(name="a")])


@pytest.fixture
def client(tiny_spec, frontend_for):
    roomy = tiny_spec.model_copy(update={"name": "roomy", "aliases": [], "max_model_len": 512})
    tiny = tiny_spec.model_copy(update={"fallbacks": ["roomy"]})
    stages = InProcessStages([tiny, roomy], frontend_for, {"engine-tiny-v1": ScriptedEngine(fail_after=0),
                                                            "engine-roomy-v1": ScriptedEngine()})  # fmt: skip
    directory = TenantDirectory(
        auth(a={"key_hashes": [hash_key("sk-a")], "models": ["tiny"]}, b={"key_hashes": [hash_key("sk-b")]})
    )
    return TestClient(build_openai_app(stages, tenants=directory), raise_server_exceptions=False)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_http_401_403_and_per_tenant_model_lists(client):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    assert client.post("/v1/completions", json=body).status_code == 401
    assert (
        client.post("/v1/completions", json=body, headers=bearer("sk-x")).json()["error"]["code"] == "invalid_api_key"
    )
    assert client.post("/v1/completions", json={"model": "tiny"}).status_code == 401  # before field validation
    denied = client.post("/v1/completions", json={**body, "model": "roomy"}, headers=bearer("sk-a"))
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    assert [m["id"] for m in client.get("/v1/models", headers=bearer("sk-a")).json()["data"]] == ["tiny", "tiny-chat"]
    assert len(client.get("/v1/models", headers=bearer("sk-b")).json()["data"]) == 3
    assert client.get("/healthz").status_code == 200


def test_tokenizer_routes_and_model_retrieval_need_a_key_and_keep_to_the_tenant(client):
    body = {"model": "roomy", "prompt": "hello"}
    assert client.post("/tokenize", json=body).status_code == 401
    assert client.post("/detokenize", json={"model": "tiny", "tokens": [1]}).status_code == 401
    assert client.get("/v1/models/tiny").status_code == 401
    denied = client.post("/tokenize", json=body, headers=bearer("sk-a"))
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    assert client.post("/tokenize", json=body, headers=bearer("sk-b")).json()["count"] > 0
    hidden = client.get("/v1/models/roomy", headers=bearer("sk-a"))
    assert hidden.status_code == 404 and "roomy" not in hidden.json()["error"]["message"].split("Available")[1]
    assert client.get("/v1/models/roomy", headers=bearer("sk-b")).json()["id"] == "roomy"


def test_fallbacks_outside_the_tenant_are_not_used(client):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}  # tiny fails; roomy would serve
    assert client.post("/v1/completions", json=body, headers=bearer("sk-a")).status_code == 500
    served = client.post("/v1/completions", json=body, headers=bearer("sk-b"))
    assert served.status_code == 200 and served.json()["model"] == "roomy"


def test_hash_key_command_reads_the_key_from_stdin():
    command = [sys.executable, "-m", "servegraph.graphs.cli", "hash-key"]
    result = subprocess.run(command, input="sk-a\n", capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == hash_key("sk-a")


def test_tenants_name_served_models(tiny_spec):
    from servegraph.models.config import LLMAppArgs

    tenants = {"tenants": [{"name": "a", "key_hashes": [hash_key("k")], "models": ["tiny-chat"]}]}
    with pytest.raises(ValueError, match=r"does not serve: \['tiny-chat'\]"):
        LLMAppArgs.model_validate({"models": [tiny_spec.model_dump()], "auth": tenants})
