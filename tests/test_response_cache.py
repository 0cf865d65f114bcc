"""The ingress's response cache without Ray or vLLM: keys, LRU by bytes, TTL, invalidation,
stream recording, usage records, and the HTTP hook over a counting fake of the graph."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from servegraph.deployments.auth import hash_key
from servegraph.deployments.front_door import TenantDirectory
from servegraph.deployments.ingress import build_openai_app
from servegraph.deployments.messages import GenerationCall, ModelRoute, ResponseChunk
from servegraph.deployments.protocol import ClientRequest, ModelList
from servegraph.deployments.response_cache import (
    CACHE_HEADER,
    CachedResponse,
    CachePlan,
    IngressResponseCache,
    ResponseCache,
    StreamRecorder,
    cache_directives,
    cache_key,
    changed_models,
    is_deterministic,
)
from servegraph.deployments.router import Link
from servegraph.deployments.telemetry import RequestRecord
from servegraph.deployments.usage import USAGE_SCHEMA, UsageRecord, read_usage, records_table
from servegraph.models.config import AuthConfig, LLMAppArgs, ResponseCacheConfig, TenantSpec
from servegraph.models.spec import CircuitBreakerConfig
from tests.fakes import FakeClock

V1 = ModelRoute(model="tiny", version="v1", engine="engine-tiny-v1", default_max_tokens=16)
V2 = ModelRoute(model="tiny", version="v2", engine="engine-tiny-v2", default_max_tokens=16)
GREEDY = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}


class RecordingListener:
    """Every event the cache reports, in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.size: tuple[int, int] = (0, 0)

    def hit(self, model: str, tenant: str) -> None:
        self.events.append(("hit", model, tenant))

    def miss(self, model: str, tenant: str) -> None:
        self.events.append(("miss", model, tenant))

    def evicted(self, model: str, reason: str) -> None:
        self.events.append(("evicted", model, reason))

    def resized(self, nbytes: int, entries: int) -> None:
        self.size = (nbytes, entries)


def completion(body: dict | None = None, kind: str = "completion") -> ClientRequest:
    return ClientRequest.of(kind, {**GREEDY, **(body or {})})


@pytest.mark.parametrize(
    "header, expected",
    [
        (None, (True, True)),
        ("", (True, True)),
        ("max-age=60", (True, True)),
        ("no-cache", (False, True)),
        ("No-Cache, max-age=0", (False, True)),
        ("no-store", (False, False)),
        ("private, no-store", (False, False)),
    ],
)
def test_cache_control_no_cache_skips_reading_and_no_store_both(header, expected):
    assert cache_directives(header) == expected


@pytest.mark.parametrize(
    "body, deterministic",
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0, "n": 1}, True),
        ({"seed": 7, "temperature": 0.9}, True),
        ({"seed": 0}, True),
        ({}, False),  # the model's default temperature is not 0
        ({"temperature": 0.7}, False),
        ({"temperature": "0"}, False),
        ({"temperature": False}, False),
        ({"seed": True}, False),
        ({"seed": "7"}, False),
        ({"temperature": 0, "n": 2}, False),
        ({"seed": None}, False),
    ],
)
def test_only_deterministic_single_choice_requests_are_cacheable(body, deterministic):
    assert is_deterministic({"model": "tiny", "prompt": "Hi", **body}) is deterministic


def test_key_covers_tenant_version_endpoint_stream_and_every_output_field():
    key = cache_key("a", V1, completion())
    others = [
        cache_key("b", V1, completion()),
        cache_key("a", V2, completion()),
        cache_key("a", V1, completion(kind="chat")),
        cache_key("a", V1, completion({"stream": True})),
        cache_key("a", V1, completion({"max_tokens": 5})),
        cache_key("a", V1, completion({"stop": ["x"]})),
        cache_key("a", V1, completion({"model": "tiny-alias"})),
        cache_key("a", V1, completion({"stream": True, "stream_options": {"include_usage": True}})),
    ]
    assert len({key, *others}) == len(others) + 1


