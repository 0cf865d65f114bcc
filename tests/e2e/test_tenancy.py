"""Quotas, priorities, fairness and usage metering on the real graph (conftest's `limits` app:
two ingress replicas, one quota replica, real vLLM engines)."""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections import Counter

import httpx
import openai
import pytest
import ray

from servegraph.deployments.quota import WINDOW_S as QUOTA_WINDOW_S
from servegraph.deployments.usage import SEGMENTS, read_usage
from tests.e2e.conftest import ALPHA_KEY, BETA_KEY, TENANT_KEYS, BackgroundLoad, poll

ALPHA = {"Authorization": f"Bearer {ALPHA_KEY}"}


def headers(tenant: str, request_id: str | None = None) -> dict[str, str]:
    extra = {"X-Request-Id": request_id} if request_id else {}
    return {"Authorization": f"Bearer {TENANT_KEYS[tenant]}", **extra}


def url(graph, path: str = "/completions") -> str:
    return f"{graph.base_url}/limits/v1{path}"


def body(max_tokens: int, model: str = "shared", **extra) -> dict:
    return {"model": model, "prompt": "Tell me a story", "max_tokens": max_tokens, "ignore_eos": True, **extra}


def running_replicas(graph, deployment: str) -> list[dict]:
    replicas = graph.cluster.applications()["limits"]["deployments"][deployment]["replicas"]
    return [replica for replica in replicas if replica["state"] == "RUNNING"]


def timed_post(graph, tenant: str, request_id: str | None = None) -> tuple[int, float]:
    """One 1-token request on a new connection (the proxy spreads those over both ingress replicas)."""
    started = time.monotonic()
    response = httpx.post(url(graph), json=body(1), headers=headers(tenant, request_id), timeout=60)
    return response.status_code, time.monotonic() - started


