"""One real Ray cluster running graphs/local.yaml for the whole test session.

The test process is the Ray head (so `ray.shutdown()` removes every process it started)
and deploys the config with the `serve deploy` CLI, on free ports, so a developer's own
`make serve` on the default ports is untouched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DEADLINE_S = 600
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poll(check: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.2) -> T:
    """Return check()'s first truthy value, or fail once the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")


@dataclass(frozen=True)
class Graph:
    base_url: str
    dashboard_url: str
    config: dict

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    def model_spec(self, name: str) -> dict:
        llm = next(app for app in self.config["applications"] if app["name"] == "llm")
        return next(model for model in llm["args"]["models"] if model["name"] == name)

    def engine_stats(self) -> dict[str, dict[str, int]]:
        return httpx.get(f"{self.base_url}/admin/engines", timeout=10).json()


def serve_applications(dashboard_url: str) -> dict:
    try:
        return httpx.get(f"{dashboard_url}/api/serve/applications/", timeout=5).json().get("applications", {})
    except (httpx.HTTPError, ValueError):
        return {}


def all_running(dashboard_url: str, names: list[str]) -> bool:
    apps = serve_applications(dashboard_url)
    failed = {n: a.get("message") for n, a in apps.items() if a.get("status") == "DEPLOY_FAILED"}
    if failed:
        pytest.fail(f"deploy failed: {failed}")
    return all(apps.get(n, {}).get("status") == "RUNNING" for n in names)


@pytest.fixture(scope="session")
def graph(tmp_path_factory) -> Iterator[Graph]:
    import ray

    http_port, dashboard_port = free_port(), free_port()
    config = yaml.safe_load((ROOT / "graphs" / "local.yaml").read_text())
    config["http_options"]["port"] = http_port
    config_path = tmp_path_factory.mktemp("graph") / "local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    os.environ["SERVEGRAPH_CACHE_DIR"] = str(tmp_path_factory.mktemp("model-cache"))
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        log_to_driver=False,
    )
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    try:
        subprocess.run(
            [str(Path(sys.executable).with_name("serve")), "deploy", str(config_path), "-a", dashboard_url],
            check=True,
            env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")},
        )
        names = [app["name"] for app in config["applications"]]
        poll(lambda: all_running(dashboard_url, names), DEPLOY_DEADLINE_S, "graphs/local.yaml to be RUNNING", 1)
        yield Graph(base_url=f"http://127.0.0.1:{http_port}", dashboard_url=dashboard_url, config=config)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def client(graph: Graph):
    from openai import OpenAI

    return OpenAI(base_url=graph.openai_base_url, api_key="unused", max_retries=0, timeout=60)
