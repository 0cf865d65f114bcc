"""Quotas, priorities and usage metering without Ray: the ledger on a fake clock, the usage
log on a temporary directory, and the HTTP layer over in-process stages."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from servegraph.deployments.admission import take_lease
from servegraph.deployments.auth import Tenant, hash_key
from servegraph.deployments.errors import BadRequestError, RateLimitError
from servegraph.deployments.front_door import TenantDirectory
from servegraph.deployments.ingress import build_openai_app
from servegraph.deployments.postprocess import unreceived_tokens
from servegraph.deployments.quota import LEASE_S, HandleQuotas, LocalQuotas, QuotaLedger
from servegraph.deployments.request_limits import reserved_tokens
from servegraph.deployments.telemetry import RequestRecord, RequestTrace
from servegraph.deployments.usage import SEGMENTS, UsageRecord, read_usage, summarize
from servegraph.deployments.usage_log import UsageLog, recover_orphans
from servegraph.models.config import AuthConfig, TenantLimits, TenantSpec, UsageConfig
from tests.fakes import FakeClock, InProcessStages, ScriptedEngine


def ledger(clock: FakeClock, **limits: int) -> QuotaLedger:
    return QuotaLedger({"a": TenantLimits(**limits)}, clock)


def test_requests_per_minute_slide_and_name_the_limit():
    clock = FakeClock(1000.0)
    quotas = ledger(clock, requests_per_minute=2)
    quotas.admit("a", "r1")
    clock.now += 20
    quotas.admit("a", "r2")
    with pytest.raises(RateLimitError) as refused:
        quotas.admit("a", "r3")
    assert "2 requests per minute" in refused.value.message and refused.value.status_code == 429
    assert refused.value.headers["Retry-After"] == "40"  # when r1 leaves the window
    clock.now += 40
    quotas.admit("a", "r3")


def test_tokens_per_minute_count_settled_tokens():
    clock = FakeClock(1000.0)
    quotas = ledger(clock, tokens_per_minute=100)
    quotas.admit("a", "r1")
    quotas.settle("a", "r1", 70)
    quotas.admit("a", "r2")  # 70 < 100: admitted, and may take the tenant over
    clock.now += 10
    quotas.settle("a", "r2", 50)
    with pytest.raises(RateLimitError, match="100 tokens per minute") as refused:
        quotas.admit("a", "r3")
    assert refused.value.headers["Retry-After"] == "50"  # 120 - 70 = 50 < 100 once r1's tokens leave
    clock.now += 50
    quotas.admit("a", "r3")


def test_concurrency_frees_on_settle_or_lease_expiry():
    clock = FakeClock(1000.0)
    quotas = ledger(clock, max_concurrent=1)
    quotas.admit("a", "r1")
    with pytest.raises(RateLimitError, match="1 concurrent requests"):
        quotas.admit("a", "r2")
    quotas.settle("a", "r1", 5)
    quotas.admit("a", "r2")
    clock.now += 3600  # r2's ingress died: never settled
    quotas.admit("a", "r3")


def test_reservations_stop_concurrent_requests_overdrawing_a_token_limit():
    """The issue's case: 16 requests of 64 prompt + completion tokens at once, against 300 a minute."""
    clock = FakeClock(1000.0)
    quotas = ledger(clock, tokens_per_minute=300)
    admitted = []
    for i in range(16):
        try:
            quotas.admit("a", f"r{i}", reserve_tokens=64)
            admitted.append(i)
        except RateLimitError as refused:
            assert "300 tokens per minute" in refused.message
    assert admitted == [0, 1, 2, 3]  # 4 x 64 = 256; a fifth would reach 320
    for i in admitted:
        quotas.settle("a", f"r{i}", 20)  # each used less than it reserved: 80 in all
    quotas.admit("a", "r16", reserve_tokens=64)  # 80 used + 64 reserved
    with pytest.raises(BadRequestError, match="more than tenant `a`'s limit") as never:
        quotas.admit("a", "huge", reserve_tokens=301)
    assert never.value.status_code == 400 and never.value.code == "request_too_large"


def test_a_reservation_frees_with_its_lease_when_the_ingress_never_settles():
    clock = FakeClock(1000.0)
    quotas = ledger(clock, tokens_per_minute=100)
    quotas.admit("a", "r1", reserve_tokens=90)
    with pytest.raises(RateLimitError):
        quotas.admit("a", "r2", reserve_tokens=20)
    clock.now += LEASE_S
    quotas.admit("a", "r2", reserve_tokens=20)