def test_key_ignores_user_nulls_key_order_and_an_explicit_stream_false():
    key = cache_key("a", V1, completion())
    reordered = ClientRequest.of("completion", dict(reversed(list(GREEDY.items()))))
    same = [
        cache_key("a", V1, completion({"user": "someone"})),
        cache_key("a", V1, completion({"seed": None, "logprobs": None})),
        cache_key("a", V1, completion({"stream": False})),
        cache_key("a", V1, reordered),
    ]
    assert set(same) == {key}


def plan(key: str, model: str = "tiny", read: bool = True, write: bool = True, generation: int = 0) -> CachePlan:
    return CachePlan(key, model, "t", read, write, generation)


def entry(model: str = "tiny", size: int = 100, stored_at: float = 0.0) -> CachedResponse:
    last = ResponseChunk("x" * size, 3, 4, "length", finished=True)
    return CachedResponse.of(model, [last.data], "cmpl-old", last, "", stored_at)


def test_lru_by_bytes_evicts_least_recently_used_first():
    listener = RecordingListener()
    one = entry()
    cache = ResponseCache(3 * one.nbytes, one.nbytes, ttl_s=60, listener=listener, clock=FakeClock())
    for key in "abc":
        assert cache.put(plan(key), entry())
    assert cache.get(plan("a")) is not None  # a is now the most recently used
    assert cache.put(plan("d"), entry())
    assert cache.get(plan("b")) is None and cache.get(plan("a")) is not None
    assert ("evicted", "tiny", "size") in listener.events
    assert cache.nbytes == 3 * one.nbytes and listener.size == (3 * one.nbytes, 3)


def test_an_entry_over_the_entry_limit_is_never_stored():
    cache = ResponseCache(max_bytes=10_000, max_entry_bytes=500, ttl_s=60)
    assert not cache.put(plan("big"), entry(size=1_000))
    assert cache.get(plan("big")) is None and cache.nbytes == 0


def test_expired_entries_are_not_returned_and_count_as_evictions():
    clock, listener = FakeClock(), RecordingListener()
    cache = ResponseCache(max_bytes=10_000, max_entry_bytes=1_000, ttl_s=30, listener=listener, clock=clock)
    cache.put(plan("a"), entry(stored_at=clock()))
    clock.now = 30
    assert cache.get(plan("a")) is not None
    clock.now = 30.5
    assert cache.get(plan("a")) is None
    assert listener.events[-2:] == [("evicted", "tiny", "expired"), ("miss", "tiny", "t")]
    assert len(cache) == 0 and cache.nbytes == 0


def test_invalidating_a_model_drops_only_its_entries_and_refuses_stores_planned_before():
    cache = ResponseCache(max_bytes=10_000, max_entry_bytes=1_000, ttl_s=60, clock=FakeClock())
    cache.put(plan("t1", "tiny"), entry("tiny"))
    cache.put(plan("s1", "small"), entry("small"))
    planned_before = plan("t2", "tiny", generation=cache.generation("tiny"))
    assert cache.invalidate("tiny") == 1
    assert cache.get(plan("t1", "tiny")) is None and cache.get(plan("s1", "small")) is not None
    assert not cache.put(planned_before, entry("tiny"))  # a request in flight across the change
    assert cache.put(plan("t2", "tiny", generation=cache.generation("tiny")), entry("tiny"))


def test_no_cache_reads_nothing_and_no_store_writes_nothing():
    listener = RecordingListener()
    cache = ResponseCache(max_bytes=10_000, max_entry_bytes=1_000, ttl_s=60, listener=listener)
    assert not cache.put(plan("a", write=False), entry())
    cache.put(plan("a"), entry())
    assert cache.get(plan("a", read=False)) is None
    assert listener.events == [("miss", "tiny", "t")]


