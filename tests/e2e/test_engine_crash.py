"""An engine process that dies under a request, on the real graph (model `strict` of the `limits` app).

The worker is killed from outside, as the kernel killed it on AMX CPUs (SIGILL), so this
runs on any CPU: the request it was serving is a possible poison request.
"""

from __future__ import annotations

import json
import signal
import uuid

import httpx
import psutil

from tests.e2e.conftest import ALPHA_KEY, poll

ALPHA = {"Authorization": f"Bearer {ALPHA_KEY}"}


def engine_worker_processes(graph, app: str, deployment: str) -> list[psutil.Process]:
    """vLLM's engine core and worker processes under the deployment's one replica."""
    (replica,) = [r for r in graph.cluster.applications()[app]["deployments"][deployment]["replicas"]
                  if r["state"] == "RUNNING"]  # fmt: skip
    return psutil.Process(replica["pid"]).children(recursive=True)


def events(lines) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def test_request_running_when_its_engine_dies_gets_a_clear_error_and_the_model_comes_back(graph):
    url = f"{graph.base_url}/limits/v1/completions"
    request_id = f"crash-{uuid.uuid4().hex[:8]}"
    body = {"model": "strict", "prompt": "Tell me a long story", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url, json=body, headers={**ALPHA, "X-Request-Id": request_id}, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: ")).removeprefix("data: "))
        response_id = first["id"]  # also the engine's request id
        workers = engine_worker_processes(graph, "limits", "engine-strict-v1")
        assert workers, "no vLLM processes under the strict replica"
        for process in workers:
            process.send_signal(signal.SIGKILL)
        rest = events(lines)
    assert rest[-1] == "[DONE]", rest[-3:]
    error = json.loads(rest[-2])["error"]
    assert error["code"] == "engine_crashed" and response_id in error["message"], error
    assert "RayTaskError" not in error["message"]

    # Until Serve replaces the replica, requests get a 503 that says to retry (the replica is failing, or
    # enough of them failed to open the model's circuit breaker) or, queued for the new replica, a 504
    # at the model's deadline. Then sixteen in a row are served: both ingress replicas' breakers are
    # closed again, so the tests after this one find `strict` as it was.
    def all_served() -> bool:
        replies = [
            httpx.post(url, json={**body, "max_tokens": 4, "stream": False}, headers=ALPHA, timeout=60)
            for _ in range(16)
        ]
        for reply in replies:
            assert reply.status_code in (200, 503, 504), reply.text
            code = None if reply.status_code == 200 else reply.json()["error"]["code"]
            assert code in (None, "engine_unavailable", "model_unavailable", "timeout"), reply.text
        return all(reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4 for reply in replies)

    poll(all_served, 900, "strict to serve again on a new replica", interval_s=2)

    def crash_logged() -> bool:
        lines = (
            line
            for path in (graph.logs_dir / "serve").glob("replica_limits_engine-strict-v1_*.log")
            for line in path.read_text(errors="replace").splitlines()
        )
        return any("engine died while serving request" in line and request_id in line and response_id in line
                   for line in lines)  # fmt: skip

    poll(crash_logged, 60, "the crash to be logged with the client's request id and the engine's")