def test_an_engine_charge_counts_once_and_frees_nothing():
    """What an abandoned request generated counts against the minute; a resent charge does not count twice."""
    clock = FakeClock(1000.0)
    quotas = ledger(clock, tokens_per_minute=100)
    quotas.admit("a", "r1", reserve_tokens=30)
    quotas.settle("a", "r1", 5)  # the ingress knew only the prompt
    quotas.charge("a", "r1-0", 40)
    quotas.charge("a", "r1-0", 40)  # its first reply was lost
    quotas.charge("nobody", "x", 40)  # an unlimited tenant: nothing to count
    assert quotas.snapshot() == {
        "a": {"requests_this_minute": 1, "tokens_this_minute": 45, "reserved_tokens": 0, "in_flight": 0}
    }
    with pytest.raises(RateLimitError):
        quotas.admit("a", "r2", reserve_tokens=60)  # 45 + 60 > 100
    clock.now += 61
    quotas.admit("a", "r2", reserve_tokens=60)


def test_unreceived_tokens_are_those_spelling_only_the_cut_stop_string():
    pieces = {1: "The", 2: " answer", 3: " is", 4: " 4", 5: ".\n", 6: "User", 7: ":"}

    def decode(ids: list[int]) -> str:
        return "".join(pieces[i] for i in ids)

    ids = [1, 2, 3, 4, 5, 6, 7]
    assert unreceived_tokens(decode, ids, "The answer is 4") == 3  # stop ".\nUser:" began on a token
    assert unreceived_tokens(decode, ids, "The answer is 4.") == 2  # stop "\nUser:" began inside ".\n"
    assert unreceived_tokens(decode, ids, decode(ids)) == 0
    assert unreceived_tokens(decode, ids, "") == 7
    assert unreceived_tokens(decode, ids, "The answer is  4") == 0  # decodings disagree: vLLM's count stands


def test_a_token_that_completes_a_character_the_client_received_is_billed():
    """A prefix ending inside a multi-byte character decodes to U+FFFD, as long as the whole
    character: lengths alone would call the completing token unreceived."""
    utf8 = {1: b"x", 2: "\u20ac".encode()[:2], 3: "\u20ac".encode()[2:], 4: b"STOP"}

    def decode(ids: list[int]) -> str:
        return b"".join(utf8[i] for i in ids).decode(errors="replace")

    assert len(decode([1, 2])) == len(decode([1, 2, 3]))  # "x\ufffd" and "x\u20ac"
    assert unreceived_tokens(decode, [1, 2, 3, 4], "x\u20ac") == 1


