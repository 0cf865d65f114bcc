"""The Batch API's logic without Ray: store, lines, runner (resume, cancel, expiry, malformed lines, tenants).

A fake LineGraph stands in for the graph; everything else (the disk store, the result files,
the service, and the HTTP routes with the official `openai` client) is the real code.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from servegraph.deployments.auth import Tenant
from servegraph.deployments.batch_api import LocalBatchCalls
from servegraph.deployments.batch_lines import line_number
from servegraph.deployments.batch_runner import BatchService
from servegraph.deployments.batch_store import ERRORS, OUTPUT, BatchStore
from servegraph.deployments.errors import BadRequestError, OpenAIError, RateLimitError
from servegraph.deployments.messages import ResponseChunk
from servegraph.deployments.protocol import ClientRequest
from servegraph.models.config import BatchConfig, PriorityClass, RequestLimits

ALICE = Tenant("alice", frozenset({"*"}))
BOB = Tenant("bob", frozenset({"*"}))
CHAT = "/v1/chat/completions"


class FakeGraph:
    """Answers each line with a body naming its custom request; can refuse, rate-limit, or wait on a gate."""

    def __init__(self, gate: asyncio.Event | None = None, rate_limited: int = 0) -> None:
        self.calls: Counter[str] = Counter()
        self.gate = gate
        self.rate_limited = rate_limited  # refusals (429) before the first line runs
        self.priorities: list[PriorityClass] = []

    async def run(self, tenant: Tenant, request: ClientRequest, request_id: str) -> ResponseChunk:
        if self.rate_limited:
            self.rate_limited -= 1
            raise RateLimitError("over quota", headers={"Retry-After": "0"})
        tag = request.body["messages"][0]["content"]
        if self.gate is not None and not tag.startswith("fast"):
            await self.gate.wait()
        self.calls[tag] += 1
        if tag.startswith("refuse"):
            raise BadRequestError("the graph refuses this", param="messages")
        body = {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "tenant": tenant.name, "echo": tag,
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}  # fmt: skip
        return ResponseChunk(json.dumps(body), 3, 1, "length", True)


def request_line(custom_id: str, content: str | None = None, url: str = CHAT, method: str = "POST", **body) -> str:
    payload = {"model": "tiny", "messages": [{"role": "user", "content": content or custom_id}], "max_tokens": 1}
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": {**payload, **body}})


def jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def service(root: Path, graph, clock=None, **config) -> BatchService:
    batch = BatchConfig(dir=str(root), retry_interval_s=0.01, **config)
    kwargs = {"clock": clock} if clock is not None else {}
    return BatchService(BatchStore(root), graph, batch, RequestLimits(), {"alice": ALICE, "bob": BOB}, **kwargs)


async def submit(svc: BatchService, lines: list[str], tenant: Tenant = ALICE) -> dict:
    uploaded = await svc.upload_file(tenant.name, "in.jsonl", "batch", jsonl(lines))
    return await svc.create_batch(tenant, uploaded["id"], CHAT, "24h", {"run": "test"})


def result_lines(svc_data: bytes) -> list[dict]:
    return [json.loads(line) for line in svc_data.splitlines()]


async def results(svc: BatchService, batch: dict, tenant: str = "alice") -> tuple[list[dict], list[dict]]:
    output = await svc.file_content(tenant, batch["output_file_id"]) if batch["output_file_id"] else b""
    errors = await svc.file_content(tenant, batch["error_file_id"]) if batch["error_file_id"] else b""
    return result_lines(output), result_lines(errors)


async def poll_until(predicate, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def test_mixed_batch_completes_with_malformed_lines_in_the_error_file(tmp_path: Path):
    lines = [request_line(f"ok-{i}") for i in range(20)] + [
        "{not json",
        json.dumps({"method": "POST", "url": CHAT, "body": {}}),  # no custom_id
        request_line("ok-3"),  # duplicate
        request_line("wrong-url", url="/v1/completions"),
        request_line("wrong-method", method="GET"),
        request_line("streams", stream=True),
        json.dumps({"custom_id": "no-model", "method": "POST", "url": CHAT, "body": {"messages": []}}),
        request_line("refused", content="refuse me"),
        "",  # blank lines are not requests
    ]

    async def scenario():
        graph = FakeGraph()
        svc = service(tmp_path, graph)
        batch = await submit(svc, lines)
        assert batch["status"] == "validating" and batch["object"] == "batch" and batch["expires_at"]
        await svc.wait(batch["id"])
        batch = await svc.retrieve_batch("alice", batch["id"])
        return graph, batch, await results(svc, batch)

    graph, batch, (output, errors) = asyncio.run(scenario())
    assert batch["status"] == "completed" and batch["completed_at"] and batch["in_progress_at"]
    assert batch["request_counts"] == {"total": 28, "completed": 20, "failed": 8}
    assert batch["usage"]["input_tokens"] == 60 and batch["usage"]["output_tokens"] == 20
    assert sorted(line["custom_id"] for line in output) == sorted(f"ok-{i}" for i in range(20))
    for line in output:
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert line["response"]["body"]["echo"] == line["custom_id"]  # the right answer under the right id
    assert graph.calls["ok-3"] == 1  # the duplicate never ran
    by_id = {line["custom_id"]: line for line in errors}
    assert by_id["refused"]["response"]["status_code"] == 400
    assert by_id["refused"]["response"]["body"]["error"]["param"] == "messages"
    assert by_id["no-model"]["response"]["body"]["error"]["param"] == "model"
    assert by_id["streams"]["response"]["body"]["error"]["param"] == "stream"
    codes = {line["custom_id"]: line["error"]["code"] for line in errors if line["error"]}
    assert codes == {None: "missing_required_parameter", "ok-3": "duplicate_custom_id", "wrong-url": "invalid_url",
                     "wrong-method": "invalid_method"} | {None: codes[None]}  # fmt: skip
    assert sorted(e["code"] for e in batch["errors"]["data"]) == sorted(
        ["invalid_json_line", "missing_required_parameter", "duplicate_custom_id", "invalid_url", "invalid_method"]
    )
    assert {e["line"] for e in batch["errors"]["data"]} == {21, 22, 23, 24, 25}


def test_a_batch_resumes_after_a_restart_with_every_line_exactly_once(tmp_path: Path):
    lines = [request_line(f"line-{i}", content=f"{'fast' if i < 15 else 'slow'}-{i}") for i in range(40)]

    async def first_run() -> str:
        svc = service(tmp_path, FakeGraph(asyncio.Event()), max_concurrent_lines=4)
        batch = await submit(svc, lines)
        await poll_until(lambda: svc._jobs[batch["id"]].completed == 15)  # the rest hang in the graph
        await svc.stop()  # the replica goes away mid-batch, four lines in flight
        return batch["id"]

    batch_id = asyncio.run(first_run())
    folder = tmp_path / "alice" / "batches" / batch_id
    done_before = {line_number(json.loads(line)["id"]) for line in (folder / OUTPUT).read_bytes().splitlines()}
    assert done_before == set(range(1, 16))
    with open(folder / OUTPUT, "ab") as torn:  # a crash in the middle of an append
        torn.write(b'{"id": "batch_req_torn')

    async def second_run():
        graph = FakeGraph()
        svc = service(tmp_path, graph)
        svc.start()
        await svc.wait(batch_id)
        batch = await svc.retrieve_batch("alice", batch_id)
        return graph, batch, await results(svc, batch)

    graph, batch, (output, errors) = asyncio.run(second_run())
    assert batch["status"] == "completed" and errors == []
    assert batch["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
    assert Counter(line["custom_id"] for line in output) == Counter(f"line-{i}" for i in range(40))
    rerun = {int(tag.split("-")[1]) + 1 for tag in graph.calls}  # line numbers run after the restart
    assert rerun.isdisjoint(done_before) and len(rerun) == 40 - len(done_before)


def test_cancel_stops_the_rest_and_keeps_partial_output(tmp_path: Path):
    lines = [request_line(f"c-{i}", content=f"{'fast' if i < 5 else 'slow'}-{i}") for i in range(30)]

    async def scenario():
        gate = asyncio.Event()
        svc = service(tmp_path, FakeGraph(gate), max_concurrent_lines=2)
        finished = await submit(svc, lines[:3])  # fast lines: this batch completes
        await svc.wait(finished["id"])
        batch = await submit(svc, lines)
        await poll_until(lambda: svc._jobs[batch["id"]].completed == 5)  # then every worker waits on a slow line
        cancelling = await svc.cancel_batch("alice", batch["id"])
        await svc.wait(batch["id"])
        batch = await svc.retrieve_batch("alice", batch["id"])
        with pytest.raises(OpenAIError) as refused:
            await svc.cancel_batch("alice", finished["id"])
        return cancelling, batch, await results(svc, batch), refused.value

    cancelling, batch, (output, errors), refused = asyncio.run(scenario())
    assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"]
    assert batch["status"] == "cancelled" and batch["cancelled_at"]
    assert sorted(line["custom_id"] for line in output) == [f"c-{i}" for i in range(5)]
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert sorted(line["custom_id"] for line in errors) == sorted(f"c-{i}" for i in range(5, 30))
    assert batch["request_counts"] == {"total": 30, "completed": 5, "failed": 25}
    assert refused.status_code == 400


def test_expiry_reports_unfinished_lines_as_expired(tmp_path: Path):
    lines = [request_line(f"e-{i}") for i in range(10)]
    day = 24 * 3600
    clock = type("Clock", (), {"now": 1000.0, "__call__": lambda self: self.now})()

    async def scenario():
        gate = asyncio.Event()
        svc = service(tmp_path, FakeGraph(gate), clock=clock, max_concurrent_lines=1)
        clock.now = 1000.0
        batch = await submit(svc, lines)
        clock.now = 1000.0 + day - 0.2  # the window ends 0.2 s from now; the graph never answers
        await svc.wait(batch["id"])
        batch = await svc.retrieve_batch("alice", batch["id"])
        return batch, await results(svc, batch)

    batch, (output, errors) = asyncio.run(scenario())
    assert batch["status"] == "expired" and batch["expired_at"]
    assert output == [] and [line["error"]["code"] for line in errors] == ["batch_expired"] * 10
    assert sorted(line["custom_id"] for line in errors) == sorted(f"e-{i}" for i in range(10))


def test_quota_refusals_wait_and_retry_rather_than_fail(tmp_path: Path):
    async def scenario():
        graph = FakeGraph(rate_limited=5)
        svc = service(tmp_path, graph, max_concurrent_lines=1)
        batch = await submit(svc, [request_line("q-0"), request_line("q-1")])
        await svc.wait(batch["id"])
        return await svc.retrieve_batch("alice", batch["id"])

    batch = asyncio.run(scenario())
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 2


def test_a_tenant_sees_only_its_own_files_and_batches(tmp_path: Path):
    async def scenario():
        svc = service(tmp_path, FakeGraph())
        batch = await submit(svc, [request_line("mine")])
        await svc.wait(batch["id"])
        calls = [svc.retrieve_file("bob", batch["input_file_id"]), svc.file_content("bob", batch["input_file_id"]),
                 svc.delete_file("bob", batch["input_file_id"]), svc.retrieve_batch("bob", batch["id"]),
                 svc.cancel_batch("bob", batch["id"]),
                 svc.create_batch(BOB, batch["input_file_id"], CHAT, "24h")]  # fmt: skip
        statuses = []
        for call in calls:
            try:
                await call
            except OpenAIError as error:
                statuses.append(error.status_code)
        listed = (await svc.list_batches("bob"))["data"], (await svc.list_files("bob"))["data"]
        return statuses, listed, (await svc.list_files("alice"))["data"]

    statuses, listed, alices = asyncio.run(scenario())
    assert statuses == [404] * 6 and listed == ([], [])
    assert {stored["purpose"] for stored in alices} == {"batch", "batch_output"}


def test_create_validates_like_openai(tmp_path: Path):
    async def scenario():
        svc = service(tmp_path, FakeGraph())
        uploaded = await svc.upload_file("alice", "in.jsonl", "batch", jsonl([request_line("a")]))
        attempts = {
            "endpoint": (uploaded["id"], "/v1/images/generations", "24h", None),
            "completion_window": (uploaded["id"], CHAT, "1h", None),
            "metadata": (uploaded["id"], CHAT, "24h", {"k": "v" * 600}),
            "id": ("file-" + "0" * 32, CHAT, "24h", None),
        }
        found = {}
        for name, args in attempts.items():
            try:
                await svc.create_batch(ALICE, *args)
            except OpenAIError as error:
                found[name] = (error.status_code, error.param)
        for purpose, data in (("fine-tune", b"{}\n"), ("batch", b"  \n")):
            try:
                await svc.upload_file("alice", "x", purpose, data)
            except OpenAIError as error:
                found[purpose] = (error.status_code, error.param)
        return found

    assert asyncio.run(scenario()) == {
        "endpoint": (400, "endpoint"), "completion_window": (400, "completion_window"),
        "metadata": (400, "metadata"), "id": (404, "id"), "fine-tune": (400, "purpose"), "batch": (400, "file"),
    }  # fmt: skip


def test_results_survive_in_the_store_after_a_restart(tmp_path: Path):
    """An ended batch is listed with its counts, and its files served, by the next runner."""

    async def scenario():
        svc = service(tmp_path, FakeGraph())
        batch = await submit(svc, [request_line("kept"), "{bad"])
        await svc.wait(batch["id"])
        again = service(tmp_path, FakeGraph())
        again.start()
        batch = await again.retrieve_batch("alice", batch["id"])
        return batch, await results(again, batch)

    batch, (output, errors) = asyncio.run(scenario())
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert [line["custom_id"] for line in output] == ["kept"] and errors[0]["error"]["code"] == "invalid_json_line"
    assert not (tmp_path / "alice" / "batches" / batch["id"] / ERRORS).exists()  # published into the files


def test_the_official_client_uploads_creates_polls_and_downloads(tmp_path: Path):
    """The HTTP routes with `openai`'s own client: multipart upload, the Batch object, the content download."""
    from openai import AsyncOpenAI

    from servegraph.deployments.ingress import build_openai_app

    async def scenario():
        svc = service(tmp_path, FakeGraph())
        no_stages = SimpleNamespace(request_body_schemas=None)  # only the batch routes are called
        app = build_openai_app(no_stages, batches=LocalBatchCalls(svc), max_file_bytes=1 << 20)
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        client = AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0)
        uploaded = await client.files.create(file=("in.jsonl", jsonl([request_line("x"), "{bad"])), purpose="batch")
        batch = await client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
        await svc.wait(batch.id)
        batch = await client.batches.retrieve(batch.id)
        output = (await client.files.content(batch.output_file_id)).content
        listed = [item.id async for item in client.batches.list(limit=1)]
        files = [item.id async for item in client.files.list()]
        missing = await http.get("/v1/batches/batch_nope")
        deleted = await client.files.delete(uploaded.id)
        return uploaded, batch, output, listed, files, missing, deleted

    uploaded, batch, output, listed, files, missing, deleted = asyncio.run(scenario())
    assert uploaded.purpose == "batch" and uploaded.bytes > 0 and uploaded.filename == "in.jsonl"
    assert batch.status == "completed" and batch.request_counts.completed == 1 and batch.request_counts.failed == 1
    assert [json.loads(line)["custom_id"] for line in output.splitlines()] == ["x"]
    assert listed == [batch.id] and uploaded.id in files and len(files) == 3
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert deleted.deleted


