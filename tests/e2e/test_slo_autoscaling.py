"""The engine-signals autoscaling policy on the real graph: vLLM's TTFT, through Serve's controller, scales an engine.

An application of its own joins the session's cluster for this test only (it starts with no
engine replica, and leaves when the test ends). Its model's TTFT SLO is one no request can meet,
and a single stream loads it: Serve's default target (1.5 ongoing requests per replica for
max_num_seqs 2) would keep one replica, so only the TTFT the engine reports can add the second.
"""

from __future__ import annotations

import copy

from servegraph.autoscale.policy import ENGINE_SIGNALS_POLICY
from tests.e2e.conftest import TINY, poll
from tests.e2e.test_autoscaling import SteadyLoad, running_replicas

APP, ENGINE = "slo", "engine-surge-v1"
LIGHT_STAGES = ("ingress", "tokenizer", "router", "postprocess")
SLO_APP = {
    "name": APP,
    "route_prefix": "/slo",
    "import_path": "servegraph.graphs.builder:build_llm_app",
    "args": {
        "accelerator": "cpu",
        "auth": {"enabled": False},
        "batch": {"enabled": False},
        "models": [
            {"name": "surge", **TINY, "max_num_seqs": 2, "autoscaling": {
                "min_replicas": 0, "max_replicas": 2, "upscale_delay_s": 0, "downscale_delay_s": 2,
                "downscale_to_zero_delay_s": 4, "cold_start_timeout_s": 600,
                "policy": {"ttft_slo_s": 0.001, "look_back_period_s": 3, "metrics_interval_s": 1}}},
        ],
    },
    # Small CPU asks, so it fits beside the session's applications.
    "deployments": [{"name": ENGINE, "ray_actor_options": {"num_cpus": 0.2}}]
    + [{"name": name, "ray_actor_options": {"num_cpus": 0.05}} for name in LIGHT_STAGES],
}  # fmt: skip


def test_one_stream_over_its_ttft_slo_scales_the_engine_to_two_then_idle_scales_it_to_zero(graph):
    before = copy.deepcopy(graph.cluster.config)
    graph.cluster.deploy({**before, "applications": [*before["applications"], SLO_APP]})
    try:
        policy = graph.cluster.applications()[APP]["deployments"][ENGINE]["deployment_config"]["autoscaling_config"]
        assert policy["policy"]["policy_function"] == ENGINE_SIGNALS_POLICY
        assert running_replicas(APP, ENGINE) == 0
        with SteadyLoad(f"{graph.base_url}/slo/v1/completions", "surge", streams=1) as load:
            poll(lambda: running_replicas(APP, ENGINE) == 2, 600, "a second surge replica", interval_s=1)
        assert load.statuses and set(load.statuses) <= {200}, load.statuses
        poll(lambda: running_replicas(APP, ENGINE) == 0, 120, "surge to scale to zero", interval_s=1)
    finally:
        graph.cluster.deploy(before)
