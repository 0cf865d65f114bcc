"""One real Ray cluster running graphs/local.yaml for the whole test session."""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from servegraph.deployments.auth import hash_key
from servegraph.graphs.local_cluster import LocalServeCluster, lasting_free_port, load_config, wait_for
from servegraph.models.config import USAGE_DIR_ENV
from tests.fakes import IdentityProvider

poll = wait_for


class BackgroundLoad:
    """Threads that each run `_run(index)` until stopped; a context manager around them."""

    def __init__(self, threads: int) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, index: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


@dataclass(frozen=True)
class Graph:
    base_url: str
    config: dict
    metrics_url: str
    logs_dir: Path
    cluster: LocalServeCluster
    upstream_port: int
    usage_dir: Path
    idp: IdentityProvider  # the `limits` apps also take its JWTs

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    def model_spec(self, name: str) -> dict:
        llm = next(app for app in self.config["applications"] if app["name"] == "llm")
        return next(model for model in llm["args"]["models"] if model["name"] == name)

    def engine_stats(self) -> dict[str, dict[str, int]]:
        return httpx.get(f"{self.base_url}/admin/engines", timeout=10).json()


# A second LLM application beside the default graph, with API keys, on two ingress replicas:
# - `strict` has a one-request queue and a deadline, so overload and timeouts can be provoked
#   without slowing the default models;
# - `shared` runs one sequence at a time but holds eight in vLLM's queue, where priorities act.
# Tenants: `alpha` (admin, key hash in the config) may use every model, `beta` (keys from the
# environment) none; the others each show one limit or priority class. The response cache is on
# for `faq` and `faq-peer` only, so no other test's requests are answered from it; the ingress
# has a user_config so a test can change traffic weights in place (which empties the cache).
CACHED_TENANTS = ["faq", "faq-peer"]
STRICT_DEADLINE_S = 8
ALPHA_KEY, BETA_KEY = "sk-test-alpha-5f1c", "sk-test-beta-9d2e"
TENANT_ENV = {"SERVEGRAPH_TEST_BETA_KEYS": f"sk-unused,{BETA_KEY}"}
LIMITED_TENANTS = {
    "metered": {"limits": {"requests_per_minute": 6}},
    "tokens": {"limits": {"tokens_per_minute": 60}},
    "single": {"limits": {"max_concurrent": 1}},
    "flood": {"limits": {"max_concurrent": 3}, "priority": "batch"},
    "calm": {},
    "batchy": {"priority": "batch"},
    "ledger": {},
    "burst": {"limits": {"tokens_per_minute": 100}},
    "steady": {"limits": {"requests_per_minute": 3}},
    "abandon": {"limits": {"tokens_per_minute": 20000}},  # room for 8,000-token requests; a ledger to read
    "stopper": {"limits": {"tokens_per_minute": 20000}},
    "faq": {},  # `faq` and `faq-peer` are the only tenants whose requests the response cache keeps
    "faq-peer": {},
}
TENANT_KEYS = {name: f"sk-test-{name}-{index}7a" for index, name in enumerate(LIMITED_TENANTS)}
LIMITS_AUTH = {"tenants": [
    {"name": "alpha", "key_hashes": [hash_key(ALPHA_KEY)], "admin": True},
    {"name": "beta", "keys_env": "SERVEGRAPH_TEST_BETA_KEYS", "models": []},
    *({"name": name, "key_hashes": [hash_key(TENANT_KEYS[name])], **spec} for name, spec in LIMITED_TENANTS.items()),
]}  # fmt: skip
TWO_REPLICAS = {"min_replicas": 2, "max_replicas": 2}
LIMITS_APPS = [
    {
        "name": "limits",
        "route_prefix": "/limits",
        "import_path": "servegraph.graphs.builder:build_llm_app",
        "args": {
            "accelerator": "cpu",
            "models": [
                # An 8 s deadline that a normal request never nears on a busy machine, and a context
                # long enough (8,000 tokens take well over 8 s on any CPU) to provoke a 504 for sure.
                {"name": "strict", "build": {"seed": 0, "max_position_embeddings": 8192}, "max_model_len": 8192,
                 "max_num_seqs": 1, "max_queued_requests": 1, "request_timeout_s": STRICT_DEADLINE_S,
                 "default_max_tokens": 64},
                {"name": "shared", "build": {"seed": 0}, "max_model_len": 512, "max_num_seqs": 1,
                 "max_ongoing_requests": 8, "max_queued_requests": 16, "default_max_tokens": 64},
            ],
            "auth": LIMITS_AUTH,
            "response_cache": {"enabled": True, "tenants": CACHED_TENANTS},
        },
        # Small CPU asks, so this app fits beside the default graph's; two ingress and router replicas.
        "deployments": [{"name": engine, "ray_actor_options": {"num_cpus": 0.2}}
                        for engine in ("engine-strict-v1", "engine-shared-v1")]
        + [{"name": name, "ray_actor_options": {"num_cpus": 0.05}} for name in ("tokenizer", "postprocess")]
        + [{"name": "ingress", "ray_actor_options": {"num_cpus": 0.05}, "autoscaling_config": TWO_REPLICAS,
            "user_config": {"traffic": {}}},
           {"name": "router", "ray_actor_options": {"num_cpus": 0.05}, "autoscaling_config": TWO_REPLICAS}],
    },
    {"name": "limits-admin", "route_prefix": "/limits-admin",
     "import_path": "servegraph.graphs.builder:build_admin_app", "args": {"llm_app": "limits", "auth": LIMITS_AUTH}},
]  # fmt: skip


