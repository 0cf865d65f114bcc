"""OpenAI API parity with `vllm serve`: the same request to the graph and to bare vLLM, the same answer.

Bare vLLM serves the default graph's `tiny` model (same files, same tool parser) beside the
graph. At temperature 0 (or with a seed) both must return the same text, token ids and
logprobs; structured output must validate; real clients (the openai SDK, LangChain,
lm-eval-harness) must work unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from servegraph.bench.targets import BareVllmTarget
from servegraph.models.build import default_cache_dir, ensure_local_model
from servegraph.models.spec import ModelSpec
from tests.e2e.conftest import Graph

LOGPROB_TOLERANCE = 1e-3  # the same kernels in another process: equal up to float summation order
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}, "days": {"type": "integer"}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
                                                 "parameters": WEATHER_PARAMETERS, "strict": True}}  # fmt: skip
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tiny_dir(graph: Graph) -> Path:
    return ensure_local_model(ModelSpec(**graph.model_spec("tiny")).build, default_cache_dir())


@pytest.fixture(scope="module")
def bare_vllm(graph: Graph, tiny_dir: Path) -> Iterator[str]:
    """`vllm serve` of the default graph's tiny model, with its tool parser: the reference."""
    spec = ModelSpec(**graph.model_spec("tiny"))
    with BareVllmTarget(spec, tiny_dir) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def reference(bare_vllm: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{bare_vllm}/v1", api_key="unused", max_retries=0, timeout=120)


def both(client: openai.OpenAI, reference: openai.OpenAI, create: str, **request):
    """The graph's and bare vLLM's responses to one request, as dicts."""

    def call(target: openai.OpenAI):
        endpoint = target.completions if create == "completions" else target.chat.completions
        return endpoint.create(**request).model_dump()

    return call(client), call(reference)


def without_ids(response: dict) -> dict:
    """What must match: everything but ids, timestamps and the fingerprint."""
    return {k: v for k, v in response.items() if k not in {"id", "created", "system_fingerprint"}}


def assert_logprobs_close(graph_values: list[float], vllm_values: list[float]) -> None:
    assert graph_values == pytest.approx(vllm_values, abs=LOGPROB_TOLERANCE)


def test_greedy_completion_tokens_and_logprobs_equal_bare_vllms(client, reference):
    request = dict(model="tiny", prompt="The capital of France is", max_tokens=12, temperature=0, logprobs=3,
                   extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    ours, theirs = both(client, reference, "completions", **request)
    ours_choice, their_choice = ours["choices"][0], theirs["choices"][0]
    assert ours_choice["text"] == their_choice["text"] and ours_choice["token_ids"] == their_choice["token_ids"]
    assert ours_choice["logprobs"]["tokens"] == their_choice["logprobs"]["tokens"]
    assert_logprobs_close(ours_choice["logprobs"]["token_logprobs"], their_choice["logprobs"]["token_logprobs"])
    assert [set(top) for top in ours_choice["logprobs"]["top_logprobs"]] == [
        set(top) for top in their_choice["logprobs"]["top_logprobs"]
    ]
    assert ours["usage"] == theirs["usage"]


def test_echo_with_prompt_logprobs_equals_bare_vllms(client, reference):
    """What lm-eval's loglikelihood requests send: token ids, echo, logprobs, one token."""
    request = dict(model="tiny", prompt=[100, 200, 300, 400, 500], max_tokens=1, temperature=0, logprobs=1, echo=True)
    ours, theirs = both(client, reference, "completions", **request)
    ours_logprobs, their_logprobs = ours["choices"][0]["logprobs"], theirs["choices"][0]["logprobs"]
    assert ours_logprobs["tokens"] == their_logprobs["tokens"] and len(ours_logprobs["tokens"]) == 6
    assert ours_logprobs["token_logprobs"][0] is None
    assert_logprobs_close(ours_logprobs["token_logprobs"][1:], their_logprobs["token_logprobs"][1:])


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_with_bytes_equal_bare_vllms(client, reference, stream):
    request = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    ours, theirs = (chat_content_and_logprobs(target, stream, **request) for target in (client, reference))
    assert ours[0] == theirs[0]
    assert [(t["token"], t["bytes"]) for t in ours[1]] == [(t["token"], t["bytes"]) for t in theirs[1]]
    assert_logprobs_close([t["logprob"] for t in ours[1]], [t["logprob"] for t in theirs[1]])
    assert all(len(t["top_logprobs"]) == 2 for t in ours[1])


def chat_content_and_logprobs(target: openai.OpenAI, stream: bool, **request) -> tuple[str, list[dict]]:
    if not stream:
        choice = target.chat.completions.create(**request).choices[0]
        return choice.message.content, [t.model_dump() for t in choice.logprobs.content]
    content, logprobs = "", []
    for chunk in target.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            logprobs += [t.model_dump() for t in (choice.logprobs.content if choice.logprobs else None) or []]
    return content, logprobs


def stream_choices(target: openai.OpenAI, chat: bool, **request) -> dict[int, str]:
    """Each choice's text, assembled from a stream by its index."""
    endpoint = target.chat.completions if chat else target.completions
    texts: dict[int, str] = {}
    for chunk in endpoint.create(stream=True, **request):
        for choice in chunk.choices:
            piece = (choice.delta.content if chat else choice.text) or ""
            texts[choice.index] = texts.get(choice.index, "") + piece
    return texts


@pytest.mark.parametrize("chat", [False, True])
def test_n_seeded_choices_equal_bare_vllms_streaming_and_not(client, reference, chat):
    request = dict(model="tiny", max_tokens=10, temperature=1.0, seed=11, n=3)
    request |= {"messages": MESSAGES} if chat else {"prompt": "Once upon a time"}
    endpoint = "chat" if chat else "completions"
    ours, theirs = both(client, reference, endpoint, **request)
    assert [c["index"] for c in ours["choices"]] == [0, 1, 2]
    assert without_ids(ours)["choices"] == without_ids(theirs)["choices"] and ours["usage"] == theirs["usage"]
    assert len({c["message"]["content"] if chat else c["text"] for c in ours["choices"]}) > 1
    assert stream_choices(client, chat, **request) == stream_choices(reference, chat, **request)


def test_a_list_of_prompts_gets_one_choice_each_in_order_with_summed_usage(client, reference):
    prompts = [f"Story number {i}:" for i in range(120)]
    request = dict(model="tiny", prompt=prompts, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    ours, theirs = both(client, reference, "completions", **request)
    assert [c["index"] for c in ours["choices"]] == list(range(120))
    assert [c["text"] for c in ours["choices"]] == [c["text"] for c in theirs["choices"]]
    assert ours["usage"] == theirs["usage"] and ours["usage"]["completion_tokens"] == 360
    token_prompts = [[100 + i, 200, 300] for i in range(4)]
    streamed = stream_choices(client, False, **{**request, "prompt": token_prompts})
    assert sorted(streamed) == [0, 1, 2, 3]
    assert streamed == stream_choices(reference, False, **{**request, "prompt": token_prompts})


def test_logit_bias_and_token_id_output_equal_bare_vllms(client, reference):
    request = dict(model="tiny", prompt="Hello", max_tokens=4, temperature=0, logit_bias={"300": 100},
                   logprobs=1, extra_body={"return_tokens_as_token_ids": True})  # fmt: skip
    ours, theirs = both(client, reference, "completions", **request)
    assert ours["choices"][0]["logprobs"]["tokens"] == ["token_id:300"] * 4
    assert ours["choices"][0]["text"] == theirs["choices"][0]["text"]


def test_json_schema_output_validates_and_equals_bare_vllms(client, reference):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "grade": {"enum": ["A", "B", "C"]}},
              "required": ["ok", "grade"], "additionalProperties": False}  # fmt: skip
    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}
    request = dict(model="tiny", messages=MESSAGES, max_tokens=200, temperature=0, response_format=response_format)
    ours, theirs = both(client, reference, "chat", **request)
    content = ours["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(content), schema)
    assert content == theirs["choices"][0]["message"]["content"]


def test_json_object_and_vllm_structured_outputs_equal_bare_vllms(client, reference):
    for request in [
        dict(model="tiny", messages=MESSAGES, max_tokens=30, temperature=0, response_format={"type": "json_object"}),
        dict(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
             extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}}),
        dict(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
             extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}),
    ]:  # fmt: skip
        ours, theirs = both(client, reference, "chat", **request)
        assert ours["choices"][0]["message"] == theirs["choices"][0]["message"]
    assert ours["choices"][0]["message"]["content"][3] == "-"


