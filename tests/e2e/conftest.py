"""One real Ray cluster running graphs/local.yaml for the whole test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from graphs.local_cluster import LocalServeCluster, load_config, wait_for

poll = wait_for


@dataclass(frozen=True)
class Graph:
    base_url: str
    config: dict
    metrics_url: str
    logs_dir: Path

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    def model_spec(self, name: str) -> dict:
        llm = next(app for app in self.config["applications"] if app["name"] == "llm")
        return next(model for model in llm["args"]["models"] if model["name"] == name)

    def engine_stats(self) -> dict[str, dict[str, int]]:
        return httpx.get(f"{self.base_url}/admin/engines", timeout=10).json()


# A second LLM application beside the default graph: one model with a one-request queue and a
# short deadline, so overload and timeouts can be provoked without slowing the default models.
LIMITS_APPS = [
    {
        "name": "limits",
        "route_prefix": "/limits",
        "import_path": "graphs.builder:build_llm_app",
        "args": {
            "accelerator": "cpu",
            "models": [
                {"name": "strict", "build": {"seed": 0}, "max_model_len": 2048, "max_num_seqs": 1,
                 "max_queued_requests": 1, "request_timeout_s": 3, "default_max_tokens": 64}
            ],
        },
        # Small CPU asks, so this app fits beside the default graph's on two logical CPUs.
        "deployments": [{"name": "engine-strict-v1", "ray_actor_options": {"num_cpus": 0.2}}]
        + [{"name": name, "ray_actor_options": {"num_cpus": 0.05}}
           for name in ("ingress", "router", "tokenizer", "postprocess")],
    },
    {"name": "limits-admin", "route_prefix": "/limits-admin", "import_path": "graphs.builder:build_admin_app",
     "args": {"llm_app": "limits"}},
]  # fmt: skip


@pytest.fixture(scope="session")
def graph(tmp_path_factory) -> Iterator[Graph]:
    os.environ["SERVEGRAPH_CACHE_DIR"] = str(tmp_path_factory.mktemp("model-cache"))
    work_dir = tmp_path_factory.mktemp("graph")
    config = load_config()
    config = {**config, "applications": config["applications"] + LIMITS_APPS}
    with LocalServeCluster(config, work_dir, metrics_report_interval_ms=1000) as cluster:
        yield Graph(cluster.base_url, cluster.config, cluster.metrics_url, cluster.logs_dir)


@pytest.fixture(scope="session")
def client(graph: Graph):
    from openai import OpenAI

    return OpenAI(base_url=graph.openai_base_url, api_key="unused", max_retries=0, timeout=60)
