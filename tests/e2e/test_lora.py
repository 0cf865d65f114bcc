"""LoRA adapters on the default graph's `tiny` (graphs/local.yaml: `tiny-sql`, `tiny-poet`, built
random adapters), against vLLM's own offline LLM with the same base model, adapters and prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from servegraph.models.build import build_local_adapter, default_cache_dir, ensure_local_model, resolve_adapter_source
from servegraph.models.spec import LoraBuildRecipe, ModelSpec

pytestmark = pytest.mark.e2e

# Eight tokens: bfloat16 prompts of 1-4 tokens crash vLLM's CPU worker on AMX CPUs (RUNTIME-NOTES).
PROMPT = [10, 20, 30, 40, 50, 60, 70, 80]
MAX_TOKENS = 8
ENGINE = "engine-tiny-v1"

# vLLM's offline LLM in its own process (spawned workers, and its memory freed when it exits):
# greedy token ids per adapter (None: the base model).
REFERENCE = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
if __name__ == "__main__":
    job = json.load(sys.stdin)
    llm = LLM(job["model"], enable_lora=True, max_lora_rank=8, max_loras=1, dtype="bfloat16", enforce_eager=True,
              max_model_len=512, gpu_memory_utilization=0.3, skip_tokenizer_init=True,
              kv_cache_memory_bytes=64 * 2**20)  # beside the session graph: a small KV cache
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0, detokenize=False)
    result = {}
    for i, (name, path) in enumerate(job["adapters"].items()):
        lora = LoRARequest(name, i + 1, path) if path else None
        out = llm.generate([{"prompt_token_ids": job["prompt"]}], params, lora_request=lora, use_tqdm=False)
        result[name] = list(out[0].outputs[0].token_ids)
    print("REFERENCE " + json.dumps(result))
"""


def tiny_spec(graph) -> ModelSpec:
    return ModelSpec(**graph.model_spec("tiny"))


@pytest.fixture(scope="module")
def runtime_adapter(graph, tmp_path_factory) -> Path:
    """A third adapter of tiny, added through the admin API by the tests (not in the config)."""
    out = tmp_path_factory.mktemp("runtime-adapter")
    build_local_adapter(tiny_spec(graph).build, LoraBuildRecipe(seed=3), out)
    return out


@pytest.fixture(scope="module")
def reference(graph, runtime_adapter) -> dict[str, list[int]]:
    spec = tiny_spec(graph)
    model = ensure_local_model(spec.build, default_cache_dir())
    adapters: dict[str, str | None] = {"tiny": None}
    for adapter in spec.lora.adapters:
        adapters[adapter.name] = resolve_adapter_source(spec, adapter)
    adapters["tiny-runtime"] = str(runtime_adapter)
    job = {"model": str(model), "adapters": adapters, "prompt": PROMPT, "max_tokens": MAX_TOKENS}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", REFERENCE], input=json.dumps(job), capture_output=True, text=True, env=env, timeout=600
    )
    line = next((line for line in done.stdout.splitlines() if line.startswith("REFERENCE ")), None)
    assert line is not None, done.stderr[-3000:]
    return json.loads(line.removeprefix("REFERENCE "))


def generated_ids(graph, model: str) -> list[int]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True}
    response = httpx.post(f"{graph.openai_base_url}/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    return response.json()["choices"][0]["token_ids"]


def poll_status(graph, model: str, until, what: str, timeout_s: float = 60) -> int:
    """The first status of a one-token request to `model` that `until` accepts, polled with a deadline."""
    deadline = time.monotonic() + timeout_s
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1}
    while not until(status := httpx.post(f"{graph.openai_base_url}/completions", json=body, timeout=60).status_code):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return status


def engine_replicas(graph) -> set[str]:
    replicas = graph.cluster.applications()["llm"]["deployments"][ENGINE]["replicas"]
    return {r["replica_id"] for r in replicas if r["state"] == "RUNNING"}


def add_adapter(graph, name: str, path: str) -> httpx.Response:
    body = {"model": "tiny", "name": name, "path": path}
    return httpx.post(f"{graph.base_url}/admin/adapters", json=body, timeout=120)


