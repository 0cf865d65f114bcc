"""Rollout, fallback, circuit breaker and replica loss on the real graph (conftest's `resilience` app).

The external upstream is a real second process: a bare vLLM OpenAI server of the tiny model.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from servegraph.bench.targets import BareVllmTarget
from servegraph.models.build import default_cache_dir, ensure_local_model
from servegraph.models.spec import LocalBuildRecipe, ModelSpec
from tests.e2e.conftest import SERVED_BY, BackgroundLoad, poll, with_traffic


def completions_url(graph) -> str:
    return f"{graph.base_url}/resilience/v1/completions"


def upstream_server(graph) -> BareVllmTarget:
    spec = ModelSpec(name="tiny", build=LocalBuildRecipe(seed=0), max_model_len=2048, max_num_seqs=8)
    return BareVllmTarget(spec, ensure_local_model(spec.build, default_cache_dir()), port=graph.upstream_port)


@pytest.fixture(scope="module")
def upstream(graph) -> Iterator[BareVllmTarget]:
    """One server for the module (a vLLM start is about 50 s here): a test that stops it starts it again."""
    server = upstream_server(graph)
    server.__enter__()
    yield server
    server.__exit__(None, None, None)


class ContinuousLoad(BackgroundLoad):
    """Sends requests back to back from a few threads (streams and not); records every outcome."""

    def __init__(self, url: str, model: str, threads: int = 3, max_tokens: int = 16) -> None:
        super().__init__(threads)
        self._url, self._model, self._max_tokens = url, model, max_tokens
        self.outcomes: list[tuple[int, str, str]] = []  # status, served by, error code or ""

    def _run(self, index: int) -> None:
        body = {"model": self._model, "prompt": "Once upon a time", "max_tokens": self._max_tokens}
        n = 0
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                n += 1
                session = {"user": f"user-{index}-{n % 7}"} if n % 2 else {}  # and some without a session
                try:
                    outcome = self._send(client, {**body, "stream": n % 4 < 2, **session})
                except httpx.HTTPError as exc:  # a hang or a dropped connection is a failure too
                    outcome = (0, "", type(exc).__name__)
                self.outcomes.append(outcome)

    def _send(self, client: httpx.Client, body: dict) -> tuple[int, str, str]:
        response = client.post(self._url, json=body)
        served_by = response.headers.get(SERVED_BY, "")
        if response.status_code != 200:
            code = (
                response.json()["error"]["code"] if response.headers.get("content-type") == "application/json" else ""
            )
            return response.status_code, served_by, code or response.text[:80]
        if not body["stream"]:
            return 200, served_by, ""
        events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
        errors = [json.loads(e)["error"]["code"] for e in events[:-1] if '"error"' in e]
        return 200, served_by, errors[0] if errors else ("" if events[-1] == "[DONE]" else "unterminated")

    def since(self, start: int) -> list[tuple[int, str, str]]:
        return self.outcomes[start:]

    def summary(self) -> dict[str, int]:
        failed = sum(1 for status, _, error in self.outcomes if status != 200 or error)
        return {"sent": len(self.outcomes), "succeeded": len(self.outcomes) - failed, "failed": failed}


def replicas(graph, deployment: str) -> list[dict]:
    apps = graph.cluster.applications()
    return [r for r in apps["resilience"]["deployments"][deployment]["replicas"] if r["state"] == "RUNNING"]


def test_canary_rollout_and_rollback_fail_no_request_and_restart_no_engine(graph):
    engines = ("engine-canary-v1", "engine-canary-v2")
    engine_ids = {name: {r["replica_id"] for r in replicas(graph, name)} for name in engines}
    with ContinuousLoad(completions_url(graph), "canary") as load:
        poll(lambda: len(load.outcomes) >= 10, 120, "the load to start")
        for weights, expected in [
            ({"v1": 80, "v2": 20}, {"canary@v1", "canary@v2"}),  # canary
            ({"v1": 0, "v2": 100}, {"canary@v2"}),  # promote
            ({"v1": 100}, {"canary@v1"}),  # roll back
        ]:
            graph.cluster.deploy(with_traffic(graph, weights))
            mark = len(load.outcomes)

            def settled(mark=mark, expected=expected) -> bool:
                recent = {served for _, served, _ in load.since(mark)[-40:]}
                return len(load.since(mark)) >= 40 and recent == expected

            poll(settled, 120, f"traffic to follow {weights}")
    summary = load.summary()
    print(f"rollout under load: {summary}")  # noqa: T201 - read by the closing note
    assert summary["failed"] == 0, Counter(load.outcomes)
    assert {name: {r["replica_id"] for r in replicas(graph, name)} for name in engines} == engine_ids


def test_one_user_stays_on_one_version(graph):
    graph.cluster.deploy(with_traffic(graph, {"v1": 50, "v2": 50}))
    body = {"model": "canary", "prompt": "Hi", "max_tokens": 2}

    def versions_of(user: str) -> set[str]:
        return {httpx.post(completions_url(graph), json={**body, "user": user}, timeout=60).headers[SERVED_BY]
                for _ in range(4)}  # fmt: skip

    def split_applied() -> bool:
        return set().union(*(versions_of(f"probe-{i}") for i in range(8))) == {"canary@v1", "canary@v2"}

    poll(split_applied, 60, "the 50/50 split")
    assert all(len(versions_of(f"user-{i}")) == 1 for i in range(6))
    graph.cluster.deploy(with_traffic(graph, {"v1": 100}))


def test_killed_engine_replica_retries_unstarted_requests_and_ends_running_streams_clearly(graph):
    import ray

    before = replicas(graph, "engine-canary-v1")
    assert len(before) == 2
    with ContinuousLoad(completions_url(graph), "canary", threads=4, max_tokens=64) as load:
        poll(lambda: len(load.outcomes) >= 8, 120, "the load to start")
        mark = len(load.outcomes)
        ray.kill(ray.get_actor(before[0]["actor_name"], namespace="serve"), no_restart=True)
        poll(lambda: len(load.since(mark)) >= 30, 180, "requests after the kill")
    after_kill = load.since(mark)
    print(f"replica kill under load: {load.summary()}, after the kill: {Counter(after_kill)}")  # noqa: T201
    # Whatever had not started was retried and served; a stream cut mid-way says why; nothing hung.
    assert all(status == 200 and error in ("", "engine_unavailable") for status, _, error in after_kill), after_kill
    killed = before[0]["replica_id"]

    def replaced() -> list[dict] | None:
        now = replicas(graph, "engine-canary-v1")
        return now if len(now) == 2 and killed not in {r["replica_id"] for r in now} else None

    poll(replaced, 600, "Serve to replace the killed replica", interval_s=1)


def served_by(graph, model: str = "ext", prompt: str = "Hello") -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 4}
    response = httpx.post(completions_url(graph), json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.headers[SERVED_BY]


def test_prompt_too_long_for_the_model_goes_to_the_upstream(graph, upstream):
    assert served_by(graph, "canary", "word " * 300) == "ext@upstream"
    assert served_by(graph, "canary", "word") == "canary@v1"


def test_upstream_breaker_moves_traffic_to_the_fallback_and_back(graph, upstream):
    poll(lambda: served_by(graph) == "ext@upstream", 60, "the upstream to serve")
    upstream.__exit__(None, None, None)
    killed = time.monotonic()
    poll(lambda: served_by(graph) == "canary@v1", 60, "traffic to move to the fallback")
    moved_s = time.monotonic() - killed
    assert all(served_by(graph) == "canary@v1" for _ in range(5))

    upstream.__enter__()  # the same port again
    back = time.monotonic()
    poll(lambda: served_by(graph) == "ext@upstream", 60, "the half-open probe to close the breaker")
    returned_s = time.monotonic() - back
    print(f"upstream down -> fallback serving: {moved_s:.2f} s; upstream up -> traffic back: {returned_s:.2f} s")  # noqa: T201