def test_traffic_changes_name_only_models_whose_weights_moved():
    before = {"canary": {"v1": 100}, "other": {"v1": 50, "v2": 50}}
    after = {"canary": {"v1": 90, "v2": 10}, "other": {"v1": 50.0, "v2": 50.0}, "new": {"v1": 1}}
    assert changed_models(before, after) == {"canary", "new"}


def ingress_cache(**config) -> IngressResponseCache:
    return IngressResponseCache(ResponseCacheConfig(enabled=True, **config))


def test_plans_only_for_listed_tenants_local_models_and_deterministic_bodies():
    cache = ingress_cache(tenants=["a"])
    assert cache.plan("a", completion(), V1, None) is not None
    assert cache.plan("b", completion(), V1, None) is None
    assert cache.plan("a", completion({"temperature": 1}), V1, None) is None
    assert cache.plan("a", completion(), object(), None) is None  # an upstream
    assert cache.plan("a", completion(), V1, "no-store") == CachePlan(
        cache_key("a", V1, completion()), "tiny", "a", False, False, 0
    )


def test_replay_carries_the_new_response_id_and_usage_only_when_hits_are_billed():
    events = ['data: {"id": "cmpl-old", "n": 1}\n\n', 'data: {"id": "cmpl-old", "n": 2}\n\n', "data: [DONE]\n\n"]
    last = ResponseChunk(events[-1], 5, 7, "stop", finished=True)
    stored = CachedResponse.of("tiny", events, "cmpl-old", last, "", 0.0)
    billed = stored.chunks("cmpl-new", billed=True)
    assert [chunk.data for chunk in billed] == [event.replace("cmpl-old", "cmpl-new") for event in events]
    assert (billed[-1].prompt_tokens, billed[-1].completion_tokens, billed[-1].finished) == (5, 7, True)
    free = stored.chunks("cmpl-new", billed=False)[-1]
    assert (free.prompt_tokens, free.completion_tokens) == (0, 0)


def test_a_stream_is_stored_only_when_it_completes_without_an_error_and_within_the_limit():
    cache = ingress_cache(max_entry_bytes=1_000)
    chunks = [ResponseChunk("data: 1\n\n", 0, 0), ResponseChunk("data: [DONE]\n\n", 3, 1, "stop", finished=True)]

    def recorded(key: str, last: ResponseChunk, limit: int = 1_000) -> bool:
        recorder = StreamRecorder(cache, plan(key), "cmpl-1", limit)
        for chunk in [*chunks[:-1], last]:
            recorder.add(chunk)
        return recorder.complete(last)

    assert recorded("ok", chunks[-1])
    errored = ResponseChunk("data: {}\n\n", 3, 1, finished=True, error_status=504)
    assert not recorded("error", errored)
    assert not recorded("unfinished", ResponseChunk("data: 2\n\n", 3, 1))
    assert not recorded("long", chunks[-1], limit=10)
    stored = cache.lookup(plan("ok"))
    assert stored is not None and stored.events == tuple(chunk.data for chunk in chunks)
    assert all(cache.lookup(plan(key)) is None for key in ("error", "unfinished", "long"))


def test_config_is_off_by_default_and_names_only_declared_tenants():
    assert not ResponseCacheConfig().enabled
    models = [{"name": "tiny", "path": "/models/tiny"}]
    auth = AuthConfig(tenants=[TenantSpec(name="a", key_hashes=[hash_key("sk-a")])])
    LLMAppArgs(models=models, auth=auth, response_cache={"enabled": True, "tenants": ["a"]})
    with pytest.raises(ValueError, match="does not declare"):
        LLMAppArgs(models=models, auth=auth, response_cache={"tenants": ["nobody"]})
    LLMAppArgs(models=models, auth={"enabled": False}, response_cache={"tenants": ["default"]})
    with pytest.raises(ValueError, match="max_entry_bytes"):
        ResponseCacheConfig(max_bytes=4096, max_entry_bytes=8192)


