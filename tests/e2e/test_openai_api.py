"""The default graph over HTTP with the official openai client: real Ray, real vLLM on CPU."""

from __future__ import annotations

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from servegraph.models.build import default_cache_dir, ensure_local_model
from servegraph.models.spec import LocalBuildRecipe
from tests.e2e.conftest import Graph, poll

MODELS = ["tiny", "small"]


@pytest.fixture(scope="module")
def tokenizers(graph: Graph) -> dict:
    return {
        name: AutoTokenizer.from_pretrained(
            ensure_local_model(LocalBuildRecipe(**graph.model_spec(name)["build"]), default_cache_dir())
        )
        for name in MODELS
    }


def stream_completion(client, **kwargs) -> tuple[str, str | None, openai.types.CompletionUsage | None]:
    text, finish, usage = "", None, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    return text, finish, usage


def stream_chat(client, **kwargs) -> tuple[str, str | None, openai.types.CompletionUsage | None]:
    text, finish, usage = "", None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish, usage


def test_models_lists_names_and_aliases(client):
    ids = {model.id for model in client.models.list()}
    assert ids == {"tiny", "tiny-chat", "small", "small-latest", "minilm", "tiny-sql", "tiny-poet"}


@pytest.mark.parametrize("model", MODELS)
def test_completion_streaming_matches_non_streaming(client, tokenizers, model):
    prompt = "The capital of France is"
    request = dict(model=model, prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**request)
    text, finish, usage = stream_completion(client, **request)
    assert whole.choices[0].text == text and len(text) > 0
    assert whole.choices[0].finish_reason == finish == "length"
    prompt_tokens = len(tokenizers[model].encode(prompt))
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (
        prompt_tokens,
        24,
        prompt_tokens + 24,
    )
    assert usage == whole.usage


@pytest.mark.parametrize("model", ["tiny-chat"])  # small has a reasoning parser: see test_openai_parity
def test_chat_streaming_matches_non_streaming(client, tokenizers, model):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Où est la bibliothèque ? 你好"},
    ]
    request = dict(model=model, messages=messages, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**request)
    text, finish, usage = stream_chat(client, **request)
    assert whole.choices[0].message.content == text and whole.choices[0].message.role == "assistant"
    assert finish == whole.choices[0].finish_reason == "length"
    tokenizer = tokenizers[model.split("-")[0]]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert whole.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    assert usage == whole.usage and whole.usage.completion_tokens == 20