class FlakyQuota:
    """A Quota handle whose settle_all fails the first `failures` calls, recording what arrives."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[str, str, int]] = []
        self.settle_all = self

    def remote(self, batch):
        async def call():
            if self.failures:
                self.failures -= 1
                raise ConnectionError("quota replica unreachable")
            self.received.extend(batch)

        return call()


def test_settlements_arrive_in_order_and_survive_failed_calls():
    async def run() -> list:
        quota = FlakyQuota(failures=2)
        quotas = HandleQuotas(quota, retry_delays_s=(0, 0, 0))
        for i in range(5):
            quotas.settle("a", f"r{i}", i)
            await asyncio.sleep(0)
        while len(quota.received) < 5:
            await asyncio.sleep(0.01)
        return quota.received

    assert asyncio.run(asyncio.wait_for(run(), 10)) == [("a", f"r{i}", i) for i in range(5)]


def test_reservation_takes_the_largest_max_tokens_alias_and_every_prompt():
    chat = {"messages": [], "max_tokens": 1, "max_completion_tokens": 500}
    assert reserved_tokens(chat, 64) == 500  # vLLM's chat uses max_completion_tokens first
    assert reserved_tokens({"prompt": [[1], [2], [3]], "max_tokens": "10", "n": 2}, 64) == 3 + 10 * 2 * 3


def test_a_request_cancelled_while_admitted_frees_its_slot():
    class SlowAdmit(LocalQuotas):
        async def admit(self, tenant, lease, reserve_tokens=0):
            await super().admit(tenant, lease, reserve_tokens)  # the replica took the slot...
            await asyncio.sleep(3600)  # ...and the reply never came before the client left

    async def run() -> None:
        quotas = SlowAdmit(ledger(FakeClock(1000.0), max_concurrent=1))
        trace = RequestTrace(lambda record: None, "r1", "llm", "tiny", False, tenant="a")
        tenant = Tenant("a", frozenset({"*"}), limits=TenantLimits(max_concurrent=1))
        admitting = asyncio.create_task(take_lease(quotas, tenant, "r1", trace, lambda: 0))
        await asyncio.sleep(0.01)
        admitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admitting
        await LocalQuotas.admit(quotas, "a", "r2")  # the slot is free again

    asyncio.run(run())


def test_reserved_tokens_estimate_the_prompt_and_take_max_tokens_times_n():
    assert reserved_tokens({"prompt": [1, 2, 3], "max_tokens": 10, "n": 2}, 256) == 3 + 20
    assert reserved_tokens({"prompt": "x" * 40}, 256) == 21 + 16  # completions default to 16 tokens
    chat = {"messages": [{"role": "user", "content": "hello"}]}
    assert reserved_tokens(chat, 64) == (4 // 2 + 1) + (5 // 2 + 1) + 64


def record(request_id: str, status: int = 200, tenant: str = "a", model: str = "tiny") -> RequestRecord:
    return RequestRecord(request_id, "llm", model, "v1", status, False, 0.5, tenant, f"{model}@v1", 7, 3)


def usage_config(**changes) -> UsageConfig:
    return UsageConfig(**changes)


def poll_until(check, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def segments(directory) -> list:
    return list((directory / SEGMENTS).glob("*.jsonl"))


def parts(directory) -> list:
    return sorted(directory.glob("day=*/usage-*.parquet"))


def test_usage_log_rotates_by_size_and_reads_every_record_once(tmp_path):
    log = UsageLog(usage_config(rotate_bytes=1024), "w1", tmp_path)
    for i in range(20):
        log.write(UsageRecord.of(record(f"r{i}", status=200 if i % 5 else 500)))
    poll_until(lambda: parts(tmp_path), "a segment past rotate_bytes to become Parquet")
    log.close()
    tail = UsageLog(usage_config(), "w2", tmp_path)
    for i in range(20, 22):
        tail.write(UsageRecord.of(record(f"r{i}", status=200 if i % 5 else 500)))
    assert segments(tmp_path), "the rest is still in the open segment"
    table = read_usage(tmp_path)
    assert sorted(table["request_id"].to_pylist()) == sorted(f"r{i}" for i in range(22))
    tail.close()
    assert not segments(tmp_path)
    assert read_usage(tmp_path).num_rows == 22
    (day,) = summarize(read_usage(tmp_path)).data
    assert (day.requests, day.succeeded, day.failed, day.prompt_tokens, day.total_tokens) == (22, 17, 5, 154, 220)


def test_usage_log_rotates_by_age(tmp_path):
    log = UsageLog(usage_config(rotate_interval_s=0.2), "w1", tmp_path)
    log.write(UsageRecord.of(record("r1")))
    poll_until(lambda: parts(tmp_path), "the rotation thread to rotate an old segment")
    log.close()
    assert pq.read_table(parts(tmp_path)[0])["request_id"].to_pylist() == ["r1"]


def write_and_die(directory: str) -> None:
    log = UsageLog(usage_config(), "dead", Path(directory))
    for i in range(3):
        log.write(UsageRecord.of(record(f"d{i}")))
    os._exit(0)  # no close(), no rotation: as a killed replica


def test_a_dead_writers_segment_is_recovered_not_lost(tmp_path):
    process = multiprocessing.get_context("spawn").Process(target=write_and_die, args=(str(tmp_path),))
    process.start()
    process.join(60)
    live = UsageLog(usage_config(), "live", tmp_path)
    live.write(UsageRecord.of(record("l1")))
    assert recover_orphans(tmp_path) == 0, "the dead writer's heartbeat is still fresh"
    long_ago = time.time() - 3600
    for path in [*(tmp_path / SEGMENTS).glob("dead-*"), *(tmp_path / "writers").glob("dead-*")]:
        os.utime(path, (long_ago, long_ago))  # as if it died an hour ago
    poll_until(lambda: not list((tmp_path / SEGMENTS).glob("dead-*.jsonl")), "the live writer to convert the orphan")
    assert recover_orphans(tmp_path) == 0, "a live writer's open segment is never taken"
    assert sorted(read_usage(tmp_path)["request_id"].to_pylist()) == ["d0", "d1", "d2", "l1"]
    live.close()


def test_torn_line_is_skipped(tmp_path):
    (tmp_path / SEGMENTS).mkdir()
    line = json.dumps(UsageRecord.of(record("ok")).__dict__)
    (tmp_path / SEGMENTS / "x-000001.jsonl").write_text(line + "\n" + line[:20])
    assert read_usage(tmp_path)["request_id"].to_pylist() == ["ok"]


def test_summary_by_tenant_model_and_day(tmp_path):
    log = UsageLog(usage_config(), "w", tmp_path)
    day1 = datetime(2026, 11, 20, 23, 59, tzinfo=UTC).timestamp()
    day2 = datetime(2026, 11, 21, 0, 1, tzinfo=UTC).timestamp()
    for rid, when, status, tenant in [("1", day1, 200, "a"), ("2", day2, 499, "a"), ("3", day2, 200, "b")]:
        log.write(UsageRecord.of(record(rid, status, tenant), now=when))
    table = read_usage(tmp_path)
    days = summarize(table, tenant="a").data
    assert [(d.day, d.requests, d.cancelled) for d in days] == [(date(2026, 11, 20), 1, 0), (date(2026, 11, 21), 1, 1)]
    assert [d.tenant for d in summarize(table, since=date(2026, 11, 21)).data] == ["a", "b"]
    log.close()


KEYS = {"a": "sk-a", "b": "sk-b", "ops": "sk-ops"}


@pytest.fixture
def tenant_client(tiny_spec, frontend_for, tmp_path):
    specs = [
        TenantSpec(name="a", key_hashes=[hash_key("sk-a")], limits=TenantLimits(requests_per_minute=2)),
        TenantSpec(name="b", key_hashes=[hash_key("sk-b")], priority="batch"),
        TenantSpec(name="ops", key_hashes=[hash_key("sk-ops")], admin=True),
    ]
    engine = PriorityRecorder()
    stages = InProcessStages([tiny_spec], frontend_for, {"engine-tiny-v1": engine})
    log = UsageLog(usage_config(), "w", tmp_path)
    app = build_openai_app(
        stages,
        observe=lambda r: log.write(UsageRecord.of(r)),
        tenants=TenantDirectory(AuthConfig(tenants=specs)),
        quotas=LocalQuotas(QuotaLedger({"a": specs[0].limits})),
        usage_dir=tmp_path,
    )
    yield TestClient(app, raise_server_exceptions=False), engine
    log.close()


class PriorityRecorder(ScriptedEngine):
    def __init__(self) -> None:
        super().__init__()
        self.priorities: list[int] = []

    async def generate(self, requests):
        self.priorities += [request.priority for request in requests]
        async for chunk in super().generate(requests):
            yield chunk


def complete(client: TestClient, tenant: str):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    return client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEYS[tenant]}"})


def test_over_quota_is_429_with_retry_after_and_metered(tenant_client):
    client, _ = tenant_client
    assert [complete(client, "a").status_code for _ in range(3)] == [200, 200, 429]
    refused = complete(client, "a")
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "requests per minute" in refused.json()["error"]["message"] and int(refused.headers["retry-after"]) > 0
    usage = client.get("/v1/usage", headers={"Authorization": "Bearer sk-a"}).json()["data"]
    assert [(d["tenant"], d["requests"], d["succeeded"], d["failed"]) for d in usage] == [("a", 4, 2, 2)]


def test_priority_class_reaches_the_engine(tenant_client):
    client, engine = tenant_client
    complete(client, "a")
    complete(client, "b")
    assert engine.priorities == [0, 10]


def test_usage_is_own_unless_admin(tenant_client):
    client, _ = tenant_client
    complete(client, "a")
    complete(client, "b")
    own = client.get("/v1/usage", headers={"Authorization": "Bearer sk-b"}).json()["data"]
    assert [d["tenant"] for d in own] == ["b"]
    other = client.get("/v1/usage", params={"tenant": "a"}, headers={"Authorization": "Bearer sk-b"})
    assert other.status_code == 403 and other.json()["error"]["code"] == "admin_required"
    every = client.get("/v1/usage", headers={"Authorization": "Bearer sk-ops"}).json()["data"]
    assert sorted(d["tenant"] for d in every) == ["a", "b"]
    assert client.get("/v1/usage").status_code == 401


def test_usage_report_command(tmp_path, capsys):
    from servegraph.graphs.cli import main

    log = UsageLog(usage_config(), "w", tmp_path)
    for rid, tenant in [("1", "a"), ("2", "a"), ("3", "b")]:
        log.write(UsageRecord.of(record(rid, tenant=tenant)))
    assert main(["usage", "--dir", str(tmp_path), "--tenant", "a"]) == 0
    header, row, total = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["day", "tenant", "model", "requests"]
    assert row.split()[1:4] == ["a", "tiny", "2"] and total.split()[:2] == ["total", "2"]
    log.close()


def test_usage_query_errors_and_refused_bodies(tenant_client, tiny_spec, frontend_for):
    client, _ = tenant_client
    ops = {"Authorization": "Bearer sk-ops"}
    bad_day = client.get("/v1/usage", params={"start": "yesterday"}, headers=ops)
    assert bad_day.status_code == 400 and bad_day.json()["error"]["param"] == "query.start"
    not_json = client.post("/v1/completions", content=b"{", headers={**ops, "Content-Type": "application/json"})
    assert not_json.status_code == 400
    refused = client.get("/v1/usage", headers=ops).json()["data"]
    # The bad query was refused before a handler ran, the bad body after it began: both after the key.
    assert sorted((d["tenant"], d["failed"]) for d in refused) == [("ops", 2)]
    stages = InProcessStages([tiny_spec], frontend_for, {"engine-tiny-v1": ScriptedEngine()})
    without_records = TestClient(build_openai_app(stages)).get("/v1/usage")
    assert without_records.status_code == 404 and without_records.json()["error"]["code"] == "not_found"
