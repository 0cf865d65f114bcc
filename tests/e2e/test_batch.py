"""The Batch API on the real graph with the official `openai` client: upload, create, poll, download.

Lines run through the same stages as interactive requests (tokenizer, postprocess, the vLLM
engines) at the batch priority. Completions with `echo: true` return the prompt in their text,
so each output line proves it holds the answer to its own custom_id's request.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import openai
import pytest
import ray

from tests.e2e.conftest import ALPHA_KEY, SERVED_BY, TENANT_KEYS, Graph, poll, with_traffic

ENDED = ("completed", "failed", "expired", "cancelled")
LINES = 500  # the size; max_tokens 1-2 on `tiny` keeps it to seconds (see the README's figure)


def completion_line(index: int, **extra) -> str:
    body = {"model": "tiny", "prompt": prompt(index), "max_tokens": 1 + index % 2, "echo": True, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    return json.dumps({"custom_id": f"req-{index}", "method": "POST", "url": "/v1/completions",
                       "body": {**body, **extra}})  # fmt: skip


def prompt(index: int) -> str:
    return f"Line number {index} of the batch says hello"  # well over 4 tokens (models/cpu_amx.py)


def chat_line(custom_id: str, **body) -> str:
    payload = {"model": "tiny", "messages": [{"role": "user", "content": f"Say something about {custom_id}"}],
               "max_tokens": 1, **body}  # fmt: skip
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": payload})


def upload(client: openai.OpenAI, lines: list[str]) -> str:
    return client.files.create(file=("batch.jsonl", "\n".join(lines).encode()), purpose="batch").id


def ended(client: openai.OpenAI, batch_id: str, timeout_s: float = 300):
    def finished():
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in ENDED else None

    return poll(finished, timeout_s, f"batch {batch_id} to end", interval_s=0.5)


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).content.splitlines()]


def test_a_500_line_batch_completes_with_each_answer_under_its_custom_id(client: openai.OpenAI):
    file_id = upload(client, [completion_line(i) for i in range(LINES)])
    started = time.monotonic()
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h",
                                  metadata={"test": "500"})  # fmt: skip
    assert batch.status == "validating" and batch.metadata == {"test": "500"}
    batch = ended(client, batch.id)
    print(f"{LINES}-line batch: {time.monotonic() - started:.1f} s")  # noqa: T201
    assert batch.status == "completed", batch
    assert batch.request_counts.total == LINES and batch.request_counts.completed == LINES
    assert batch.error_file_id is None and batch.usage.output_tokens == sum(1 + i % 2 for i in range(LINES))
    output = lines_of(client, batch.output_file_id)
    assert Counter(line["custom_id"] for line in output) == Counter(f"req-{i}" for i in range(LINES))
    for line in output:
        index = int(line["custom_id"].split("-")[1])
        response = line["response"]
        assert response["status_code"] == 200 and line["error"] is None
        assert response["body"]["choices"][0]["text"].startswith(prompt(index))  # echo: its own prompt
        assert response["body"]["usage"]["completion_tokens"] == 1 + index % 2


def test_malformed_lines_go_to_the_error_file_and_the_rest_finish(client: openai.OpenAI):
    lines = [chat_line(f"ok-{i}") for i in range(6)] + [
        "{this is not json",
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),
        chat_line("ok-2"),  # a duplicate custom_id
        chat_line("bad-tokens", max_tokens=-1),  # vLLM's request model refuses it
        chat_line("no-such-model", model="nope"),
        json.dumps({"custom_id": "wrong-url", "method": "POST", "url": "/v1/completions", "body": {}}),
    ]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    batch = ended(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 6 and batch.request_counts.failed == 6
    output, errors = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    assert sorted(line["custom_id"] for line in output) == [f"ok-{i}" for i in range(6)]
    assert all(line["response"]["body"]["object"] == "chat.completion" for line in output)
    refused = {line["custom_id"]: line["response"] for line in errors if line["response"]}
    assert refused["bad-tokens"]["status_code"] == 400 and refused["no-such-model"]["status_code"] == 404
    assert refused["bad-tokens"]["body"]["error"]["type"] == "invalid_request_error"
    malformed = sorted(line["error"]["code"] for line in errors if line["error"])
    assert malformed == ["duplicate_custom_id", "invalid_json_line", "invalid_url", "missing_required_parameter"]
    assert sorted(error.line for error in batch.errors.data) == [7, 8, 9, 12]


def runner_actor(graph: Graph) -> str:
    replicas = graph.cluster.applications()["llm"]["deployments"]["batch-runner"]["replicas"]
    (running,) = [replica for replica in replicas if replica["state"] == "RUNNING"]
    return running["actor_name"]


def test_a_batch_resumes_after_its_runner_is_killed_with_every_line_once(client: openai.OpenAI, graph: Graph):
    count = 300
    file_id = upload(client, [completion_line(i, max_tokens=8) for i in range(count)])  # about 10 s of work
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    killed = runner_actor(graph)
    poll(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 30, 120, "30 lines done")
    mid = client.batches.retrieve(batch.id)
    ray.kill(ray.get_actor(killed, namespace="serve"), no_restart=False)
    assert mid.status == "in_progress" and mid.request_counts.completed < count  # killed mid-batch

    def progress_after_restart():
        try:
            return client.batches.retrieve(batch.id)  # answered only by a runner that is up again
        except openai.APIStatusError:
            return None

    poll(progress_after_restart, 300, "the runner to come back")
    batch = ended(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == count, batch
    output = lines_of(client, batch.output_file_id)
    assert Counter(line["custom_id"] for line in output) == Counter(f"req-{i}" for i in range(count))


def test_cancel_keeps_partial_output_and_reports_the_rest(client: openai.OpenAI):
    count = 200
    file_id = upload(client, [completion_line(i) for i in range(count)])
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    poll(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 5, 120, "5 lines done")
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = ended(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    output, errors = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    assert len(output) >= 5 and len(output) + len(errors) == count
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}


def limits_client(graph: Graph, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{graph.base_url}/limits/v1", api_key=key, max_retries=0, timeout=60)


def test_a_tenant_sees_only_its_own_batches_and_quota_refusals_wait(graph: Graph):
    """`single` may run one request at a time: its batch's lines wait for the slot instead of failing."""
    owner, other = limits_client(graph, TENANT_KEYS["single"]), limits_client(graph, ALPHA_KEY)
    body = {"model": "shared", "max_tokens": 1}
    lines = [json.dumps({"custom_id": f"s-{i}", "method": "POST", "url": "/v1/completions",
                         "body": {**body, "prompt": prompt(i)}}) for i in range(6)]  # fmt: skip
    batch = owner.batches.create(input_file_id=upload(owner, lines), endpoint="/v1/completions",
                                 completion_window="24h")  # fmt: skip
    calls = [
        lambda: other.batches.retrieve(batch.id),
        lambda: other.batches.cancel(batch.id),
        lambda: other.files.content(batch.input_file_id),
        lambda: other.files.retrieve(batch.input_file_id),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [listed.id for listed in other.batches.list()]
    batch = ended(owner, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 6, batch


def test_batch_lines_follow_the_canary_weights_the_ingress_was_given(graph: Graph):
    """`resilience`'s canary v1 and v2 are different builds: a greedy answer tells which version served it.
    The ingress sends its weights to the batch runner when they change."""
    client = openai.OpenAI(base_url=f"{graph.base_url}/resilience/v1", api_key="unused", max_retries=0, timeout=60)
    body = {"model": "canary", "prompt": prompt(7), "max_tokens": 6, "temperature": 0}
    line = {"method": "POST", "url": "/v1/completions", "body": {**body, "ignore_eos": True}}
    lines = [json.dumps({"custom_id": f"c-{i}", **line}) for i in range(4)]

    def answer_of(version: str) -> str | None:
        raw = client.completions.with_raw_response.create(**body, extra_body={"ignore_eos": True})
        return raw.parse().choices[0].text if raw.headers[SERVED_BY] == f"canary@{version}" else None

    def batch_answers() -> set[str]:
        batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/completions",
                                      completion_window="24h")  # fmt: skip
        batch = ended(client, batch.id, timeout_s=60)
        return {out["response"]["body"]["choices"][0]["text"] for out in lines_of(client, batch.output_file_id)}

    v1 = poll(lambda: answer_of("v1"), 60, "canary v1's answer")
    assert batch_answers() == {v1}
    graph.cluster.deploy(with_traffic(graph, {"v1": 0, "v2": 100}))
    try:
        v2 = poll(lambda: answer_of("v2"), 60, "traffic to move to canary v2")
        assert v2 != v1
        poll(lambda: batch_answers() == {v2}, 60, "batch lines to move to canary v2")
    finally:
        graph.cluster.deploy(with_traffic(graph, {"v1": 100}))


def test_a_file_over_the_api_body_limit_and_a_grpc_message_uploads_and_downloads_whole(client: openai.OpenAI):
    """9 MiB: over `limits.max_body_bytes` (8 MiB, which uploads are not held to) and Serve's 4 MiB gRPC message."""
    padding = "x" * 1000
    lines = [completion_line(i, prompt=f"{prompt(i)} {padding}") for i in range(9000)]
    data = "\n".join(lines).encode()
    assert len(data) > 9 << 20
    file_id = upload(client, lines)
    try:
        assert client.files.retrieve(file_id).bytes == len(data)
        assert client.files.content(file_id).content == data
    finally:
        client.files.delete(file_id)