def test_usage_records_say_cached_and_parts_written_before_the_column_read_as_not_cached(tmp_path):
    record = RequestRecord("r1", "llm", "tiny", "v1", 200, False, 0.1, tenant="a", prompt_tokens=2, cached=True)
    assert UsageRecord.of(record).cached
    old_schema = pa.schema([field for field in USAGE_SCHEMA if field.name != "cached"])
    row = {**UsageRecord.of(record, now=1_700_000_000).__dict__}
    del row["cached"]
    old = records_table([row]).drop_columns(["cached"]).cast(old_schema)
    day = tmp_path / "day=2023-11-14"
    day.mkdir()
    pq.write_table(old, day / "usage-old.parquet")
    table = read_usage(tmp_path)
    assert table.column("cached").to_pylist() == [False] and table.column("prompt_tokens").to_pylist() == [2]


# The HTTP hook: build_openai_app over a graph that counts the calls reaching it.


class CountingStages:
    """One local model, `tiny` (versions by a mutable route); answers carry the response id and a call count."""

    def __init__(self) -> None:
        self.route = V1
        self.calls = 0
        self.fail_stream_after: int | None = None

    async def chain(self, model: str, session_key: str | None) -> list[Link]:
        return [Link(self.route, CircuitBreakerConfig())]

    def _body(self, call: GenerationCall) -> dict:
        self.calls += 1
        return {"id": call.request_id, "model": call.request.model, "calls": self.calls}

    async def complete(self, call: GenerationCall) -> ResponseChunk:
        return ResponseChunk(json.dumps(self._body(call)), 3, 4, "length", finished=True)

    async def stream(self, call: GenerationCall) -> AsyncIterator[ResponseChunk]:
        body = self._body(call)
        for index in range(3):
            if self.fail_stream_after == index:
                raise RuntimeError("engine died")
            yield ResponseChunk(f"data: {json.dumps({**body, 'index': index})}\n\n", 3, index + 1)
        yield ResponseChunk("data: [DONE]\n\n", 3, 3, "length", finished=True)

    async def model_list(self) -> ModelList:
        return ModelList(data=[])

    async def request_body_schemas(self) -> dict:
        return {"bodies": {}, "components": {}}


KEYS = {"a": "sk-cache-a", "b": "sk-cache-b", "off": "sk-cache-off"}


@pytest.fixture
def stages() -> CountingStages:
    return CountingStages()


@pytest.fixture
def records() -> list[RequestRecord]:
    return []


def http_client(
    stages: CountingStages, records: list[RequestRecord], **config
) -> tuple[TestClient, IngressResponseCache]:
    cache = ingress_cache(**{"tenants": ["a", "b"], **config})
    auth = AuthConfig(tenants=[TenantSpec(name=name, key_hashes=[hash_key(key)]) for name, key in KEYS.items()])
    app = build_openai_app(stages, observe=records.append, tenants=TenantDirectory(auth), response_cache=cache)
    return TestClient(app, raise_server_exceptions=False), cache


def post(client: TestClient, tenant: str, body: dict | None = None, **headers: str):
    headers = {"Authorization": f"Bearer {KEYS[tenant]}", **headers}
    return client.post("/v1/completions", json={**GREEDY, **(body or {})}, headers=headers)


def test_a_repeated_deterministic_request_is_answered_from_the_cache_under_its_own_id(stages, records):
    client, _ = http_client(stages, records)
    first, second = post(client, "a"), post(client, "a")
    assert (first.headers[CACHE_HEADER], second.headers[CACHE_HEADER]) == ("miss", "hit")
    assert stages.calls == 1 and "age" in second.headers and "age" not in first.headers
    assert second.json()["calls"] == 1 and second.json()["id"] != first.json()["id"]
    assert second.json()["id"].startswith("cmpl-")
    assert [r.cached for r in records] == [False, True]
    assert (records[1].prompt_tokens, records[1].completion_tokens, records[1].status) == (3, 4, 200)