PROMPT_TOKEN_CAP = 400  # above `canary`'s context (128), so its too-long prompts still reach the fallback


def trusting(apps: list[dict], idp: IdentityProvider) -> list[dict]:
    """apps, whose auth also takes the provider's JWTs beside the tenants' keys."""
    apps = copy.deepcopy(apps)
    for app in apps:
        app["args"]["auth"]["jwt"] = idp.config()
    return apps


TINY = {"build": {"seed": 0}, "max_model_len": 512}  # the default graph's tiny model: built once
SHORT = {"max_model_len": 128, "default_max_tokens": 64, "fallbacks": ["ext"]}


def resilience_app(upstream_port: int) -> dict:
    """One more LLM application, for scaling, rollout, fallback and failure tests.

    - `elastic` starts at zero and runs the engine-signals policy with a TTFT SLO no request meets:
      any load takes it to 2 replicas, idle takes it back down and to zero.
    - `sleepy` scales from zero with a 2 s bound on its cold start, which takes far longer.
    - `canary` has two versions (v1 on two replicas, routed by our prefix-aware router); `ext`
      is an external upstream; each falls back to the other.
    - The response cache is on (for greedy or seeded requests): a rollout empties it.
    """
    return {
        "name": "resilience",
        "route_prefix": "/resilience",
        "import_path": "servegraph.graphs.builder:build_llm_app",
        "args": {
            "accelerator": "cpu",
            "auth": {"enabled": False},
            "limits": {"max_prompt_tokens": PROMPT_TOKEN_CAP},
            "response_cache": {"enabled": True},  # deterministic requests only: a rollout must empty it
            "models": [
                {"name": "elastic", **TINY, "max_num_seqs": 2, "max_queued_requests": 8, "autoscaling": {
                    "min_replicas": 0, "max_replicas": 2, "upscale_delay_s": 0,
                    "downscale_delay_s": 5, "downscale_to_zero_delay_s": 10, "cold_start_timeout_s": 600,
                    "policy": {"ttft_slo_s": 0.001, "look_back_period_s": 3, "metrics_interval_s": 1}}},
                {"name": "sleepy", **TINY, "autoscaling": {
                    "min_replicas": 0, "max_replicas": 1, "downscale_to_zero_delay_s": 5, "cold_start_timeout_s": 2}},
                {"name": "canary", **TINY, **SHORT, "autoscaling": {"min_replicas": 2, "max_replicas": 2},
                 "request_router": {"class_path": "servegraph.deployments.prefix_router:PrefixAwareRouter",
                                    "kwargs": {"block_size": 16, "imbalance_threshold": 2}}},
                {"name": "canary", "version": "v2", "build": {"seed": 1}, **SHORT},
            ],
            "upstreams": [
                {"name": "ext", "base_url": f"http://127.0.0.1:{upstream_port}/v1", "model": "tiny",
                 "fallbacks": ["canary"], "timeout_s": 30,
                 "circuit_breaker": {"failure_threshold": 2, "cooldown_s": 5}},
            ],
        },
        "deployments": [
            {"name": "ingress", "user_config": {"traffic": {"canary": {"v1": 100}}}},
        ],
    }  # fmt: skip


