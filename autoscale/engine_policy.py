"""Engine autoscaling decisions as plain functions of what the replicas report: no Ray in here.

Two policies share the same inputs, delays and bounds, so the simulator (autoscale/simulator.py)
runs the very code Serve's controller runs (autoscale/serve_policy.py adapts Serve's context):

- `EngineSignalsPolicy` scales on what vLLM reports: the batch and queue against max_num_seqs,
  KV-cache use against a target, recent TTFT against the model's SLO. The busiest signal wins.
- `OngoingRequestsPolicy` is Serve's default (ongoing requests per replica against a target),
  written out for the simulator; on the cluster Serve's own code runs it.

Cool-downs are Serve's rules: a wish to scale must hold for `upscale_delay_s` (or
`downscale_delay_s`) before it is acted on, and 1 -> 0 waits `downscale_to_zero_delay_s`. With no
replica running and requests waiting, one starts at once (Serve's cold-start path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Keys of this module's own entries in Serve's per-deployment policy state.
DIRECTION = "servegraph_wish_direction"  # +1 wants more replicas, -1 fewer, 0 neither
WISH_SINCE = "servegraph_wish_since"  # when the current wish started


@dataclass(frozen=True)
class EngineReport:
    """One engine replica's signals, averaged over the look-back window."""

    running: float
    waiting: float
    kv_cache_usage: float
    ttft_s: float | None  # None: no request got its first token within the window


@dataclass(frozen=True)
class ScalingInputs:
    """Everything a decision reads: time, replica counts, Serve's request counts, engine reports."""

    now: float
    running_replicas: int
    target_replicas: int
    min_replicas: int
    max_replicas: int
    ongoing_requests: float  # Serve's count: in replicas plus queued in handles, window mean
    queued_requests: float  # waiting in Serve's handles for a replica slot
    engines: tuple[EngineReport, ...] = ()