def test_hits_are_recorded_with_zero_tokens_when_not_billed(stages, records):
    client, _ = http_client(stages, records, bill_hits=False)
    post(client, "a"), post(client, "a")
    assert [(r.cached, r.prompt_tokens + r.completion_tokens) for r in records] == [(False, 7), (True, 0)]


def test_tenants_never_share_entries_and_unlisted_tenants_are_not_cached(stages, records):
    client, _ = http_client(stages, records)
    post(client, "a")
    assert post(client, "b").headers[CACHE_HEADER] == "miss"
    off = [post(client, "off"), post(client, "off")]
    assert all(CACHE_HEADER not in response.headers for response in off)
    assert stages.calls == 4


def test_cache_control_and_non_deterministic_requests_go_to_the_engine(stages, records):
    client, _ = http_client(stages, records)
    post(client, "a")
    assert post(client, "a", **{"Cache-Control": "no-cache"}).headers[CACHE_HEADER] == "miss"
    assert post(client, "a").json()["calls"] == 2  # no-cache stored its fresh answer
    post(client, "a", {"max_tokens": 9}, **{"Cache-Control": "no-store"})
    assert post(client, "a", {"max_tokens": 9}).headers[CACHE_HEADER] == "miss"  # no-store kept nothing
    sampled = [post(client, "a", {"temperature": 0.8}) for _ in range(2)]
    assert [CACHE_HEADER in r.headers for r in sampled] == [False, False] and stages.calls == 6


def test_a_stream_replays_as_the_same_sse_events_and_a_failed_stream_is_not_stored(stages, records):
    client, _ = http_client(stages, records)
    first, second = (post(client, "a", {"stream": True}) for _ in range(2))
    assert second.headers[CACHE_HEADER] == "hit" and second.headers["content-type"].startswith("text/event-stream")
    first_id, second_id = (json.loads(r.text.split("\n\n")[0].removeprefix("data: "))["id"] for r in (first, second))
    assert second.text == first.text.replace(first_id, second_id) and stages.calls == 1
    assert post(client, "a").headers[CACHE_HEADER] == "miss"  # a body never stands in for a stream, nor back
    stages.fail_stream_after = 1
    broken = post(client, "a", {"stream": True, "max_tokens": 7})
    assert "error" in broken.text
    stages.fail_stream_after = None
    assert post(client, "a", {"stream": True, "max_tokens": 7}).headers[CACHE_HEADER] == "miss"


def test_a_new_version_or_a_traffic_change_returns_no_earlier_answer(stages, records):
    client, cache = http_client(stages, records)
    post(client, "a")
    stages.route = V2  # the split now picks v2: its own entries
    assert post(client, "a").headers[CACHE_HEADER] == "miss"
    stages.route = V1
    assert post(client, "a").headers[CACHE_HEADER] == "hit"
    assert cache.traffic_changed({}, {"tiny": {"v1": 100}}) == {"tiny"}
    assert post(client, "a").headers[CACHE_HEADER] == "miss"


class BrokenListener(RecordingListener):
    def resized(self, nbytes: int, entries: int) -> None:
        raise RuntimeError("metrics backend down")


def test_a_failing_store_never_fails_the_request_it_came_from(stages, records):
    cache = IngressResponseCache(ResponseCacheConfig(enabled=True), BrokenListener())
    auth = AuthConfig(tenants=[TenantSpec(name="a", key_hashes=[hash_key(KEYS["a"])])])
    app = build_openai_app(stages, observe=records.append, tenants=TenantDirectory(auth), response_cache=cache)
    client = TestClient(app, raise_server_exceptions=False)
    for body in ({}, {"stream": True}):
        response = post(client, "a", body)
        assert response.status_code == 200 and "error" not in response.text
    assert [r.status for r in records] == [200, 200]