def tool_call_arguments(message: dict) -> list[tuple[str, dict]]:
    return [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in message["tool_calls"]]


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_calls_validate_against_the_tools_parameters(client, reference, tool_choice):
    request = dict(model="tiny", messages=MESSAGES, max_tokens=200, temperature=0, tools=[WEATHER_TOOL],
                   tool_choice=tool_choice, parallel_tool_calls=False)  # fmt: skip
    ours, theirs = both(client, reference, "chat", **request)
    [(name, arguments)] = tool_call_arguments(ours["choices"][0]["message"])
    assert name == "get_weather"
    jsonschema.validate(arguments, WEATHER_PARAMETERS)
    assert tool_call_arguments(ours["choices"][0]["message"]) == tool_call_arguments(theirs["choices"][0]["message"])
    streamed = streamed_tool_calls(client, **request)
    assert [(name, json.loads(arguments)) for name, arguments in streamed] == [(name, arguments)]


def streamed_tool_calls(target: openai.OpenAI, **request) -> list[tuple[str, str]]:
    """Tool calls assembled from streamed deltas, as clients do: name once, arguments in pieces."""
    calls: dict[int, list[str]] = {}
    for chunk in target.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                name, arguments = calls.setdefault(delta.index, ["", ""])
                calls[delta.index] = [name + (delta.function.name or ""), arguments + (delta.function.arguments or "")]
    return [(name, arguments) for name, arguments in (calls[i] for i in sorted(calls))]