class RecordingStages:
    """GraphStages' calls a non-streaming request makes: the chain, then `complete` (priority noted)."""

    def __init__(self) -> None:
        from servegraph.deployments.messages import ModelRoute
        from servegraph.deployments.router import Link
        from servegraph.models.spec import CircuitBreakerConfig

        self.link = Link(ModelRoute("tiny", "v1", "engine-tiny-v1", 16), CircuitBreakerConfig())
        self.calls = []

    async def chain(self, model: str, session_key: str | None):
        return [self.link]

    async def complete(self, call) -> ResponseChunk:
        self.calls.append(call)
        return ResponseChunk('{"object": "text_completion"}', 5, 2, "length", True)

    async def embed(self, call) -> ResponseChunk:
        self.calls.append(call)
        return ResponseChunk('{"object": "list"}', 4, 0, None, True)


class RefusingQuotas:
    """Refuses the first `refusals` admissions (429), then admits; remembers settlements."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.settled: list[tuple[str, str, int]] = []

    async def admit(self, tenant: str, lease: str, reserve_tokens: int = 0) -> None:
        if self.refusals:
            self.refusals -= 1
            raise RateLimitError("over", headers={"Retry-After": "1"})

    def settle(self, tenant: str, lease: str, tokens: int) -> None:
        self.settled.append((tenant, lease, tokens))


def test_graph_lines_run_as_the_ingress_does_at_batch_priority_and_record_only_what_ran():
    from servegraph.deployments.batch_graph import GraphLines
    from servegraph.models.config import TenantLimits

    limited = Tenant("team", frozenset({"tiny"}), limits=TenantLimits(max_concurrent=1))
    stages, quotas, records = RecordingStages(), RefusingQuotas(refusals=1), []
    lines = GraphLines(stages, "llm", records.append, quotas)
    request = ClientRequest.of("completion", {"model": "tiny", "prompt": "hello there", "max_tokens": 2})

    async def scenario():
        with pytest.raises(RateLimitError):
            await lines.run(limited, request, "batch_x-1")  # refused at admission: no record
        assert records == []
        chunk = await lines.run(limited, request, "batch_x-1")  # tried again: runs, one record
        with pytest.raises(OpenAIError) as refused:
            await lines.run(Tenant("other", frozenset({"small"})), request, "batch_x-2")
        embedding = ClientRequest.of("embedding", {"model": "tiny", "input": ["a", "b"]})
        assert (await lines.run(limited, embedding, "batch_x-3")).prompt_tokens == 4
        return chunk, refused.value

    chunk, refused = asyncio.run(scenario())
    assert chunk.completion_tokens == 2 and refused.status_code == 403
    assert [call.priority for call in stages.calls] == [PriorityClass.batch.engine_priority] * 2
    assert [call.request.kind for call in stages.calls] == ["completion", "embedding"]
    assert [(r.status, r.tenant, r.prompt_tokens, r.completion_tokens) for r in records] == [
        (200, "team", 5, 2),
        (403, "other", 0, 0),
        (200, "team", 4, 0),
    ]
    assert quotas.settled[1:] == [("team", "cmpl-batch_x-1", 7), ("team", "embd-batch_x-3", 4)]


def test_cli_progress_and_offline_rows():
    from servegraph.graphs.batch_cli import offline_row, progress_line

    batch = {"status": "in_progress", "request_counts": {"total": 10, "completed": 4, "failed": 1}}
    assert progress_line(batch) == f"[{'#' * 15}{'.' * 15}] 5/10 (4 ok, 1 failed) in_progress"
    chat = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3})
    assert offline_row(chat, chat=True) == {"messages": [{"role": "user", "content": "hi"}],
                                            "sampling_params": {"max_tokens": 3}}  # fmt: skip
    completion = json.dumps({"prompt": "hello", "max_tokens": 2, "temperature": 0, "user": "u"})
    assert offline_row(completion, chat=False) == {"prompt": "hello",
                                                   "sampling_params": {"max_tokens": 2, "temperature": 0}}  # fmt: skip
    defaults = {"max_tokens": 256, "temperature": 1.0, "top_p": 1.0}  # every row gets every field: one Arrow schema
    assert offline_row(completion, chat=False, defaults=defaults)["sampling_params"] == {
        "max_tokens": 2, "temperature": 0, "top_p": 1.0}  # fmt: skip


def test_only_one_runner_owns_a_store_at_a_time(tmp_path: Path):
    first, second = BatchStore(tmp_path), BatchStore(tmp_path)
    assert first.try_own() and first.try_own()  # again: still its own
    assert not second.try_own()  # a replacement waits for the runner it replaces
    os.close(first._owner_fd)  # the old runner's process ends
    assert second.try_own()


def test_the_batch_directory_defaults_beside_the_usage_directory(tmp_path: Path):
    from servegraph.models.config import BATCH_DIR_ENV, USAGE_DIR_ENV, UsageConfig

    usage = UsageConfig()
    assert BatchConfig().directory(usage, {}) == Path.home() / ".local/share/servegraph/batches"
    assert BatchConfig().directory(usage, {USAGE_DIR_ENV: str(tmp_path / "usage")}) == tmp_path / "batches"
    assert BatchConfig().directory(usage, {BATCH_DIR_ENV: str(tmp_path / "b")}) == tmp_path / "b"
    assert BatchConfig(dir=str(tmp_path / "c")).directory(usage, {BATCH_DIR_ENV: "/x"}) == tmp_path / "c"


def test_uploads_have_their_own_body_limit_and_other_routes_keep_the_general_one(tmp_path: Path):
    """A 20 KiB file passes where the API's body limit is 8 KiB; a 20 KiB completion does not; a file
    over max_file_bytes is 413."""
    from servegraph.deployments.ingress import build_openai_app
    from servegraph.models.config import RequestLimits

    lines = [request_line(f"line-{i}") for i in range(200)]
    body = jsonl(lines)
    assert 20 << 10 < len(body) < 64 << 10

    async def scenario():
        svc = service(tmp_path, FakeGraph())
        no_stages = SimpleNamespace(request_body_schemas=None)
        limits = RequestLimits(max_body_bytes=8 << 10)
        app = build_openai_app(no_stages, batches=LocalBatchCalls(svc), max_file_bytes=64 << 10, limits=limits)
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        upload = await http.post("/v1/files", files={"file": ("in.jsonl", body)}, data={"purpose": "batch"})
        completion = await http.post("/v1/completions", json={"model": "tiny", "prompt": "x" * (20 << 10)})
        huge = jsonl([*lines, *lines, *lines, *lines])
        too_big = await http.post("/v1/files", files={"file": ("big.jsonl", huge)}, data={"purpose": "batch"})
        return upload, completion, too_big

    upload, completion, too_big = asyncio.run(scenario())
    assert upload.status_code == 200 and upload.json()["bytes"] == len(body), upload.text
    assert completion.status_code == 413 and "8192 bytes" in completion.json()["error"]["message"]
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "invalid_request_error"


def test_the_store_keeps_the_ingress_traffic_weights_for_a_restarted_runner(tmp_path: Path):
    from servegraph.deployments.batch_store import BatchStore

    assert BatchStore(tmp_path).load_traffic() == {}
    BatchStore(tmp_path).save_traffic({"canary": {"v1": 10.0, "v2": 90.0}})
    assert BatchStore(tmp_path).load_traffic() == {"canary": {"v1": 10.0, "v2": 90.0}}
    assert BatchStore(tmp_path).batches() == []  # the weights file is no tenant's folder