def test_request_limit_holds_across_two_ingress_replicas(graph):
    assert len(running_replicas(graph, "ingress")) == 2 and len(running_replicas(graph, "router")) == 2
    prefix = f"metered-{uuid.uuid4().hex[:6]}"
    unlimited = [timed_post(graph, "calm")[1] for _ in range(6)]
    outcomes = [timed_post(graph, "metered", f"{prefix}-{i}") for i in range(10)]
    statuses = [status for status, _ in outcomes]
    assert statuses == [200] * 6 + [429] * 4, statuses
    limited = [seconds for _, seconds in outcomes[:6]]
    print(  # noqa: T201
        f"quota admission: 1-token request median {statistics.median(limited) * 1000:.1f} ms with limits, "
        f"{statistics.median(unlimited) * 1000:.1f} ms without"
    )
    client = openai.OpenAI(base_url=url(graph, ""), api_key=TENANT_KEYS["metered"], max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        client.completions.create(model="shared", prompt="Hi", max_tokens=1)
    error = refused.value.body
    assert error["code"] == "rate_limit_exceeded" and "6 requests per minute" in error["message"], error
    assert 0 < int(refused.value.response.headers["retry-after"]) <= 60

    def replicas_that_served() -> set[str] | None:
        logs = graph.logs_dir / "serve"
        served = {log.name for log in logs.glob("replica_limits_ingress_*.log") if prefix in log.read_text()}
        return served if len(served) == 2 else None

    poll(replicas_that_served, 30, "both ingress replicas to have logged requests of the tenant")


def test_token_limit_counts_prompt_and_completion_tokens(graph):
    """60 a minute; each request reserves its prompt (estimated high: 8) and 20 tokens, then settles what it used."""
    statuses, used = [], 0
    for _ in range(3):
        response = httpx.post(url(graph), json=body(20), headers=headers("tokens"), timeout=60)
        statuses.append(response.status_code)
        if response.status_code == 200:
            used += response.json()["usage"]["total_tokens"]
    # used + reserved: 0 + 28, then about 25 + 28, then about 50 + 28 > 60
    assert statuses == [200, 200, 429] and 40 <= used <= 60, (statuses, used)
    assert "60 tokens per minute" in response.json()["error"]["message"]
    alone = httpx.post(url(graph), json=body(61), headers=headers("tokens"), timeout=60)
    assert alone.status_code == 400 and alone.json()["error"]["code"] == "request_too_large"  # never admissible


def test_concurrent_requests_cannot_overdraw_a_token_limit(graph):
    """The issue's measurement: many requests at once against a small token limit (100 a minute)."""
    statuses: list[int] = []

    def send() -> None:
        response = httpx.post(url(graph), json=body(20), headers=headers("burst"), timeout=120)
        statuses.append(response.status_code)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # each reserves 28 tokens: three fit in 100, a fourth would not, however many run at once
    assert sorted(statuses) == [200] * 3 + [429] * 5, statuses


def test_quota_holds_when_every_ingress_replica_that_admitted_is_replaced(graph):
    """The counters live in the quota replica, not the ingress: fresh ingress replicas still refuse."""
    assert [timed_post(graph, "steady")[0] for _ in range(3)] == [200] * 3
    spent_at = time.monotonic()
    victims = running_replicas(graph, "ingress")
    for victim in victims:
        ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
    killed = {victim["replica_id"] for victim in victims}

    def replaced() -> bool:
        ids = {replica["replica_id"] for replica in running_replicas(graph, "ingress")}
        return len(ids) == 2 and not ids & killed

    poll(replaced, QUOTA_WINDOW_S - 15, "Serve to replace both ingress replicas within the quota's minute")
    assert timed_post(graph, "steady")[0] == 429
    assert time.monotonic() - spent_at < QUOTA_WINDOW_S  # still inside the minute the 3 requests were counted in


def test_concurrency_limit_refuses_a_second_request_in_flight(graph):
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", url(graph), json=body(400, stream=True), headers=headers("single")) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # the first request is running
            second = client.post(url(graph), json=body(1), headers=headers("single"))
            assert second.status_code == 429 and "1 concurrent requests" in second.json()["error"]["message"]
        # the stream was cancelled: once the ingress notices, the slot is free again
        poll(lambda: client.post(url(graph), json=body(1), headers=headers("single")).status_code == 200, 60,
             "the cancelled request's slot to free")  # fmt: skip


def engine_unfinished(graph) -> int:
    stats = httpx.get(f"{graph.base_url}/limits-admin/engines", headers=ALPHA, timeout=10).json()
    return stats["engine-shared-v1"]["unfinished"]


def request_in_thread(graph, tenant: str, max_tokens: int, finished: list[tuple[str, int]], name: str):
    """Sends one request on its own thread; finished gets (name, status) in the order they end."""

    def run() -> None:
        response = httpx.post(url(graph), json=body(max_tokens), headers=headers(tenant), timeout=300)
        finished.append((name, response.status_code))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_interactive_tenant_jumps_the_batch_queue(graph):
    """shared runs one sequence at a time: a long batch request holds it, three more batch
    requests queue behind it, then one interactive request arrives."""
    poll(lambda: engine_unfinished(graph) == 0, 120, "the shared engine to be idle")
    finished: list[tuple[str, int]] = []
    threads = [request_in_thread(graph, "batchy", 400, finished, "batch-long")]
    poll(lambda: engine_unfinished(graph) == 1, 60, "the long batch request to run")
    threads += [request_in_thread(graph, "batchy", 16, finished, f"batch-{i}") for i in range(3)]
    poll(lambda: engine_unfinished(graph) == 4, 60, "three batch requests queued behind it")
    threads.append(request_in_thread(graph, "calm", 16, finished, "interactive"))
    for thread in threads:
        thread.join()
    order = [name for name, _ in finished]
    print(f"finish order under priority scheduling: {order}")  # noqa: T201
    assert {status for _, status in finished} == {200}, finished
    assert engine_unfinished(graph) == 0
    # First come, first served would finish it last; priority puts it before every queued batch request.
    assert order[:2] == ["batch-long", "interactive"], order


class Flood(BackgroundLoad):
    """A tenant sending far more than its share: 8 threads back to back against its limit of 3."""

    def __init__(self, graph) -> None:
        super().__init__(threads=8)
        self._url = url(graph)
        self.statuses: list[int] = []

    def _run(self, index: int) -> None:
        with httpx.Client(timeout=300) as client:
            while not self._stop.is_set():
                self.statuses.append(client.post(self._url, json=body(32), headers=headers("flood")).status_code)


CALM_BOUND_S = 20.0


def test_a_flooding_tenant_does_not_starve_another(graph):
    def calm_latencies(n: int) -> list[float]:
        latencies = []
        for _ in range(n):
            started = time.monotonic()
            response = httpx.post(url(graph), json=body(16), headers=headers("calm"), timeout=120)
            assert response.status_code == 200, response.text
            latencies.append(time.monotonic() - started)
        return latencies

    alone = calm_latencies(3)
    with Flood(graph) as flood:
        poll(lambda: Counter(flood.statuses)[429] >= 10, 120, "the flood to hit its limit")
        flooded = calm_latencies(5)
    counts = Counter(flood.statuses)
    print(  # noqa: T201
        f"fairness: calm alone median {statistics.median(alone):.2f} s; under flood median "
        f"{statistics.median(flooded):.2f} s, max {max(flooded):.2f} s (bound {CALM_BOUND_S:g} s); flood {dict(counts)}"
    )
    assert counts[200] >= 1 and counts[429] >= 10 and set(counts) <= {200, 429}, counts
    assert max(flooded) < CALM_BOUND_S, flooded


def send_ledger_requests(graph, prefix: str, start: int, count: int) -> dict[str, int]:
    """count requests of the `ledger` tenant; total tokens per request id as the responses report them."""
    tokens = {}
    for i in range(start, start + count):
        request_id = f"{prefix}-{i}"
        if i % 4 == 3:  # over the model's context: a 400, metered too
            too_long = body(1, prompt="word " * 2000)
            response = httpx.post(url(graph), json=too_long, headers=headers("ledger", request_id), timeout=60)
            assert response.status_code == 400, response.text
            tokens[request_id] = 0
            continue
        response = httpx.post(url(graph), json=body(4), headers=headers("ledger", request_id), timeout=60)
        assert response.status_code == 200, response.text
        tokens[request_id] = response.json()["usage"]["total_tokens"]
    return tokens


def test_usage_records_equal_requests_served_across_a_replica_kill(graph):
    prefix = f"ledger-{uuid.uuid4().hex[:6]}"
    sent = send_ledger_requests(graph, prefix, 0, 8)
    victim = running_replicas(graph, "ingress")[0]
    ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)

    def replaced() -> bool:
        ids = {replica["replica_id"] for replica in running_replicas(graph, "ingress")}
        return len(ids) == 2 and victim["replica_id"] not in ids

    poll(replaced, 300, "Serve to replace the killed ingress replica", interval_s=1)
    dead_segments = lambda: list((graph.usage_dir / SEGMENTS).glob(f"{victim['replica_id']}-*.jsonl"))  # noqa: E731
    poll(lambda: not dead_segments(), 60, "the killed replica's segment to be converted to Parquet")
    sent |= send_ledger_requests(graph, prefix, 8, 8)

    table = read_usage(graph.usage_dir).to_pylist()
    records = {row["request_id"]: row for row in table if row["request_id"].startswith(prefix)}
    assert len([row for row in table if row["request_id"].startswith(prefix)]) == len(records) == len(sent)
    assert {rid: row["prompt_tokens"] + row["completion_tokens"] for rid, row in records.items()} == sent
    assert Counter(row["status"] for row in records.values()) == {"success": 12, "error": 4}

    own = httpx.get(url(graph, "/usage"), headers=headers("ledger"), timeout=30).json()["data"]
    assert {day["tenant"] for day in own} == {"ledger"}
    assert sum(day["requests"] for day in own) == 16 and sum(day["total_tokens"] for day in own) == sum(sent.values())
    every = httpx.get(url(graph, "/usage"), headers=ALPHA, timeout=30).json()["data"]
    assert {"ledger", "metered", "flood", "calm"} <= {day["tenant"] for day in every}
    other = httpx.get(url(graph, "/usage"), params={"tenant": "metered"}, headers=headers("ledger"), timeout=30)
    assert other.status_code == 403


