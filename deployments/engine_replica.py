"""What the Engine and Embedder deployments share: a replica that runs one vLLM AsyncLLM.

Both start vLLM the same way, count what their engine did in the same shape, and answer Serve's
health check, the admin app's `stats` and Serve's shutdown alike; this module holds that once so
the two engine deployments cannot drift apart (engine.py generates, embedder.py pools).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from servegraph.deployments.stage_process import drop_serve_access_lines
from servegraph.models import cpu_amx
from servegraph.models.spec import ModelSpec


@dataclass
class ReplicaCounters:
    """What this replica's engine did, for tests and the admin app; each deployment adds the tokens it counts."""

    started: int = 0
    finished: int = 0
    aborted: int = 0
    crashed: int = 0


def prepare_vllm_environment(spec: ModelSpec) -> None:
    """Call before importing vLLM: its logging setup (dictConfig at import) would close Serve's log
    handlers, and the replica would log nothing, request ids included; and the AMX plugin in vLLM's
    engine processes reads the spec's mode from the environment."""
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    os.environ[cpu_amx.MODE_ENV] = spec.cpu_amx


def start_async_llm(kwargs: dict[str, Any], *stat_loggers: Any) -> Any:
    """vLLM's AsyncLLM on kwargs, its vllm:* series exported through Ray's metrics (and fed to
    stat_loggers); Serve's per-call access lines are dropped first, as in every inner stage."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    drop_serve_access_lines()
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), stat_loggers=[RayPrometheusStatLogger, *stat_loggers])


class AsyncLLMReplica:
    """Serve's hooks and the admin app's `stats` for a deployment whose replica runs one AsyncLLM
    (`_engine`) and counts its work in `_counters`."""

    _engine: Any
    _counters: ReplicaCounters

    def stats(self) -> dict[str, int]:
        return {**asdict(self._counters), "unfinished": self._engine.get_num_unfinished_requests()}

    async def check_health(self) -> None:
        await self._engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()
