"""Request traces to replay: synthetic (bursty, diurnal) or read from the graph's usage log.

A trace is arrival times (seconds from its start) with each request's prompt and output
lengths. Synthetic traces draw Poisson arrivals from a rate that changes over time, with a
seed, so a simulation and a live replay of the same trace send the same requests.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TraceRequest:
    at_s: float
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class Burst:
    start_s: float
    length_s: float
    rate: float  # requests per second during the burst


def poisson_arrivals(rate_at: Callable[[float], float], duration_s: float, peak: float, seed: int) -> list[float]:
    """Arrivals of a Poisson process whose rate changes with time (thinning; peak >= every rate)."""
    rng, at, arrivals = random.Random(seed), 0.0, []
    if peak <= 0:
        return arrivals
    while True:
        at += rng.expovariate(peak)
        if at >= duration_s:
            return arrivals
        if rng.random() * peak < rate_at(at):
            arrivals.append(at)


def bursty(
    duration_s: float,
    base_rate: float,
    bursts: list[Burst],
    prompt_tokens: int = 32,
    max_tokens: int = 16,
    seed: int = 0,
) -> list[TraceRequest]:
    """A steady base rate with bursts on top of it."""

    def rate_at(t: float) -> float:
        return base_rate + sum(b.rate for b in bursts if b.start_s <= t < b.start_s + b.length_s)

    peak = base_rate + sum(b.rate for b in bursts)
    return [TraceRequest(t, prompt_tokens, max_tokens) for t in poisson_arrivals(rate_at, duration_s, peak, seed)]


def default_bursty(
    duration_s: float = 300, base_rate: float = 0.5, burst_rate: float = 6.0, **kwargs: Any
) -> list[TraceRequest]:
    """Quiet start, two bursts (the second shorter), a quiet tail long enough to scale back down."""
    bursts = [
        Burst(0.2 * duration_s, 0.2 * duration_s, burst_rate),
        Burst(0.5 * duration_s, 0.1 * duration_s, burst_rate),
    ]
    return bursty(duration_s, base_rate, bursts, **kwargs)


def diurnal(
    duration_s: float,
    peak_rate: float,
    trough_rate: float = 0.0,
    prompt_tokens: int = 32,
    max_tokens: int = 16,
    seed: int = 0,
) -> list[TraceRequest]:
    """One day's shape squeezed into duration_s: trough at the start and end, peak in the middle."""

    def rate_at(t: float) -> float:
        return trough_rate + (peak_rate - trough_rate) * (1 - math.cos(2 * math.pi * t / duration_s)) / 2

    arrivals = poisson_arrivals(rate_at, duration_s, max(peak_rate, trough_rate), seed)
    return [TraceRequest(t, prompt_tokens, max_tokens) for t in arrivals]


def from_usage_rows(rows: list[dict[str, Any]], model: str | None = None) -> list[TraceRequest]:
    """A trace from usage records (deployments/usage.py's UsageRecord fields).

    A record is written when its request finished: it arrived `latency_s` before `time`. Its
    completion tokens stand for its max_tokens (what it generated is what it asked the engine for).
    Requests the response cache answered never reached an engine and are left out.
    """
    kept = [r for r in rows if (model is None or r["model"] == model) and not r.get("cached")]
    if not kept:
        return []
    arrivals = [(_seconds(r["time"]) - float(r["latency_s"]), r) for r in kept]
    start = min(at for at, _ in arrivals)
    trace = [
        TraceRequest(at - start, max(1, int(r["prompt_tokens"])), max(1, int(r["completion_tokens"])))
        for at, r in arrivals
    ]
    return sorted(trace, key=lambda request: request.at_s)


def _seconds(value: Any) -> float:
    return value.timestamp() if hasattr(value, "timestamp") else float(value)