@dataclass(frozen=True)
class CoolDowns:
    upscale_delay_s: float = 0.0
    downscale_delay_s: float = 0.0
    downscale_to_zero_delay_s: float | None = None

    def settle(self, wanted: int, inputs: ScalingInputs, state: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Serve's delay rules: act on a wish only once it has held for its delay; else keep the target."""
        target = inputs.target_replicas
        direction = (wanted > target) - (wanted < target)
        if direction == 0:
            return target, {**state, DIRECTION: 0, WISH_SINCE: None}
        since = state.get(WISH_SINCE) if state.get(DIRECTION) == direction else None
        since = inputs.now if since is None else since
        if direction > 0:
            delay = self.upscale_delay_s
        elif target == 1:
            to_zero = self.downscale_to_zero_delay_s
            delay = to_zero if to_zero is not None else self.downscale_delay_s
        else:
            delay, wanted = self.downscale_delay_s, max(1, wanted)  # to zero only from one replica
        if inputs.now - since + 1e-6 >= delay:
            return wanted, {**state, DIRECTION: 0, WISH_SINCE: None}
        return target, {**state, DIRECTION: direction, WISH_SINCE: since}


def bounded(replicas: int, inputs: ScalingInputs) -> int:
    return min(max(replicas, inputs.min_replicas), inputs.max_replicas)


def decide(wanted: float, inputs: ScalingInputs, cool_downs: CoolDowns, state: dict[str, Any]) -> tuple[int, dict]:
    """The replica count to set: a cold start at once, else the wish bounded and delayed."""
    if inputs.running_replicas == 0 and inputs.ongoing_requests > 0:
        return bounded(max(1, inputs.target_replicas), inputs), state
    if inputs.running_replicas == 0:
        return inputs.target_replicas, state  # nothing runs and nothing waits: leave a starting replica be
    replicas, state = cool_downs.settle(bounded(math.ceil(wanted - 1e-9), inputs), inputs, state)
    return bounded(replicas, inputs), state


@dataclass(frozen=True)
class OngoingRequestsPolicy:
    """Serve's default: replicas = running replicas x ongoing requests / (target x running replicas)."""

    target_ongoing_requests: float
    cool_downs: CoolDowns = CoolDowns()

    def wanted(self, inputs: ScalingInputs) -> float:
        return inputs.ongoing_requests / self.target_ongoing_requests

    def __call__(self, inputs: ScalingInputs, state: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return decide(self.wanted(inputs), inputs, self.cool_downs, state)


@dataclass(frozen=True)
class EngineSignalsSettings:
    """The policy's knobs (models/scaling_policy.py's config plus the model's batch size and delays).

    Plain JSON values: Serve passes them to the policy as its `policy_kwargs`.
    """

    max_num_seqs: int
    ttft_slo_s: float | None = None
    batch_fill: float = 1.0
    kv_cache_target: float = 0.85
    downscale_below: float = 0.6
    upscale_delay_s: float = 0.0
    downscale_delay_s: float = 0.0
    downscale_to_zero_delay_s: float | None = None


class EngineSignalsPolicy:
    """Scale so the busiest engine signal sits at its target.

    Each signal is a ratio to its target (1.0 = at target), averaged over the replicas:
    - `batch`: (running + waiting in vLLM) per replica, plus Serve's queued requests spread over
      the replicas, against batch_fill x max_num_seqs;
    - `kv_cache`: KV-cache use against kv_cache_target;
    - `ttft`: recent TTFT against the model's SLO (when it has one and a first token was seen).
    Above 1, replicas grow in proportion (running x ratio). Below `downscale_below` for every
    signal, they shrink to the count that brings the busiest back to `downscale_below` (so a
    shrink does not overshoot into a grow). In between, nothing changes. No request in the
    window wants zero replicas (min_replicas and the 1 -> 0 delay still apply).
    """

    def __init__(self, settings: EngineSignalsSettings) -> None:
        self.settings = settings
        self.cool_downs = CoolDowns(
            settings.upscale_delay_s, settings.downscale_delay_s, settings.downscale_to_zero_delay_s
        )

    def signals(self, inputs: ScalingInputs) -> dict[str, float]:
        """Each signal's ratio to its target, over the replicas that reported (none: Serve's own count)."""
        s, replicas = self.settings, max(inputs.running_replicas, 1)
        batch_capacity = s.batch_fill * s.max_num_seqs
        reports = inputs.engines
        if not reports:
            return {"batch": inputs.ongoing_requests / (batch_capacity * replicas)}
        in_engines = sum(r.running + r.waiting for r in reports) / len(reports)
        ratios = {
            "batch": (in_engines + inputs.queued_requests / replicas) / batch_capacity,
            "kv_cache": sum(r.kv_cache_usage for r in reports) / len(reports) / s.kv_cache_target,
        }
        ttfts = [r.ttft_s for r in reports if r.ttft_s is not None]
        if s.ttft_slo_s is not None and ttfts:
            ratios["ttft"] = sum(ttfts) / len(ttfts) / s.ttft_slo_s
        return ratios

    def idle(self, inputs: ScalingInputs) -> bool:
        """Nothing in flight and no first token within the window.

        Serve samples request counts every few seconds, so light traffic of short requests can
        read as zero; a replica reports a TTFT only when a request got its first token since its
        last report, and Serve keeps it for the look-back window: it sees every served request.
        """
        served = any(r.running or r.waiting or r.ttft_s is not None for r in inputs.engines)
        return inputs.ongoing_requests <= 0 and inputs.queued_requests <= 0 and not served

    def wanted(self, inputs: ScalingInputs) -> float:
        if self.idle(inputs):
            return 0
        replicas = inputs.running_replicas
        busiest = max(self.signals(inputs).values())
        if busiest > 1:
            return replicas * busiest
        if busiest < self.settings.downscale_below:
            return max(1.0, replicas * busiest / self.settings.downscale_below)
        return replicas

    def __call__(self, inputs: ScalingInputs, state: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        wanted = self.wanted(inputs)
        if starting_replicas_still_needed(wanted, inputs):
            return inputs.target_replicas, {**state, DIRECTION: 0, WISH_SINCE: None}
        return decide(wanted, inputs, self.cool_downs, state)


def starting_replicas_still_needed(wanted: float, inputs: ScalingInputs) -> bool:
    """Replicas asked for are still starting and the running ones are all still wanted: hold.

    The signals come from the running replicas only, so while a scale-up is starting they
    read "enough" as soon as one TTFT window passes without a first token (a long stream), and
    a downscale would stop the replica that was about to relieve them (seen: 1 -> 2 -> 1 every
    few seconds, the second replica never finishing its start). A downscale waits until every
    replica asked for runs, unless fewer than the running ones would do.
    """
    return inputs.running_replicas <= wanted < inputs.target_replicas  # so some replicas are still starting
