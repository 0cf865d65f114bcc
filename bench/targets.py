"""Servers to benchmark, all on the same local model: our graph, a bare vLLM OpenAI server,
and Ray's own `ray.serve.llm` OpenAI app."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from servegraph.graphs.local_cluster import LocalServeCluster, free_port, load_config, wait_for
from servegraph.models.build import default_cache_dir, ensure_local_model
from servegraph.models.config import LLMAppArgs
from servegraph.models.engine_config import CPU_MEMORY_UTILIZATION
from servegraph.models.spec import ModelSpec


def llm_app(config: dict[str, Any]) -> dict[str, Any]:
    return next(app for app in config["applications"] if app["import_path"].endswith(":build_llm_app"))


def model_spec(config: dict[str, Any], model: str) -> ModelSpec:
    args = LLMAppArgs.model_validate(llm_app(config)["args"])
    return next(spec for spec in args.models if spec.name == model)


def single_model_config(config: dict[str, Any], model: str) -> dict[str, Any]:
    """The config's LLM app serving only `model`, and no other application.

    Without LoRA adapters: the peers serve the base model alone, and vLLM's LoRA kernels run for
    every token once enable_lora is on (bench/lora.py measures adapters).
    """
    app = llm_app(config)
    models = [{k: v for k, v in m.items() if k != "lora"} for m in app["args"]["models"] if m["name"] == model]
    engines = {ModelSpec.model_validate(m).engine_deployment_name for m in models}
    deployments = [d for d in app.get("deployments", []) if not d["name"].startswith("engine-") or d["name"] in engines]
    return {**config, "applications": [{**app, "args": {**app["args"], "models": models}, "deployments": deployments}]}


class HttpLatency:
    """Targets measured only from outside: one-token request latency over HTTP."""

    name: str
    model: str

    def details(self, base_url: str) -> dict[str, float]:
        from servegraph.bench.hops import one_token_http_ms

        return {"http ms": one_token_http_ms(base_url, self.model)}


class ClusterTarget(HttpLatency):
    """A Serve config deployed on a Ray head owned by this process for the length of the `with`."""

    def __init__(self, name: str, model: str, config: dict[str, Any]) -> None:
        self.name = name
        self.model = model
        self._cluster = LocalServeCluster(config, Path(tempfile.mkdtemp()))

    def __enter__(self) -> str:
        try:
            self._cluster.start()
        except Exception as exc:  # Ray's head start fails now and then (seen: its dashboard.err missing)
            print(f"{self.name}: cluster start failed ({exc}); retrying once", file=sys.stderr)
            self._cluster.stop()
            self._cluster.start()
        return self._cluster.base_url

    def __exit__(self, *exc_info: object) -> None:
        self._cluster.stop()


class ServegraphTarget(ClusterTarget):
    def __init__(self, config: dict[str, Any], model: str) -> None:
        super().__init__("servegraph", model, single_model_config(config, model))

    def details(self, base_url: str) -> dict[str, float]:
        from servegraph.bench.hops import hop_latencies

        return hop_latencies(base_url, self.model)


class RayServeLLMTarget(ClusterTarget):
    """Ray's `ray.serve.llm.build_openai_app` over the same model.

    stream_batching_interval_ms None keeps Ray's default (it batches stream chunks for 50 ms);
    0 sends every chunk as it comes, which is the fair comparison for TTFT.
    """

    def __init__(self, spec: ModelSpec, model_dir: Path, stream_batching_interval_ms: int | None) -> None:
        name = "ray-llm" if stream_batching_interval_ms is None else f"ray-llm-{stream_batching_interval_ms}ms"
        config = {"applications": [self.application(spec, model_dir, stream_batching_interval_ms)]}
        super().__init__(name, spec.name, config)

    @staticmethod
    def application(spec: ModelSpec, model_dir: Path, batching_ms: int | None) -> dict[str, Any]:
        experimental = {} if batching_ms is None else {"stream_batching_interval_ms": batching_ms}
        llm_config = {
            "model_loading_config": {"model_id": spec.name, "model_source": str(model_dir)},
            "engine_kwargs": {
                "dtype": spec.dtype,
                "max_model_len": spec.max_model_len,
                "max_num_seqs": spec.max_num_seqs,
                "enforce_eager": True,
                "gpu_memory_utilization": CPU_MEMORY_UTILIZATION,
            },
            # A CPU-only bundle makes ray.serve.llm pick its CPU accelerator config.
            "placement_group_config": {"bundles": [{"CPU": 0.5}]},
            "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
            "experimental_configs": experimental,
        }
        return {
            "name": "llm",
            "route_prefix": "/",
            "import_path": "ray.serve.llm:build_openai_app",
            "args": {
                "llm_configs": [llm_config],
                # Its ingress asks for a whole CPU by default and would wait forever on two cores.
                "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0.1}},
            },
        }


class BareVllmTarget(HttpLatency):
    """`vllm serve` of the same model (vllm-cpu needs the module form, see RUNTIME-NOTES)."""

    name = "vllm"

    def __init__(self, spec: ModelSpec, model_dir: Path, port: int | None = None) -> None:
        self._spec = spec
        self.model = spec.name
        self._model_dir = model_dir
        self._port = port or free_port()
        self._process: subprocess.Popen | None = None

    def parser_args(self) -> list[str]:
        """The spec's tool and reasoning parsers, as `vllm serve` takes them."""
        spec = self._spec
        tools = ["--enable-auto-tool-choice", "--tool-call-parser", spec.tool_parser] if spec.tool_parser else []
        return tools + (["--reasoning-parser", spec.reasoning_parser] if spec.reasoning_parser else [])

    def command(self) -> list[str]:
        spec = self._spec
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self._model_dir), "--served-model-name", spec.name,
            "--dtype", spec.dtype, "--max-model-len", str(spec.max_model_len),
            "--max-num-seqs", str(spec.max_num_seqs), "--enforce-eager",
            "--gpu-memory-utilization", "0.3", "--host", "127.0.0.1", "--port", str(self._port),
            *self.parser_args(),
        ]  # fmt: skip

    def __enter__(self) -> str:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        self._process = subprocess.Popen(self.command(), env=env, start_new_session=True, stdout=subprocess.DEVNULL)
        base_url = f"http://127.0.0.1:{self._port}"
        try:
            wait_for(lambda: self._healthy(base_url), 300, "the bare vLLM server", interval_s=1)
        except BaseException:  # a server that never came up must not stay behind
            self.__exit__(None, None, None)
            raise
        return base_url

    def _healthy(self, base_url: str) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {self._process.returncode}")
        try:
            return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def __exit__(self, *exc_info: object) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()