def test_adapters_are_listed_with_their_base_model(graph):
    cards = {card["id"]: card for card in httpx.get(f"{graph.openai_base_url}/models", timeout=10).json()["data"]}
    for name in ("tiny-sql", "tiny-poet"):
        assert cards[name]["root"] == name
        assert cards[name]["versions"] == ["v1"]
        if "parent" in cards["tiny"]:  # ModelCard.parent (protocol.py); see the report for the one-line diff
            assert cards[name]["parent"] == "tiny"
    listed = httpx.get(f"{graph.base_url}/admin/adapters", timeout=10).json()
    assert {(a["name"], a["model"], a["source"]) for a in listed} >= {("tiny-sql", "tiny", "build")}


def test_adapter_returns_what_vllm_returns_and_differs_from_the_base_model(graph, reference):
    base = generated_ids(graph, "tiny")
    assert base == reference["tiny"]
    for name in ("tiny-sql", "tiny-poet"):
        ids = generated_ids(graph, name)
        assert ids == reference[name], name
        assert ids != base, name
    assert reference["tiny-sql"] != reference["tiny-poet"]


def test_two_adapters_serve_concurrently_on_one_replica(graph, reference):
    replicas = engine_replicas(graph)
    assert len(replicas) == 1
    names = ["tiny-sql", "tiny-poet"] * 3 + ["tiny"] * 2  # and the base model in the same batches
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda name: generated_ids(graph, name), names))
    assert results == [reference[name] for name in names]
    assert engine_replicas(graph) == replicas


def test_adapter_added_at_runtime_serves_without_restart_and_can_be_removed(graph, reference, runtime_adapter):
    replicas = engine_replicas(graph)
    started = graph.engine_stats()[ENGINE]["started"]
    missing = httpx.post(f"{graph.openai_base_url}/completions", json={"model": "tiny-runtime", "prompt": "hi"})
    assert missing.status_code == 404
    added = add_adapter(graph, "tiny-runtime", str(runtime_adapter))
    assert added.status_code == 201, added.text
    assert added.json()["loaded_on"] in replicas
    assert add_adapter(graph, "tiny-runtime", str(runtime_adapter)).status_code == 409
    # Each ingress copy asks the router on a miss, at most once a second: the 404 above may have just asked.
    poll_status(graph, "tiny-runtime", until=lambda status: status != 404, what="the added adapter to serve")
    assert generated_ids(graph, "tiny-runtime") == reference["tiny-runtime"]
    assert engine_replicas(graph) == replicas
    assert graph.engine_stats()[ENGINE]["started"] > started
    models = httpx.get(f"{graph.openai_base_url}/models", timeout=10).json()["data"]
    assert "tiny-runtime" in {card["id"] for card in models}

    assert httpx.delete(f"{graph.base_url}/admin/adapters/tiny-runtime", timeout=10).status_code == 200
    # Ingress copies refresh in the background within seconds.
    assert poll_status(graph, "tiny-runtime", until=lambda status: status != 200, what="the adapter to go") == 404
    assert httpx.delete(f"{graph.base_url}/admin/adapters/tiny-runtime", timeout=10).status_code == 404


def test_missing_or_broken_adapter_is_a_client_error_and_the_replica_stays_up(graph, tmp_path, reference):
    replicas = engine_replicas(graph)
    broken = tmp_path / "broken"
    build_local_adapter(tiny_spec(graph).build, LoraBuildRecipe(seed=4), broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors" * 8)
    too_big = tmp_path / "rank16"
    build_local_adapter(tiny_spec(graph).build, LoraBuildRecipe(seed=5, rank=16), too_big)
    for name, path, status, code in [
        ("tiny-missing", str(tmp_path / "nowhere"), 404, "adapter_not_found"),
        ("tiny-broken", str(broken), 400, "adapter_load_failed"),
        ("tiny-rank16", str(too_big), 400, "adapter_load_failed"),
    ]:
        response = add_adapter(graph, name, path)
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code
        assert name in response.json()["error"]["message"]
    assert "max_lora_rank" in add_adapter(graph, "tiny-rank16", str(too_big)).json()["error"]["message"]
    assert add_adapter(graph, "tiny", str(broken)).status_code == 409  # a model's name
    unknown_base = httpx.post(f"{graph.base_url}/admin/adapters", json={"model": "nope", "name": "x", "path": "/x"})
    assert unknown_base.status_code == 404
    no_lora = httpx.post(f"{graph.base_url}/admin/adapters", json={"model": "small", "name": "x", "path": "/x"})
    assert no_lora.status_code == 400
    assert generated_ids(graph, "tiny-sql") == reference["tiny-sql"]
    assert generated_ids(graph, "tiny") == reference["tiny"]
    assert engine_replicas(graph) == replicas
