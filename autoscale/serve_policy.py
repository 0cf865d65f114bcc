"""Serve's side of the engine-signals policy: AutoscalingContext in, autoscale/engine_policy.py's decision out.

Serve's controller imports this class from `autoscaling_config.policy.policy_function` and makes
one instance per deployment with `policy_kwargs` (EngineSignalsSettings' fields). Serve then
applies its own scaling factors (1), delays (0: the policy applies the model's own, with the
same rules) and bounds to what the policy returns.
"""

from __future__ import annotations

from typing import Any

from servegraph.autoscale.engine_policy import (
    EngineReport,
    EngineSignalsPolicy,
    EngineSignalsSettings,
    ScalingInputs,
)
from servegraph.models.scaling_policy import KV_CACHE_USAGE, RUNNING, TTFT_S, WAITING


def engine_reports(aggregated: dict[str, dict[Any, float]] | None, replicas: list[Any]) -> tuple[EngineReport, ...]:
    """The reports of the running replicas that sent any (a replica just started has not yet)."""
    aggregated = aggregated or {}
    running, waiting = aggregated.get(RUNNING, {}), aggregated.get(WAITING, {})
    kv_cache, ttft = aggregated.get(KV_CACHE_USAGE, {}), aggregated.get(TTFT_S, {})
    return tuple(
        EngineReport(running[r], waiting.get(r, 0.0), kv_cache.get(r, 0.0), ttft.get(r))
        for r in replicas
        if r in running
    )


def scaling_inputs(ctx: Any) -> ScalingInputs:
    """What the policy reads, from Serve's AutoscalingContext."""
    return ScalingInputs(
        now=ctx.current_time,
        running_replicas=ctx.current_num_replicas,
        target_replicas=ctx.target_num_replicas,
        min_replicas=ctx.capacity_adjusted_min_replicas,
        max_replicas=ctx.capacity_adjusted_max_replicas,
        ongoing_requests=ctx.total_num_requests,
        queued_requests=ctx.total_queued_requests or 0.0,
        engines=engine_reports(ctx.aggregated_metrics, ctx.running_replicas),
    )


class EngineSignalsAutoscaler:
    """Serve's custom autoscaling policy (a class: one instance per deployment, called every control loop)."""

    def __init__(self, **settings: Any) -> None:
        self._policy = EngineSignalsPolicy(EngineSignalsSettings(**settings))

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        return self._policy(scaling_inputs(ctx), dict(ctx.policy_state))
