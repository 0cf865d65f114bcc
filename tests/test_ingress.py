"""The HTTP layer without Ray: real tokenizer and postprocessing logic, a scripted engine."""

from __future__ import annotations

import json
import pickle

import pytest
from fastapi.testclient import TestClient

from servegraph.deployments.ingress import build_openai_app
from servegraph.deployments.telemetry import RequestRecord
from tests.fakes import InProcessStages, ScriptedEngine


@pytest.fixture
def records() -> list[RequestRecord]:
    return []


@pytest.fixture
def make_client(tiny_spec, frontend_for, records):
    def make(engine: ScriptedEngine | None = None, **spec_changes) -> TestClient:
        spec = tiny_spec.model_copy(update=spec_changes)
        stages = InProcessStages([spec], frontend_for, {spec.engine_deployment_name: engine or ScriptedEngine()})
        return TestClient(build_openai_app(stages, "llm", records.append), raise_server_exceptions=False)

    return make


def sse_payloads(response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]


def test_completion_echo_and_usage(make_client, tiny_tokenizer):
    response = make_client().post("/v1/completions", json={"model": "tiny-chat", "prompt": "hello", "max_tokens": 5})
    body = response.json()
    assert response.status_code == 200, body
    n_prompt = len(tiny_tokenizer.encode("hello"))
    assert body["object"] == "text_completion" and body["model"] == "tiny-chat"
    assert (
        body["usage"].items()
        >= {"prompt_tokens": n_prompt, "completion_tokens": 5, "total_tokens": n_prompt + 5}.items()
    )
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["text"].startswith("hello")


def test_chat_stream_framing(make_client):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    response = make_client().post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_engine_failure_mid_stream_ends_with_error_event(make_client):
    client = make_client(ScriptedEngine(fail_after=2))
    response = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "hello world", "max_tokens": 8, "stream": True}
    )
    payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["type"] == "internal_server_error" and "engine died" not in error["message"]


def test_unexpected_failure_is_500_without_internals(make_client):
    client = make_client(ScriptedEngine(fail_after=0))
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "internal error: RuntimeError"


@pytest.mark.parametrize(
    ("content", "param"),
    [(b"{not json", None), (b'{"model": "tiny", "prompt": "\xff"}', None), (b'{"model": "tiny"}', "prompt")],
)
def test_unparseable_bodies_get_openai_errors(make_client, content, param):
    response = make_client().post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_wrong_method_is_openai_error(make_client):
    response = make_client().get("/v1/completions")
    assert response.status_code == 405 and response.json()["error"]["code"] == "405"


def test_one_record_per_request_with_tokens_and_engine_time(make_client, records, tiny_tokenizer):
    client = make_client()
    client.post("/v1/completions", json={"model": "tiny-chat", "prompt": "hello", "max_tokens": 5},
                headers={"x-request-id": "req-abc"})  # fmt: skip
    [record] = records
    assert (record.request_id, record.application, record.model, record.version) == (
        "req-abc",
        "llm",
        "tiny-chat",
        "v1",
    )
    assert (record.status, record.stream, record.completion_tokens) == (200, False, 5)
    assert record.prompt_tokens == len(tiny_tokenizer.encode("hello"))
    assert record.engine_s == 0.5 and record.ttft_s is None


def test_stream_record_has_ttft_and_tpot(make_client, records):
    make_client().post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 4, "stream": True})
    [record] = records
    assert record.stream and record.status == 200 and record.completion_tokens == 4
    assert 0 <= record.ttft_s <= record.latency_s and record.tpot_s is not None


def test_failures_and_rejections_are_recorded_with_their_status(make_client, records):
    client = make_client(ScriptedEngine(fail_after=2))
    client.post("/v1/completions", json={"model": "tiny", "prompt": "hello world", "max_tokens": 8, "stream": True})
    client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    client.post("/v1/completions", content=b"{broken", headers={"content-type": "application/json"})
    assert [(r.model, r.status) for r in records] == [("tiny", 500), ("nope", 404), ("-", 400)]


def test_payloads_stay_out_of_records_unless_the_model_says_so(make_client, records):
    body = {"model": "tiny", "prompt": "secret plan", "max_tokens": 3}
    make_client().post("/v1/completions", json=body)
    make_client(log_payloads=True).post("/v1/completions", json=body)
    make_client(log_payloads=True).post("/v1/completions", json={**body, "stream": True})
    hidden, shown, streamed = records
    assert (hidden.prompt, hidden.completion) == (None, None)
    assert "secret plan" in shown.prompt and shown.completion and "secret plan".startswith(shown.completion)
    assert streamed.completion == shown.completion


