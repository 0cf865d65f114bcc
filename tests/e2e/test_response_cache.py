"""The ingress's response cache on the real graph (conftest's `limits` app, model `shared`).

The cache is on for the tenants `faq` and `faq-peer` only. Each of the two ingress replicas keeps
its own cache, so the first request a replica sees for a body is a miss: `until_both_stored`
sends a body until two misses came back, after which every replica holds it. The engine's own
counter of started requests shows whether a request reached vLLM.
"""

from __future__ import annotations

import copy
import json
import uuid

import httpx

from servegraph.deployments.response_cache import CACHE_HEADER
from servegraph.deployments.usage import read_usage
from tests.e2e.conftest import ALPHA_KEY, SERVED_BY, TENANT_KEYS, poll, with_traffic

INGRESS_REPLICAS = 2  # conftest's TWO_REPLICAS
MAX_WARM_REQUESTS = 20  # new connections spread over both replicas: twenty to one replica is ~2^-19


def url(graph) -> str:
    return f"{graph.base_url}/limits/v1/completions"


def question(stream: bool = False, **extra) -> dict:
    """A greedy request no other test sends (a fresh prompt each time)."""
    prompt = f"FAQ {uuid.uuid4().hex[:8]}: how do I reset my password?"
    return {"model": "shared", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "stream": stream, **extra}  # fmt: skip