def test_two_models_answer_differently(client):
    outputs = {
        model: client.completions.create(
            model=model, prompt="Hello", max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
        for model in MODELS
    }
    assert outputs["tiny"] != outputs["small"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_truncates_output(client, stream):
    request = dict(model="tiny", prompt="Numbers:", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**request).choices[0].text
    stop = next(
        full[i : i + 3] for i in range(8, len(full) - 3) if full[i : i + 3].strip() and full.find(full[i : i + 3]) == i
    )
    expected = full[: full.find(stop)]
    if stream:
        text, finish, _ = stream_completion(client, stop=[stop], **request)
    else:
        choice = client.completions.create(stop=[stop], **request).choices[0]
        text, finish = choice.text, choice.finish_reason
    assert (text, finish) == (expected, "stop")


def test_seeded_sampling_is_reproducible(client):
    request = dict(model="tiny", prompt="Once", max_tokens=16, temperature=1.0, seed=1234)
    assert client.completions.create(**request).choices[0].text == client.completions.create(**request).choices[0].text


def test_truncate_left_policy_serves_an_over_long_prompt(client, graph):
    limit = graph.model_spec("small")["max_model_len"]
    response = client.completions.create(model="small", prompt="word " * (2 * limit), max_tokens=10)
    assert response.usage.prompt_tokens == limit - 10


def test_reject_policy_names_prompt_tokens_and_limit(client, graph):
    limit = graph.model_spec("tiny")["max_model_len"]
    prompt = "word " * limit
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=10)
    error = info.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert f"maximum context length is {limit} tokens" in error["message"]


BAD_REQUESTS = {
    "malformed json": (b'{"model": "tiny", "prompt": ', 400, None),
    "non-utf8 body": (b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, None),
    "missing field": ({"model": "tiny"}, 400, "prompt"),
    "wrong type": ({"model": "tiny", "prompt": "hi", "max_tokens": "lots"}, 400, "max_tokens"),
    "max_tokens zero": ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens beyond limit": ({"model": "tiny", "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    "empty prompt": ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    "n zero": ({"model": "tiny", "prompt": "hi", "n": 0}, 400, "n"),
    "unknown model": ({"model": "gpt-9", "prompt": "hi"}, 404, "model"),
    "prompt over limit": ({"model": "tiny", "prompt": "word " * 600, "max_tokens": 5}, 400, "prompt"),
    "min_tokens over max_tokens": ({"model": "tiny", "prompt": "hi", "max_tokens": 2, "min_tokens": 3}, 400,
                                   "min_tokens"),
    "seed beyond 64 bits": ({"model": "tiny", "prompt": "hi", "max_tokens": 2, "seed": 2**64}, 400, "seed"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_input_gets_openai_error_and_graph_keeps_serving(client, graph, case):
    body, status, param = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else None
    response = httpx.post(
        f"{graph.openai_base_url}/completions",
        content=content,
        json=None if content else body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert param in (error["param"] or "")
    assert client.completions.create(model="tiny", prompt="still there?", max_tokens=2).usage.completion_tokens >= 1


def test_bad_chat_input(graph):
    """What vLLM's chat request model refuses (it accepts empty messages and custom roles: the template decides)."""
    for body in [
        {"model": "tiny", "messages": "hi"},
        {"model": "tiny", "messages": [{"role": "user", "content": 5}]},
        {"model": "tiny", "messages": [{"content": "x"}]},
    ]:
        response = httpx.post(f"{graph.openai_base_url}/chat/completions", json=body, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"].startswith("messages")


def test_unknown_route_is_openai_error(graph):
    response = httpx.get(f"{graph.openai_base_url}/nothing-here", timeout=10)
    assert response.status_code == 404 and "error" in response.json()


def test_healthz(graph):
    assert httpx.get(f"{graph.base_url}/healthz", timeout=10).json() == {"status": "ok"}
    assert httpx.get(f"{graph.base_url}/admin/healthz", timeout=10).json() == {"status": "ok"}


def test_client_disconnect_aborts_engine_request(graph):
    before = graph.engine_stats()["engine-small-v1"]
    max_tokens = graph.model_spec("small")["max_model_len"] - 20
    body = {
        "model": "small",
        "prompt": "Tell me a long story",
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{graph.openai_base_url}/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(3)]
    assert all(line.startswith("data: {") for line in received if line)

    def aborted() -> dict | None:
        stats = graph.engine_stats()["engine-small-v1"]
        return stats if stats["aborted"] == before["aborted"] + 1 and stats["unfinished"] == 0 else None

    after = poll(aborted, 30, "the engine to abort the disconnected request")
    assert after["generated_tokens"] - before["generated_tokens"] < max_tokens
    assert after["finished"] == before["finished"]


def test_models_retrieve(client):
    card = client.models.retrieve("small-latest")
    assert (card.id, card.owned_by, card.root) == ("small-latest", "servegraph", "small")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


@pytest.mark.parametrize("model", MODELS)
def test_tokenize_and_detokenize_round_trip(graph, tokenizers, model):
    text = "Tokens are counted the way the engine counts them: héllo ✓"
    tokenized = httpx.post(f"{graph.base_url}/tokenize", json={"model": model, "prompt": text}, timeout=30).json()
    ids = tokenizers[model].encode(text)
    assert tokenized == {"count": len(ids), "max_model_len": graph.model_spec(model)["max_model_len"],
                         "tokens": ids, "token_strs": None}  # fmt: skip
    detokenized = httpx.post(f"{graph.base_url}/detokenize", json={"model": model, "tokens": ids}, timeout=30)
    assert detokenized.json() == {"prompt": tokenizers[model].decode(ids)}
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(f"{graph.base_url}/tokenize", json={"model": model, "messages": messages}, timeout=30).json()
    served = openai.OpenAI(base_url=graph.openai_base_url, api_key="unused").chat.completions.create(
        model=model, messages=messages, max_tokens=1
    )
    assert chat["count"] == served.usage.prompt_tokens


def test_client_errors_never_open_the_circuit_breaker(graph):
    """`canary` opens its breaker after 5 failures and falls back to `ext`; bad requests are not failures."""
    url = f"{graph.base_url}/resilience/v1/completions"
    bad = {"model": "canary", "prompt": "hi", "max_tokens": 2, "min_tokens": 5}
    assert [httpx.post(url, json=bad, timeout=30).status_code for _ in range(8)] == [400] * 8
    served = httpx.post(url, json={"model": "canary", "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert served.status_code == 200 and served.headers["x-servegraph-served-by"].startswith("canary@"), served.text
