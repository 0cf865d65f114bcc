"""Bounded queues and per-model deadlines on the real graph (the `limits` application of conftest)."""

from __future__ import annotations

import asyncio

import httpx

from tests.e2e.conftest import ALPHA_KEY, poll

ALPHA = {"Authorization": f"Bearer {ALPHA_KEY}"}


def strict_stats(graph) -> dict:
    return httpx.get(f"{graph.base_url}/limits-admin/engines", headers=ALPHA, timeout=10).json()["engine-strict-v1"]


async def burst(url: str, n: int, max_tokens: int) -> list[httpx.Response]:
    body = {"model": "strict", "prompt": "Tell me a story", "max_tokens": max_tokens, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=120, headers=ALPHA) as client:
        return await asyncio.gather(*(client.post(url, json=body) for _ in range(n)))


def test_requests_past_the_engine_queue_get_503_with_retry_after(graph):
    # One running (max_num_seqs 1) plus one more Serve lets into the engine, plus one queued:
    # three 8-token requests run one after another, far inside the model's deadline.
    responses = asyncio.run(burst(f"{graph.base_url}/limits/v1/completions", 10, 8))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1 and set(statuses) <= {200, 503}, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers.get("retry-after") == "1", (refused.headers, refused.text)
    assert refused.json()["error"]["code"] == "overloaded"
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in responses if r.status_code == 200)


def test_request_past_the_model_deadline_gets_504_and_is_aborted(graph):
    before = strict_stats(graph)
    body = {"model": "strict", "prompt": "Tell me a long story", "max_tokens": 8000, "ignore_eos": True}
    response = httpx.post(f"{graph.base_url}/limits/v1/completions", json=body, headers=ALPHA, timeout=60)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "timeout"

    def aborted() -> dict | None:
        stats = strict_stats(graph)
        return stats if stats["aborted"] > before["aborted"] and stats["unfinished"] == 0 else None

    after = poll(aborted, 30, "the engine to abort the timed-out request")
    assert after["generated_tokens"] - before["generated_tokens"] < 8000
    url = f"{graph.base_url}/limits/v1/completions"
    follow_up = httpx.post(url, json={**body, "max_tokens": 8}, headers=ALPHA, timeout=60)
    assert follow_up.status_code == 200