def post(graph, tenant: str, body: dict, **headers: str) -> httpx.Response:
    """On a new connection each time, so the proxy spreads requests over both ingress replicas."""
    headers = {"Authorization": f"Bearer {TENANT_KEYS[tenant]}", **headers}
    response = httpx.post(url(graph), json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response


def engine_started(graph) -> int:
    stats = httpx.get(f"{graph.base_url}/limits-admin/engines", headers={"Authorization": f"Bearer {ALPHA_KEY}"})
    return stats.json()["engine-shared-v1"]["started"]


def verdict(response: httpx.Response) -> str | None:
    return response.headers.get(CACHE_HEADER)


def until_both_stored(graph, tenant: str, body: dict) -> list[httpx.Response]:
    """Sends body until every ingress replica answered it once from the engine (and so stored it)."""
    responses: list[httpx.Response] = []
    while sum(verdict(r) == "miss" for r in responses) < INGRESS_REPLICAS:
        assert len(responses) < MAX_WARM_REQUESTS, [verdict(r) for r in responses]
        responses.append(post(graph, tenant, body))
    return responses


def normalised(response: httpx.Response) -> str:
    """The response with its id blanked: a hit carries its own id, the rest is the stored answer."""
    if response.headers["content-type"].startswith("text/event-stream"):
        first = json.loads(response.text.split("\n\n")[0].removeprefix("data: "))
        return response.text.replace(first["id"], "<id>")
    return json.dumps({**response.json(), "id": "<id>"}, sort_keys=True)


def test_a_repeated_greedy_request_is_answered_from_the_cache_and_billed_as_cached(graph):
    body = question()
    before = engine_started(graph)
    warm = until_both_stored(graph, "faq", body)
    hits = [post(graph, "faq", body) for _ in range(4)]
    assert [verdict(r) for r in hits] == ["hit"] * 4
    assert engine_started(graph) - before == INGRESS_REPLICAS  # the misses only
    misses = {normalised(r) for r in warm if verdict(r) == "miss"}
    assert all(normalised(r) in misses for r in hits)
    assert len({r.json()["id"] for r in hits}) == 4  # each hit has its own id

    hit_ids = {r.headers["x-request-id"] for r in hits}

    def cached_records() -> list[dict] | None:
        table = read_usage(graph.usage_dir).to_pylist()
        rows = [row for row in table if row["tenant"] == "faq" and row["request_id"] in hit_ids]
        return rows if len(rows) == len(hit_ids) else None

    rows = poll(cached_records, 60, "the hits' usage records")
    assert all(row["cached"] and row["completion_tokens"] == 8 and row["status"] == "success" for row in rows)

    def hits_exported() -> bool:
        text = httpx.get(graph.metrics_url, timeout=10).text
        return any(
            line.startswith("ray_servegraph_response_cache_hits_total") and 'tenant="faq"' in line
            for line in text.splitlines()
        )

    poll(hits_exported, 60, "the cache's hit counter in the metrics export")


def test_a_stream_replays_as_the_same_sse_events(graph):
    body = question(stream=True)
    before = engine_started(graph)
    warm = until_both_stored(graph, "faq", body)
    hit = post(graph, "faq", body)
    assert verdict(hit) == "hit" and hit.headers["content-type"].startswith("text/event-stream")
    assert hit.text.endswith("data: [DONE]\n\n")
    assert normalised(hit) in {normalised(r) for r in warm if verdict(r) == "miss"}
    assert engine_started(graph) - before == INGRESS_REPLICAS
    assert verdict(post(graph, "faq", {**body, "stream": False})) == "miss"  # a body is keyed apart from a stream


def test_no_other_tenant_no_cache_header_and_no_sampled_request_gets_a_cached_answer(graph):
    body = question()
    until_both_stored(graph, "faq", body)
    before = engine_started(graph)
    assert verdict(post(graph, "faq-peer", body)) == "miss"
    assert verdict(post(graph, "faq", body, **{"Cache-Control": "no-cache"})) == "miss"
    assert verdict(post(graph, "faq", body, **{"Cache-Control": "no-store"})) == "miss"
    assert verdict(post(graph, "calm", body)) is None  # a tenant the cache does not cover
    sampled = {**body, "temperature": 0.8}
    assert [verdict(post(graph, "faq", sampled)) for _ in range(2)] == [None, None]
    assert engine_started(graph) - before == 6


def with_limits_traffic(graph, traffic: dict) -> dict:
    """The running config with the `limits` app's ingress traffic weights changed (applied in place)."""
    config = copy.deepcopy(graph.cluster.config)
    app = next(app for app in config["applications"] if app["name"] == "limits")
    ingress = next(d for d in app["deployments"] if d["name"] == "ingress")
    ingress["user_config"] = {"traffic": traffic}
    return config


def test_a_traffic_change_empties_the_cache_on_every_ingress_replica(graph):
    body = question()
    until_both_stored(graph, "faq", body)
    assert verdict(post(graph, "faq", body)) == "hit"
    graph.cluster.deploy(with_limits_traffic(graph, {"shared": {"v1": 100}}))
    try:
        before = engine_started(graph)
        after = until_both_stored(graph, "faq", body)  # both replicas miss again: neither kept the entry
        assert engine_started(graph) - before == INGRESS_REPLICAS
        assert sum(verdict(r) == "hit" for r in after) == len(after) - INGRESS_REPLICAS
    finally:
        graph.cluster.deploy(with_limits_traffic(graph, {}))


def rollout_post(graph, body: dict) -> httpx.Response:
    response = httpx.post(f"{graph.base_url}/resilience/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response


def test_an_answer_cached_before_a_rollout_is_never_returned_after_it(graph):
    """`resilience`'s `canary`: v1's cached answer, then a promotion to v2 and a rollback to v1.

    Versions are in the key, so v2 cannot get v1's entry; the rollback shows the entry itself
    went: the same key, on the same version, misses again.
    """
    ingress = graph.cluster.applications()["resilience"]["deployments"]["ingress"]["replicas"]
    assert len([r for r in ingress if r["state"] == "RUNNING"]) == 1  # one cache: a miss means it was emptied
    body = {"model": "canary", "prompt": f"rollout {uuid.uuid4().hex[:8]}", "max_tokens": 4, "temperature": 0}
    first = rollout_post(graph, body)
    assert (verdict(first), first.headers[SERVED_BY]) == ("miss", "canary@v1")
    assert verdict(rollout_post(graph, body)) == "hit"
    probe = {"model": "canary", "prompt": "which version?", "max_tokens": 1}  # sampled: never cached
    after: dict[str, httpx.Response] = {}
    try:
        for weights, version in (({"v1": 0, "v2": 100}, "canary@v2"), ({"v1": 100}, "canary@v1")):
            graph.cluster.deploy(with_traffic(graph, weights))
            poll(lambda version=version: rollout_post(graph, probe).headers[SERVED_BY] == version, 120, version)
            after[version] = rollout_post(graph, body)
    finally:
        graph.cluster.deploy(with_traffic(graph, {"v1": 100}))
    assert {version: (verdict(r), r.headers[SERVED_BY]) for version, r in after.items()} == {
        "canary@v2": ("miss", "canary@v2"),
        "canary@v1": ("miss", "canary@v1"),
    }
    assert after["canary@v1"].json()["choices"] == first.json()["choices"]  # greedy: v1 answers the same again
