"""/v1/embeddings on the default graph's `minilm` (all-MiniLM-L6-v2 on vLLM's pooling runner), checked against
the same model run directly with transformers in this process (mean pooling, L2 normalised)."""

from __future__ import annotations

import base64
import uuid

import httpx
import numpy as np
import pytest

from servegraph.deployments.usage import read_usage
from servegraph.models.build import package_model_dir
from tests.e2e.conftest import Graph, poll

MODEL = "minilm"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Embeddings beside chat models, under the same keys.", "a"]
MIN_COSINE = 0.999


class Reference:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean over the tokens, L2 normalised."""

    def __init__(self, source: str) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = AutoModel.from_pretrained(source).eval()

    def token_ids(self, text: str, max_length: int | None = None) -> list[int]:
        """The text's ids as the model's tokenizer makes them (cut to max_length as HF truncates: [SEP] kept)."""
        return self.tokenizer(text, truncation=max_length is not None, max_length=max_length)["input_ids"]

    def embed(self, token_ids: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            hidden = self.model(input_ids=torch.tensor([token_ids])).last_hidden_state[0]
        pooled = hidden.mean(dim=0)
        return (pooled / pooled.norm()).numpy()


@pytest.fixture(scope="module", autouse=True)
def started(graph: Graph) -> None:
    """The session runs `minilm` on demand (conftest's EMBEDDER_ON_DEMAND): the first request starts it."""

    def answered() -> bool:
        try:
            body = {"model": MODEL, "input": "warm up"}
            return httpx.post(f"{graph.openai_base_url}/embeddings", json=body, timeout=120).status_code == 200
        except httpx.TimeoutException:
            return False

    poll(answered, 600, "minilm to start", interval_s=2)


@pytest.fixture(scope="module")
def reference(graph: Graph) -> Reference:
    return Reference(package_model_dir(graph.model_spec(MODEL)["package"]))


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_matches(vectors, expected: list[np.ndarray]) -> None:
    assert len(vectors) == len(expected)
    for vector, want in zip(vectors, expected, strict=True):
        assert len(vector) == 384
        assert cosine(vector, want) >= MIN_COSINE


def test_text_lists_and_token_ids_match_the_model_run_directly(client, reference):
    ids = [reference.token_ids(text) for text in TEXTS]
    expected = [reference.embed(token_ids) for token_ids in ids]
    one = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert_matches([one.data[0].embedding], expected[:1])
    assert (one.usage.prompt_tokens, one.usage.total_tokens) == (len(ids[0]), len(ids[0]))
    batch = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert [item.index for item in batch.data] == [0, 1, 2] and batch.model == MODEL
    assert_matches([item.embedding for item in batch.data], expected)
    assert batch.usage.prompt_tokens == sum(map(len, ids))
    by_ids = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    assert_matches([item.embedding for item in by_ids.data], expected)
    assert by_ids.usage.prompt_tokens == batch.usage.prompt_tokens
    single_ids = client.embeddings.create(model=MODEL, input=ids[1], encoding_format="float")
    assert_matches([single_ids.data[0].embedding], expected[1:2])


def test_base64_is_the_same_vectors_and_the_client_default(client, graph, reference):
    """The openai client asks for base64 unless told otherwise, and decodes it itself."""
    expected = [reference.embed(reference.token_ids(text)) for text in TEXTS]
    assert_matches([item.embedding for item in client.embeddings.create(model=MODEL, input=TEXTS).data], expected)
    body = {"model": MODEL, "input": TEXTS, "encoding_format": "base64"}
    raw = httpx.post(f"{graph.openai_base_url}/embeddings", json=body, timeout=60).json()
    decoded = [np.frombuffer(base64.b64decode(item["embedding"]), dtype=np.float32) for item in raw["data"]]
    assert_matches(decoded, expected)
    assert raw["object"] == "list" and raw["id"].startswith("embd-") and raw["usage"]["completion_tokens"] == 0


def test_truncation_keeps_the_first_tokens(client, reference):
    long_text = " ".join(f"{word} embedding" for word in TEXTS[0].split() * 40)  # over the model's 256 tokens
    response = client.embeddings.create(
        model=MODEL, input=long_text, encoding_format="float", extra_body={"truncate_prompt_tokens": 16}
    )
    assert response.usage.prompt_tokens == 16
    assert_matches([response.data[0].embedding], [reference.embed(reference.token_ids(long_text, max_length=16))])


BAD_REQUESTS = [
    ({"model": MODEL, "input": []}, "input", "at least one prompt"),
    ({"model": MODEL, "input": " ".join(["word"] * 300)}, "input", "maximum context length is 256"),
    ({"model": MODEL, "input": "hi", "dimensions": 64}, "dimensions", "does not support Matryoshka"),
    ({"model": MODEL, "input": "hi", "encoding_format": "bytes"}, "encoding_format", "not supported"),
    ({"model": MODEL, "input": [[101, 40000, 102]]}, "input", "token ids must be in [0, 30522)"),
    ({"model": "tiny", "input": "hi"}, "model", "does not support the Embeddings API"),
]


def test_bad_inputs_are_400s_and_the_replica_stays_up(graph: Graph):
    url = f"{graph.openai_base_url}/embeddings"
    for body, param, message in BAD_REQUESTS:
        response = httpx.post(url, json=body, timeout=60)
        error = response.json()["error"]
        assert (response.status_code, error["type"], error["param"]) == (400, "invalid_request_error", param), body
        assert message in error["message"], error
    chat = httpx.post(f"{graph.openai_base_url}/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert chat.status_code == 400
    assert chat.json()["error"]["message"] == f"The model `{MODEL}` does not support the Chat Completions API."
    assert httpx.post(url, json={"model": MODEL, "input": "still up"}, timeout=60).status_code == 200


def test_listed_and_metered_as_the_model(graph: Graph):
    assert MODEL in {card["id"] for card in httpx.get(f"{graph.openai_base_url}/models", timeout=30).json()["data"]}
    request_id = f"embed-{uuid.uuid4().hex[:8]}"
    response = httpx.post(f"{graph.openai_base_url}/embeddings", headers={"X-Request-Id": request_id}, timeout=60,
                          json={"model": MODEL, "input": TEXTS})  # fmt: skip
    assert response.headers["x-servegraph-served-by"] == f"{MODEL}@v1"

    def record() -> dict | None:
        rows = [r for r in read_usage(graph.usage_dir).to_pylist() if r["request_id"] == request_id]
        return rows[0] if rows else None

    row = poll(record, 30, "the embeddings request's usage record")
    billed = (row["model"], row["status"], row["prompt_tokens"], row["completion_tokens"])
    assert billed == (MODEL, "success", response.json()["usage"]["prompt_tokens"], 0)