def test_full_engine_queue_is_503_with_retry_after_even_for_streams(make_client, records):
    from ray.serve.exceptions import BackPressureError

    client = make_client(ScriptedEngine(fail_after=0, error=BackPressureError(9, 8, retry_after_s=3)))
    for stream in (False, True):
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "stream": stream}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 503 and response.headers["retry-after"] == "3"
        assert response.json()["error"]["code"] == "overloaded"
    assert [r.status for r in records] == [503, 503]


def test_request_over_the_model_timeout_is_504(make_client):
    client = make_client(ScriptedEngine(delay_s=0.2), request_timeout_s=0.3)
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 20})
    assert response.status_code == 504
    assert response.json()["error"] == {
        "message": "The request to model `tiny` did not finish within 0.3 s.",
        "type": "timeout_error",
        "param": None,
        "code": "timeout",
    }


def test_stream_over_the_model_timeout_ends_with_a_timeout_event(make_client):
    client = make_client(ScriptedEngine(delay_s=0.2), request_timeout_s=0.3)
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 20, "stream": True})
    payloads = sse_payloads(response)
    assert response.status_code == 200 and payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["error"]["code"] == "timeout"
    assert 1 <= len(payloads) - 2 < 20  # some text, then the deadline


def test_models_retrieve_one_by_name_or_alias(make_client):
    client = make_client()
    assert client.get("/v1/models/tiny-chat").json() | {"created": 0} == {
        "id": "tiny-chat", "object": "model", "created": 0, "owned_by": "servegraph", "root": "tiny",
        "parent": None, "max_model_len": 64, "versions": ["v1"],
    }  # fmt: skip
    missing = client.get("/v1/models/gpt-4o")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert "tiny, tiny-chat" in missing.json()["error"]["message"]


def test_tokenize_and_detokenize_in_vllms_shape(make_client, tiny_tokenizer):
    client = make_client()
    ids = tiny_tokenizer.encode("hello world")
    tokenized = client.post("/tokenize", json={"model": "tiny", "prompt": "hello world", "return_token_strs": True})
    assert tokenized.json() == {"count": len(ids), "max_model_len": 64, "tokens": ids,
                                "token_strs": tiny_tokenizer.convert_ids_to_tokens(ids)}  # fmt: skip
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    chat = client.post("/tokenize", json={"model": "tiny", "messages": messages}).json()
    rendered = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat["tokens"] == tiny_tokenizer.encode(rendered, add_special_tokens=False) and chat["token_strs"] is None
    detokenized = client.post("/detokenize", json={"model": "tiny", "tokens": ids})
    assert detokenized.json() == {"prompt": "hello world"}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": "hi"}, 400, "model"),
        ("/tokenize", {"model": "nope", "prompt": "hi"}, 404, "model"),
        ("/tokenize", {"model": "tiny", "prompt": 5}, 400, "prompt"),
        ("/tokenize", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                       "add_generation_prompt": True, "continue_final_message": True}, 400, None),
        ("/detokenize", {"model": "tiny", "tokens": [1, 10**6]}, 400, "tokens"),
        ("/detokenize", {"model": "tiny", "tokens": "abc"}, 400, "tokens"),
        ("/detokenize", ["not", "an", "object"], 400, None),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, "seed": 2**70}, 400, "seed"),
    ],
)  # fmt: skip
def test_refused_tokenizer_and_sampling_input_names_the_parameter(make_client, path, body, status, param):
    response = make_client().post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param, response.json()


def test_responses_api_answers_and_streams_typed_events(make_client, records):
    client = make_client()
    body = {"model": "tiny", "input": "hello", "max_output_tokens": 4}
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["object"], answer["status"], answer["model"]) == ("response", "incomplete", "tiny")
    assert answer["incomplete_details"] == {"reason": "max_output_tokens"}
    [message] = answer["output"]
    assert message["type"] == "message" and message["content"][0]["text"]
    assert answer["usage"]["output_tokens"] == 4
    streamed = client.post("/v1/responses", json={**body, "stream": True})
    events = [block.split("\n")[0].removeprefix("event: ") for block in streamed.text.split("\n\n") if block]
    assert events[:2] == ["response.created", "response.in_progress"] and events[-1] == "response.completed"
    deltas = [json.loads(block.split("\ndata: ")[1])["delta"] for block in streamed.text.split("\n\n")
              if block.startswith("event: response.output_text.delta")]  # fmt: skip
    assert "".join(deltas) == message["content"][0]["text"]
    assert [(r.status, r.completion_tokens) for r in records] == [(200, 4), (200, 4)]