def test_auto_tool_choice_goes_through_the_models_tool_parser_as_in_bare_vllm(client, reference):
    request = dict(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0, tools=[WEATHER_TOOL])
    for tool_choice in ("auto", "none"):
        ours, theirs = both(client, reference, "chat", tool_choice=tool_choice, **request)
        assert ours["choices"][0]["message"] == theirs["choices"][0]["message"]
        assert ours["choices"][0]["finish_reason"] == theirs["choices"][0]["finish_reason"]


def test_reasoning_parser_splits_reasoning_from_content(client, graph):
    """`small` has the deepseek_r1 parser: what the model writes before </think> is reasoning."""
    request = dict(model="small", messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    message = client.chat.completions.create(**request).choices[0].message
    prompt = httpx.post(f"{graph.base_url}/tokenize", json={"model": "small", "messages": MESSAGES}, timeout=30)
    raw = client.completions.create(model="small", prompt=prompt.json()["tokens"], max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, "skip_special_tokens": False})  # fmt: skip
    text = raw.choices[0].text
    reasoning = message.model_extra.get("reasoning") or message.model_extra.get("reasoning_content")
    if "</think>" in text:
        assert (reasoning, message.content) == tuple(text.split("</think>", 1))
    else:
        assert (reasoning, message.content) == (text, None)
    streamed = ""
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            extra = choice.delta.model_extra
            streamed += extra.get("reasoning") or extra.get("reasoning_content") or ""
    assert streamed == reasoning


