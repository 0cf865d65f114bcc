"""Serve autoscaling configs per stage kind, and an engine's from its batch capacity.

Serve's request-based autoscaler keeps each replica near `target_ongoing_requests`. Light
stages hold a request for its whole life (the ingress and postprocess relay streams) and cost
little per request, so their targets are high; an engine's target is a share of the batch it
can run at once (max_num_seqs), so replicas are added before requests wait for a batch slot.
A `deployments:` entry with `autoscaling_config` in the Serve YAML replaces any of these.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from servegraph.autoscale.engine_policy import EngineSignalsSettings
from servegraph.models.spec import ModelSpec


class StageKind(str, Enum):
    ingress = "ingress"
    tokenizer = "tokenizer"
    router = "router"
    postprocess = "postprocess"


@dataclass(frozen=True)
class StageScaling:
    """The Serve `autoscaling_config` fields this project sets; Serve's defaults cover the rest."""

    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float
    initial_replicas: int | None = None
    upscale_delay_s: float = 10
    downscale_delay_s: float = 120
    downscale_to_zero_delay_s: float | None = None
    look_back_period_s: float = 15

    def serve_config(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


STAGE_DEFAULTS: dict[StageKind, StageScaling] = {
    # Relays every stream for its whole length: a replica holds many cheap, mostly idle requests.
    StageKind.ingress: StageScaling(min_replicas=1, max_replicas=4, target_ongoing_requests=128),
    # Short CPU-bound calls (chat template, encoding).
    StageKind.tokenizer: StageScaling(min_replicas=1, max_replicas=4, target_ongoing_requests=32),
    # Answers one registry fetch per ingress replica; never on the request path.
    StageKind.router: StageScaling(min_replicas=1, max_replicas=1, target_ongoing_requests=64),
    # Detokenizes every stream for its whole length.
    StageKind.postprocess: StageScaling(min_replicas=1, max_replicas=4, target_ongoing_requests=128),
}


def stage_autoscaling(kind: StageKind) -> dict[str, Any]:
    return STAGE_DEFAULTS[kind].serve_config()


def engine_scaling(spec: ModelSpec) -> StageScaling:
    bounds = spec.autoscaling
    return StageScaling(
        min_replicas=bounds.min_replicas,
        max_replicas=bounds.max_replicas,
        initial_replicas=bounds.initial_replicas,
        target_ongoing_requests=max(1.0, bounds.target_batch_fill * spec.max_num_seqs),
        upscale_delay_s=bounds.upscale_delay_s,
        downscale_delay_s=bounds.downscale_delay_s,
        downscale_to_zero_delay_s=bounds.downscale_to_zero_delay_s,
    )


ENGINE_SIGNALS_POLICY = "servegraph.autoscale.serve_policy:EngineSignalsAutoscaler"


def engine_signals_settings(spec: ModelSpec) -> EngineSignalsSettings:
    """The engine-signals policy's knobs for a model whose `autoscaling.policy` is set."""
    bounds, policy = spec.autoscaling, spec.autoscaling.policy
    assert policy is not None
    return EngineSignalsSettings(
        max_num_seqs=spec.max_num_seqs,
        ttft_slo_s=policy.ttft_slo_s,
        batch_fill=policy.batch_fill,
        kv_cache_target=policy.kv_cache_target,
        downscale_below=policy.downscale_below,
        upscale_delay_s=bounds.upscale_delay_s,
        downscale_delay_s=bounds.downscale_delay_s,
        downscale_to_zero_delay_s=bounds.downscale_to_zero_delay_s,
    )


def engine_autoscaling(spec: ModelSpec) -> dict[str, Any]:
    """Serve's autoscaling_config of a model's engine: Serve's default policy, or ours when the model names it.

    With ours, Serve's own delays are 0: the policy applies the model's delays itself (the same
    rules), so the simulator, which runs the policy without Serve, sees the same cool-downs.
    Replicas then report every `metrics_interval_s` (Serve's deprecated field, still the replicas'
    push period) over a shorter window than Serve's default, so the policy sees a burst in seconds.
    """
    config = engine_scaling(spec).serve_config()
    policy = spec.autoscaling.policy
    if policy is None:
        return config
    return {
        **config,
        "upscale_delay_s": 0,
        "downscale_delay_s": 0,
        "downscale_to_zero_delay_s": 0,
        "look_back_period_s": policy.look_back_period_s,
        "metrics_interval_s": policy.metrics_interval_s,
        "policy": {"policy_function": ENGINE_SIGNALS_POLICY, "policy_kwargs": asdict(engine_signals_settings(spec))},
    }


def replicas_for_load(scaling: StageScaling, ongoing_requests: float) -> int:
    """The replica count Serve's default policy settles on for a steady load (for planning and docs)."""
    wanted = math.ceil(ongoing_requests / scaling.target_ongoing_requests) if ongoing_requests > 0 else 0
    return min(max(wanted, scaling.min_replicas), scaling.max_replicas)