class ExternalTarget(HttpLatency):
    """A server someone else runs: nothing to start or stop."""

    name = "endpoint"

    def __init__(self, base_url: str, model: str) -> None:
        self._base_url = base_url.rstrip("/")
        self.model = model

    def __enter__(self) -> str:
        return self._base_url

    def __exit__(self, *exc_info: object) -> None:
        pass


def local_model_dir(spec: ModelSpec) -> Path:
    if spec.build is None:
        raise ValueError(f"model {spec.name!r} is not a local build; benchmark a local model")
    return ensure_local_model(spec.build, default_cache_dir())


TARGET_NAMES = ("servegraph", "vllm", "ray-llm", "ray-llm-0ms")


def check_target_names(names: list[str]) -> None:
    unknown = set(names) - set(TARGET_NAMES)
    if unknown:
        raise ValueError(f"unknown targets {sorted(unknown)}; choose from {sorted(TARGET_NAMES)}")


def build_targets(names: list[str], model: str, config_path: Path | None = None):
    check_target_names(names)
    config = load_config(config_path) if config_path else load_config()
    spec = model_spec(config, model)
    makers = {
        "servegraph": lambda: ServegraphTarget(config, model),
        "vllm": lambda: BareVllmTarget(spec, local_model_dir(spec)),
        "ray-llm": lambda: RayServeLLMTarget(spec, local_model_dir(spec), None),
        "ray-llm-0ms": lambda: RayServeLLMTarget(spec, local_model_dir(spec), 0),
    }
    return spec, [makers[name]() for name in names]
