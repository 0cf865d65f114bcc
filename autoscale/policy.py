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


def engine_autoscaling(spec: ModelSpec) -> dict[str, Any]:
    return engine_scaling(spec).serve_config()


def replicas_for_load(scaling: StageScaling, ongoing_requests: float) -> int:
    """The replica count Serve's default policy settles on for a steady load (for planning and docs)."""
    wanted = math.ceil(ongoing_requests / scaling.target_ongoing_requests) if ongoing_requests > 0 else 0
    return min(max(wanted, scaling.min_replicas), scaling.max_replicas)