BAD_REQUESTS = [
    ("completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, "min_tokens": 3}),
    ("completions", {"model": "tiny", "prompt": "hi", "logprobs": 50}),
    ("completions", {"model": "tiny", "prompt": "hi", "n": 0}),
    ("completions", {"model": "tiny", "prompt": "hi", "echo": True, "suffix": "x"}),
    ("chat/completions", {"model": "tiny", "messages": MESSAGES, "top_logprobs": 2}),
    ("chat/completions", {"model": "tiny", "messages": MESSAGES, "tool_choice": "required"}),
    ("chat/completions", {"model": "tiny", "messages": MESSAGES, "response_format": {"type": "json_schema"}}),
    ("chat/completions", {"model": "tiny", "messages": MESSAGES, "temperature": -1}),
]


@pytest.mark.parametrize(("path", "body"), BAD_REQUESTS)
def test_what_bare_vllm_refuses_the_graph_refuses_with_a_400(graph, bare_vllm, path, body):
    ours = httpx.post(f"{graph.openai_base_url}/{path}", json=body, timeout=60)
    theirs = httpx.post(f"{bare_vllm}/v1/{path}", json=body, timeout=60)
    assert theirs.status_code == 400, theirs.text
    assert ours.status_code == 400, ours.text
    assert set(ours.json()["error"]) >= {"message", "type", "param", "code"}


def test_langchain_structured_output_and_tools_work_unchanged(graph):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Verdict(BaseModel):
        ok: bool
        grade: str = Field(json_schema_extra={"enum": ["A", "B", "C"]})

    @tool
    def get_weather(city: str) -> str:
        """Weather by city."""
        return f"sunny in {city}"

    llm = ChatOpenAI(base_url=graph.openai_base_url, api_key="unused", model="tiny", temperature=0, max_tokens=200)
    verdict = llm.with_structured_output(Verdict, method="json_schema", strict=True).invoke("Grade this.")
    assert isinstance(verdict, Verdict) and verdict.grade in {"A", "B", "C"}
    called = llm.bind_tools([get_weather], tool_choice="get_weather", strict=True).invoke("Weather in Rome?")
    [call] = called.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)


LM_EVAL_TASK = """\
task: servegraph_pick
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
LM_EVAL_DOCS = [
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0},
    {"question": "Paris is in", "choices": [" France", " Peru", " space"], "answer": 0},
]


def lm_eval_logliks(base_url: str, tokenizer_dir: Path, task_dir: Path) -> list[list[float]]:
    """lm-eval-harness `local-completions` on a task from local files: each choice's log-likelihood."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="local-completions",
        model_args=f"model=tiny,base_url={base_url}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={tokenizer_dir},num_concurrent=1,max_retries=1,tokenized_requests=True",
        tasks=["servegraph_pick"],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
    )
    samples = sorted(results["samples"]["servegraph_pick"], key=lambda sample: sample["doc_id"])
    return [[response[0][0] for response in sample["resps"]] for sample in samples]


def test_lm_eval_local_completions_gives_bare_vllms_log_likelihoods(graph, bare_vllm, tiny_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in LM_EVAL_DOCS))
    (tmp_path / "servegraph_pick.yaml").write_text(LM_EVAL_TASK.format(data=data))
    ours = lm_eval_logliks(graph.base_url, tiny_dir, tmp_path)
    theirs = lm_eval_logliks(bare_vllm, tiny_dir, tmp_path)
    assert [len(choices) for choices in ours] == [3, 2, 3]
    for our_choices, their_choices in zip(ours, theirs, strict=True):
        assert_logprobs_close(our_choices, their_choices)


def test_responses_api_text_and_stream_equal_bare_vllms(client, reference):
    request = dict(model="tiny", input="Tell me a story.", max_output_tokens=12, temperature=0)
    ours, theirs = client.responses.create(**request), reference.responses.create(**request)
    assert (ours.output_text, ours.status, ours.usage.output_tokens) == (
        theirs.output_text, theirs.status, theirs.usage.output_tokens)  # fmt: skip
    events = list(client.responses.create(stream=True, **request))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ours.output_text


def test_responses_api_function_tools_validate_and_equal_bare_vllms(client, reference):
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS, "strict": True}
    request = dict(model="tiny", input="Weather in Paris?", max_output_tokens=200, temperature=0, tools=[tool],
                   tool_choice="required")  # fmt: skip

    def calls(response) -> list[tuple[str, dict]]:
        return [(item.name, json.loads(item.arguments)) for item in response.output if item.type == "function_call"]

    ours = calls(client.responses.create(**request))
    [(name, arguments)] = ours
    assert name == "get_weather" and ours == calls(reference.responses.create(**request))
    jsonschema.validate(arguments, WEATHER_PARAMETERS)
    events = list(client.responses.create(stream=True, **request))
    streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(streamed) == arguments