def admin(graph, path: str) -> dict:
    response = httpx.get(f"{graph.base_url}/limits-admin/{path}", headers=ALPHA, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_an_abandoned_request_is_charged_for_what_its_engine_generated(graph):
    """A request that does not stream gets no output before it finishes, so when its deadline
    (8 s) cuts it off the ingress knows of no tokens; the engine charges its prompt and what it generated."""
    engine_before = admin(graph, "engines")["engine-strict-v1"]
    tokens_before = admin(graph, "quotas")["abandon"]["tokens_this_minute"]
    response = httpx.post(url(graph), json=body(8000, model="strict"), headers=headers("abandon"), timeout=60)
    assert response.status_code == 504, response.text

    def charged() -> tuple[int, int] | None:
        engine = admin(graph, "engines")["engine-strict-v1"]
        generated = engine["generated_tokens"] - engine_before["generated_tokens"]
        tokens = admin(graph, "quotas")["abandon"]["tokens_this_minute"] - tokens_before
        return (generated, tokens) if engine["aborted"] > engine_before["aborted"] and tokens else None

    generated, tokens = poll(charged, 30, "the engine's charge for the abandoned request to reach the quota")
    prompt = len(httpx.post(f"{graph.base_url}/limits/tokenize", json={"model": "strict", "prompt": "Tell me a story"},
                            headers=headers("abandon"), timeout=30).json()["tokens"])  # fmt: skip
    assert generated > 0 and tokens == prompt + generated, (prompt, generated, tokens)
    assert admin(graph, "quotas")["abandon"]["in_flight"] == 0


def test_a_stop_string_bills_only_the_tokens_whose_text_was_sent(graph):
    """The stop string's own tokens count in vLLM's usage, but the client never gets their text: not billed."""
    plain = body(16, temperature=0, logprobs=1, return_tokens_as_token_ids=True)
    choice = httpx.post(url(graph), json=plain, headers=headers("stopper"), timeout=60).json()["choices"][0]
    ids = [int(token.removeprefix("token_id:")) for token in choice["logprobs"]["tokens"]]

    def detokenize(tokens: list[int]) -> str:
        reply = httpx.post(f"{graph.base_url}/limits/detokenize", json={"model": "shared", "tokens": tokens},
                           headers=headers("stopper"), timeout=30)  # fmt: skip
        return reply.json()["prompt"]

    text = detokenize(ids)
    # a stop string of three whole tokens that first appears where they start
    start, stop = next(
        (j, detokenize(ids[j : j + 3])) for j in range(2, len(ids) - 3)
        if detokenize(ids[j : j + 3]).strip() and text.find(detokenize(ids[j : j + 3])) == len(detokenize(ids[:j]))
    )  # fmt: skip
    before = admin(graph, "quotas")["stopper"]["tokens_this_minute"]
    stopped = httpx.post(url(graph), json={**plain, "stop": [stop]}, headers=headers("stopper"), timeout=60).json()
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["choices"][0]["text"] == detokenize(ids[:start])
    usage = stopped["usage"]
    # vLLM's count: the stop string's three tokens, and any it generated before its detokenizer saw the string
    assert usage["completion_tokens"] >= start + 3, (usage, start)

    billed = poll(lambda: admin(graph, "quotas")["stopper"]["tokens_this_minute"] - before or None, 30, "settlement")
    billed_completion = billed - usage["prompt_tokens"]
    # the billed tokens hold all the text the client got, and none of the stop string's tokens (the tiny
    # model's random tokens are often partial UTF-8, so a token before the stop string may add no text)
    assert 0 < billed_completion <= start < usage["completion_tokens"], (billed, usage, start)
    assert detokenize(ids[:billed_completion]).startswith(stopped["choices"][0]["text"]), (billed, usage, start)


def test_admin_app_requires_an_admin_key(graph):
    admin = f"{graph.base_url}/limits-admin/engines"
    assert httpx.get(admin, timeout=30).status_code == 401
    assert httpx.get(admin, headers=headers("calm"), timeout=30).status_code == 403
    assert httpx.get(admin, headers=ALPHA, timeout=30).status_code == 200
    assert httpx.get(f"{graph.base_url}/limits-admin/healthz", timeout=30).status_code == 200


def test_quotas_of_an_app_without_limits_are_a_404(graph):
    """The default app's tenants have no limits, so it runs no quota deployment to ask."""
    response = httpx.get(f"{graph.base_url}/admin/quotas", timeout=30)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found"


def test_keys_never_reach_the_logs(graph):
    """Last of the session: by now every tenant's key has been used, and a wrong key refused."""
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url(graph, ""), api_key="sk-leak-canary-7", max_retries=0).models.list()
    keys = [ALPHA_KEY, BETA_KEY, "sk-leak-canary-7", *TENANT_KEYS.values()]
    for path in graph.logs_dir.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            for key in keys:
                assert key.encode() not in text, (key, path)