@pytest.mark.parametrize("field", [{"previous_response_id": "resp_1"}, {"background": True, "store": True}])
def test_responses_api_state_is_refused_not_dropped(make_client, field):
    response = make_client().post("/v1/responses", json={"model": "tiny", "input": "hi", **field})
    assert response.status_code == 400 and response.json()["error"]["param"] == next(iter(field))


@pytest.mark.e2e  # imports vLLM to build the sealed request
def test_the_ingress_never_imports_vllm_even_when_relaying_a_sealed_prepared_request():
    """Each ingress replica would grow by ~550 MB (vLLM and torch) if it unpickled the tokenizer's vLLM objects."""
    import subprocess
    import sys

    from vllm import SamplingParams

    from servegraph.deployments.messages import Sealed

    sealed = pickle.dumps(Sealed.of(SamplingParams(max_tokens=3)))
    check = (
        "import pickle, sys\nimport servegraph.deployments.ingress\n"
        "relayed = pickle.loads(sys.stdin.buffer.read())\n"
        "assert not any(m.split('.')[0] in ('vllm', 'torch') for m in sys.modules), 'vLLM or torch imported'\n"
        "assert pickle.loads(pickle.dumps(relayed)).blob == relayed.blob\n"
    )
    subprocess.run([sys.executable, "-c", check], input=sealed, check=True, timeout=120)


def test_inner_stages_drop_only_serves_access_line():
    """Serve's per-call access line goes; our lines and Serve's warnings stay, even once Serve
    re-creates its handlers."""
    import logging

    from servegraph.deployments.stage_process import SERVE_LOGGER_NAME, drop_serve_access_lines

    serve_logger = logging.getLogger(SERVE_LOGGER_NAME)
    kept: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record.getMessage())

    saved = (serve_logger.handlers[:], serve_logger.filters[:], serve_logger.propagate, serve_logger.level)
    try:
        serve_logger.propagate = False
        serve_logger.setLevel(logging.INFO)
        drop_serve_access_lines()
        drop_serve_access_lines()  # twice, as a replica that restarts its stage object: one filter
        serve_logger.handlers[:] = [Capture()]  # what Serve does when its logging config changes
        serve_logger.info("CALL prepare OK 1.2ms", extra={"serve_access_log": True})
        serve_logger.warning("replica is slow")
        logging.getLogger(f"{SERVE_LOGGER_NAME}.servegraph.engine").info("engine request finished")
        assert kept == ["replica is slow", "engine request finished"]
        assert len(serve_logger.filters) == len(saved[1]) + 1
    finally:
        serve_logger.handlers[:], serve_logger.filters[:] = saved[0], saved[1]
        serve_logger.propagate, serve_logger.level = saved[2], saved[3]


def test_a_null_field_means_its_default_and_never_a_500(make_client):
    """Found by the schemathesis run: `background: null` was accepted, then broke the Responses answer."""
    client = make_client()
    answered = client.post("/v1/responses", json={"model": "tiny", "input": "", "background": None})
    assert answered.status_code == 200, answered.text
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": None, "stop": None}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200


def test_tokenize_refuses_messages_no_chat_template_takes(make_client):
    """Found by the schemathesis run: a harmony-format message (`author`) became an object and a 500."""
    harmony = {"author": {"role": "user"}, "content": [{"type": "text", "text": "hi"}]}
    refused = make_client().post("/tokenize", json={"model": "tiny", "messages": [harmony]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages"


def test_a_message_field_sent_as_an_object_where_a_list_belongs_is_answered_not_a_500(make_client):
    """Found by the schemathesis run: pydantic validated `content: {}` lazily, as an iterator the
    tokenizer stage could not pickle on to postprocess."""
    client = make_client()
    user = {"role": "user", "content": "hi"}
    for content, status in (({}, 200), ({"a": 1}, 400)):
        body = {"model": "tiny", "messages": [user, {"role": "assistant", "content": content}], "max_tokens": 2}
        for path in ("/v1/chat/completions", "/tokenize"):
            answered = client.post(path, json=body)
            assert answered.status_code == status, answered.text
            assert status == 200 or answered.json()["error"]["param"] == "messages"
