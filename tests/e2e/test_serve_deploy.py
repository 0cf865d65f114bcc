"""Without our CLI, `serve deploy` of a bad config: Serve's controller runs the same typed validation."""

from __future__ import annotations

import copy

import pytest

from servegraph.graphs.local_cluster import DeployFailed


def test_plain_serve_deploy_of_a_bad_config_fails_in_the_controller_before_any_replica(graph):
    before = copy.deepcopy(graph.cluster.config)
    llm = next(app for app in before["applications"] if app["name"] == "llm")
    broken = {**copy.deepcopy(llm), "name": "broken", "route_prefix": "/broken"}
    broken["args"]["models"][0]["max_model_lenn"] = 5
    try:
        with pytest.raises(DeployFailed, match="max_model_lenn") as failed:
            graph.cluster.deploy({**before, "applications": [*before["applications"], broken]})
        assert "Extra inputs are not permitted" in str(failed.value)
        deployments = graph.cluster.applications()["broken"].get("deployments", {})
        assert not any(deployment.get("replicas") for deployment in deployments.values())
    finally:
        graph.cluster.deploy(before)