SERVED_BY = "x-servegraph-served-by"


def with_traffic(graph: Graph, weights: dict[str, float]) -> dict:
    """The running config with the `resilience` app's canary weights changed: what a rollout redeploys."""
    config = copy.deepcopy(graph.cluster.config)
    app = next(app for app in config["applications"] if app["name"] == "resilience")
    ingress = next(d for d in app["deployments"] if d["name"] == "ingress")
    ingress["user_config"] = {"traffic": {"canary": weights}}
    return config


# Serve's autoscaler reads handle metrics, pushed every 10 s by default; 1 s lets the scaling test
# react in seconds.
FAST_AUTOSCALING_ENV = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
# Ray's memory monitor kills workers past 95 % of memory, Serve's controller among them; the
# session's peaks (two `elastic` replicas starting) come close, and the page cache is reclaimable.
MEMORY_MONITOR_ENV = {"RAY_memory_usage_threshold": "0.99"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The short-prompt tests run first among the e2e tests.

    A vLLM process that has run a prompt of five or more tokens holds its AMX tiles anyway
    (models/cpu_amx.py), so only an engine's first requests show whether the fix works.
    """
    first = [item for item in items if item.path.name == "test_short_prompts.py"]
    rest = [item for item in items if item.path.name != "test_short_prompts.py"]
    e2e_start = next((i for i, item in enumerate(rest) if "e2e" in item.path.parts), len(rest))
    items[:] = rest[:e2e_start] + first + rest[e2e_start:]


# The default graph's embedding model starts only when its tests ask for it and leaves a minute after:
# with it always up, the session's engines outgrew 24 GiB while `elastic` scaled to two replicas.
EMBEDDER_ON_DEMAND = {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "downscale_to_zero_delay_s": 60,
                      "cold_start_timeout_s": 600}  # fmt: skip


def embedder_on_demand(config: dict) -> dict:
    """graphs/local.yaml with its `task: embed` models scaled to zero until used."""
    for app in config["applications"]:
        for model in app.get("args", {}).get("models", []):
            if model.get("task") == "embed":
                model["autoscaling"] = EMBEDDER_ON_DEMAND
    return config


@pytest.fixture(scope="session")
def graph(tmp_path_factory) -> Iterator[Graph]:
    os.environ["SERVEGRAPH_CACHE_DIR"] = str(tmp_path_factory.mktemp("model-cache"))
    usage_dir = tmp_path_factory.mktemp("usage")
    os.environ[USAGE_DIR_ENV] = str(usage_dir)
    work_dir = tmp_path_factory.mktemp("graph")
    upstream_port = lasting_free_port()  # bound by the upstream tests, many minutes later
    config = embedder_on_demand(load_config())
    idp = IdentityProvider(work_dir)
    apps = config["applications"] + trusting(LIMITS_APPS, idp) + [resilience_app(upstream_port)]
    # Logical CPUs only: the replicas share the machine's real cores either way.
    with LocalServeCluster(
        {**config, "applications": apps}, work_dir, num_cpus=16, metrics_report_interval_ms=1000,
        env=FAST_AUTOSCALING_ENV | MEMORY_MONITOR_ENV | TENANT_ENV,
    ) as cluster:  # fmt: skip
        running = (cluster.base_url, cluster.config, cluster.metrics_url, cluster.logs_dir)
        yield Graph(*running, cluster, upstream_port, usage_dir, idp)


@pytest.fixture(scope="session")
def client(graph: Graph):
    from openai import OpenAI

    return OpenAI(base_url=graph.openai_base_url, api_key="unused", max_retries=0, timeout=60)
