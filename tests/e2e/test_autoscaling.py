"""Engine autoscaling on the real graph (models `elastic` and `sleepy` of conftest's `resilience` app):
the engine-signals policy from zero to two replicas and back, and a cold start past its bound."""

from __future__ import annotations

import time

import httpx

from servegraph.autoscale.policy import ENGINE_SIGNALS_POLICY
from tests.e2e.conftest import BackgroundLoad, poll


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


class SteadyLoad(BackgroundLoad):
    """Keeps `streams` long requests in flight until stopped; counts what came back."""

    def __init__(self, url: str, model: str, streams: int) -> None:
        super().__init__(streams)
        self._url, self._model = url, model
        self.statuses: list[int] = []

    def _run(self, index: int) -> None:
        body = {"model": self._model, "prompt": "Tell me a story", "max_tokens": 200, "ignore_eos": True}
        with httpx.Client(timeout=900) as client:
            while not self._stop.is_set():
                self.statuses.append(client.post(self._url, json=body).status_code)


def test_one_stream_over_the_ttft_slo_scales_the_engine_to_two_then_zero_and_a_cold_request_is_served(graph):
    """`elastic` runs the engine-signals policy (Serve's controller calls autoscale/serve_policy.py) with a
    TTFT SLO no request can meet. One stream is loaded: Serve's default target (1.5 ongoing requests per
    replica for max_num_seqs 2) would keep one replica, so only the TTFT the engine reports adds the second."""
    url = f"{graph.base_url}/resilience/v1/completions"
    engine = "engine-elastic-v1"
    config = graph.cluster.applications()["resilience"]["deployments"][engine]["deployment_config"]
    assert config["autoscaling_config"]["policy"]["policy_function"] == ENGINE_SIGNALS_POLICY
    assert running_replicas("resilience", engine) == 0
    with SteadyLoad(url, "elastic", streams=1) as load:
        poll(lambda: running_replicas("resilience", engine) == 2, 600, "a second elastic replica", interval_s=1)
    assert load.statuses and set(load.statuses) <= {200}, load.statuses
    poll(lambda: running_replicas("resilience", engine) == 0, 300, "elastic to scale to zero", interval_s=1)

    started = time.monotonic()
    # A one-token prompt: on AMX CPUs it also shows the cold engine set up its AMX tiles (models/cpu_amx.py).
    cold = httpx.post(url, json={"model": "elastic", "prompt": [300], "max_tokens": 4}, timeout=900)
    assert cold.status_code == 200, cold.text
    assert cold.json()["usage"]["completion_tokens"] == 4
    print(f"cold request served in {time.monotonic() - started:.1f} s")  # noqa: T201 - read by the closing note


def test_cold_start_past_its_bound_is_503_with_retry_after(graph):
    started = time.monotonic()
    body = {"model": "sleepy", "prompt": "Hello", "max_tokens": 4}
    response = httpx.post(f"{graph.base_url}/resilience/v1/completions", json=body, timeout=60)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "model_starting"
    assert response.headers["retry-after"] == "2"
    assert time.monotonic() - started < 30
