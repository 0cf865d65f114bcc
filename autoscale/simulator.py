"""A discrete-time model of one model's engine deployment under Serve, driven by an autoscaling policy.

What it models, and from where:
- *Routing and queues* as in the graph: a request goes to the ready replica with the fewest
  requests that has one of its `max_ongoing_requests` slots free, else waits in Serve's queue
  (FIFO, `max_queued_requests` long; past it, 503). With no replica up, a request waits at most
  the model's `cold_start_timeout_s` (then 503 `model_starting`).
- *Inside a replica*, vLLM runs up to `max_num_seqs` requests in one batch, and fewer when the KV
  cache is full; the rest wait in vLLM's queue. A request admitted beside `k - 1` others gets its
  first token `ttft_s(k)` later, then one token per `tpot_s(k)` (the batch as it changes), from
  the benchmark's calibration (autoscale/capacity.py). With `shared_compute`, replicas share one
  processor (CPU engines all pin the same core here): each step takes the sum of the busy
  replicas' step times, and a replica still starting counts as busy (it loads on that processor).
- *Replica lifecycle*: a replica Serve adds serves `startup_s` later; one it removes first stops
  taking requests, then finishes those it holds (and is counted in GPU-hours until it has).
- *What the policy sees*: replicas record their signals every `record_interval_s` and send them
  every `metrics_interval_s`; handles send their counts every `handle_push_s`; Serve averages
  each over `look_back_s`. The policy (autoscale/engine_policy.py, the same objects Serve's
  controller calls) decides every `control_period_s`.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from servegraph.autoscale.capacity import EngineCapacity
from servegraph.autoscale.engine_policy import EngineReport, ScalingInputs
from servegraph.autoscale.traces import TraceRequest

Policy = Callable[[ScalingInputs, dict[str, Any]], tuple[int, dict[str, Any]]]


@dataclass(frozen=True)
class EngineSetup:
    """One model's engine deployment as the simulator needs it (see `setup_from_spec`)."""

    max_num_seqs: int
    max_ongoing_requests: int
    max_queued_requests: int
    min_replicas: int
    max_replicas: int
    initial_replicas: int
    kv_cache_tokens: int
    cold_start_timeout_s: float
    gpus_per_replica: float = 1.0
    shared_compute: bool = False


@dataclass(frozen=True)
class Timing:
    """How often things happen in Serve (defaults: this project's engine settings)."""

    control_period_s: float = 0.5  # RAY_SERVE_CONTROL_LOOP_INTERVAL_S in graphs/local_cluster.py
    handle_push_s: float = 10.0  # RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S
    metrics_interval_s: float = 10.0  # replicas' push period (autoscaling_config.metrics_interval_s)
    look_back_s: float = 15.0
    dt_s: float = 0.05

    @property
    def record_interval_s(self) -> float:
        return min(self.look_back_s * 0.2, self.metrics_interval_s)  # Serve's replica recording period


@dataclass
class SimRequest:
    trace: TraceRequest
    prompt_tokens: int
    max_tokens: int
    arrival_s: float
    admitted_s: float | None = None  # into a vLLM batch
    first_token_s: float | None = None
    first_due_s: float = math.inf
    generated: float = 0.0
    done_s: float | None = None
    rejected: str | None = None
    in_engine_s: float | None = None  # reached a replica (vLLM's clock for TTFT starts here)

    @property
    def context_tokens(self) -> float:
        return self.prompt_tokens + self.generated

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.done_s is None else self.done_s - self.arrival_s


@dataclass
class SimReplica:
    ready_s: float
    stopping: bool = False
    running: list[SimRequest] = field(default_factory=list)
    waiting: collections.deque[SimRequest] = field(default_factory=collections.deque)
    ttft_sum: float = 0.0
    ttft_count: int = 0
    samples: list[tuple[float, EngineReport]] = field(default_factory=list)

    def ready(self, now: float) -> bool:
        return now >= self.ready_s

    @property
    def ongoing(self) -> int:
        return len(self.running) + len(self.waiting)

    def kv_usage(self, setup: EngineSetup) -> float:
        return sum(r.context_tokens for r in self.running) / setup.kv_cache_tokens


@dataclass(frozen=True)
class TimelinePoint:
    at_s: float
    replicas: int  # ready to serve
    target: int
    starting: int
    queued: int  # waiting in Serve's queue and in vLLM's
    running: int


@dataclass
class SimResult:
    requests: list[SimRequest]
    timeline: list[TimelinePoint]
    replica_seconds: float  # every replica that holds a GPU: starting, serving, draining
    gpus_per_replica: float

    @property
    def gpu_hours(self) -> float:
        return self.replica_seconds * self.gpus_per_replica / 3600


def _mean_in_window(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    values = [v for at, v in samples if start < at <= end]
    return sum(values) / len(values) if values else None


class Simulation:
    """One run: a trace through one engine deployment under one policy."""

    def __init__(self, setup: EngineSetup, capacity: EngineCapacity, policy: Policy, timing: Timing = Timing()) -> None:
        self.setup, self.capacity, self.policy, self.timing = setup, capacity, policy, timing
        self.replicas = [SimReplica(ready_s=0.0) for _ in range(setup.initial_replicas)]
        self.serve_queue: collections.deque[SimRequest] = collections.deque()
        self.handle_samples: list[tuple[float, float, float]] = []  # (at, ongoing, queued)
        self.state: dict[str, Any] = {}
        self.target = setup.initial_replicas
        self.replica_seconds = 0.0
        self.requests: list[SimRequest] = []
        self.timeline: list[TimelinePoint] = []

    # --- requests -----------------------------------------------------------------------------
    def _arrive(self, request: SimRequest, now: float) -> None:
        self.requests.append(request)
        if len(self.serve_queue) >= self.setup.max_queued_requests and not self._free_replica(now):
            request.rejected = "overloaded"
            return
        self.serve_queue.append(request)

    def _free_replica(self, now: float) -> SimReplica | None:
        candidates = [
            r for r in self.replicas if r.ready(now) and not r.stopping and r.ongoing < self.setup.max_ongoing_requests
        ]
        return min(candidates, key=lambda r: r.ongoing, default=None)

    def _dispatch(self, now: float) -> None:
        if not any(r.ready(now) and not r.stopping for r in self.replicas):
            while self.serve_queue and now - self.serve_queue[0].arrival_s > self.setup.cold_start_timeout_s:
                self.serve_queue.popleft().rejected = "model_starting"
        while self.serve_queue:
            replica = self._free_replica(now)
            if replica is None:
                return
            request = self.serve_queue.popleft()
            request.in_engine_s = now
            replica.waiting.append(request)

    def _sharing(self, now: float) -> list[SimReplica]:
        """The replicas taking turns on the processor: those running requests and, when replicas
        share it, those starting (loading a model keeps a core as busy as a batch does)."""
        if not self.setup.shared_compute:
            return [r for r in self.replicas if r.running]
        return [r for r in self.replicas if r.running or not r.ready(now)]

    def _step_time(self, replica: SimReplica, busy: list[SimReplica], per_batch: Callable[[float], float]) -> float:
        if not self.setup.shared_compute:
            return per_batch(len(replica.running))
        return sum(per_batch(len(r.running)) for r in busy)

    def _admit(self, replica: SimReplica, busy: list[SimReplica], now: float) -> None:
        kv = sum(r.context_tokens for r in replica.running)
        while replica.waiting and len(replica.running) < self.setup.max_num_seqs:
            request = replica.waiting[0]
            if replica.running and kv + request.prompt_tokens + request.max_tokens > self.setup.kv_cache_tokens:
                return
            replica.waiting.popleft()
            replica.running.append(request)
            kv += request.prompt_tokens
            request.admitted_s = now
            batch = len(replica.running)
            ttft = self.capacity.ttft_s(batch)
            if self.setup.shared_compute and len(busy) > 1:  # other replicas' steps take turns with this one's
                ttft *= self._step_time(replica, busy, self.capacity.tpot_s) / self.capacity.tpot_s(batch)
            request.first_due_s = now + ttft

    def _advance(self, replica: SimReplica, busy: list[SimReplica], now: float, dt: float) -> None:
        tpot = self._step_time(replica, busy, self.capacity.tpot_s) if replica.running else 0.0
        still = []
        for request in replica.running:
            if request.first_token_s is None:
                if now + dt < request.first_due_s:
                    still.append(request)
                    continue
                request.first_token_s = request.first_due_s
                request.generated = 1.0
                replica.ttft_sum += request.first_due_s - (request.in_engine_s or request.arrival_s)
                replica.ttft_count += 1
                decode_s = now + dt - request.first_due_s
            else:
                decode_s = dt
            request.generated += decode_s / tpot
            if request.generated >= request.max_tokens:
                overshoot = (request.generated - request.max_tokens) * tpot
                request.done_s = max(request.first_token_s, now + dt - overshoot)
                request.generated = request.max_tokens
            else:
                still.append(request)
        replica.running = still

    # --- what Serve's controller sees ---------------------------------------------------------
    def _record(self, now: float) -> None:
        for replica in self.replicas:
            if not replica.ready(now):
                continue
            ttft = replica.ttft_sum / replica.ttft_count if replica.ttft_count else None
            replica.ttft_sum, replica.ttft_count = 0.0, 0
            report = EngineReport(len(replica.running), len(replica.waiting), replica.kv_usage(self.setup), ttft)
            replica.samples.append((now, report))
        in_replicas = sum(r.ongoing for r in self.replicas)
        self.handle_samples.append((now, in_replicas + len(self.serve_queue), float(len(self.serve_queue))))
        oldest = now - self.timing.look_back_s - max(self.timing.metrics_interval_s, self.timing.handle_push_s) - 1
        for replica in self.replicas:
            replica.samples = [(at, s) for at, s in replica.samples if at > oldest]
        self.handle_samples = [sample for sample in self.handle_samples if sample[0] > oldest]

    def _delivered(self, now: float, period: float) -> float:
        """The time of the last push: what the controller has seen by now."""
        return math.floor(now / period) * period

    def _engine_report(self, replica: SimReplica, now: float) -> EngineReport | None:
        end = self._delivered(now, self.timing.metrics_interval_s)
        window = [s for at, s in replica.samples if end - self.timing.look_back_s < at <= end]
        if not window:
            return None
        ttfts = [s.ttft_s for s in window if s.ttft_s is not None]
        return EngineReport(
            running=sum(s.running for s in window) / len(window),
            waiting=sum(s.waiting for s in window) / len(window),
            kv_cache_usage=sum(s.kv_cache_usage for s in window) / len(window),
            ttft_s=ttfts[-1] if ttfts else None,  # Serve holds the last reported value
        )

    def inputs(self, now: float) -> ScalingInputs:
        end = self._delivered(now, self.timing.handle_push_s)
        start = end - self.timing.look_back_s
        ongoing = _mean_in_window([(at, o) for at, o, _ in self.handle_samples], start, end) or 0.0
        queued = _mean_in_window([(at, q) for at, _, q in self.handle_samples], start, end) or 0.0
        serving = [r for r in self.replicas if r.ready(now) and not r.stopping]
        reports = [self._engine_report(r, now) for r in serving]
        return ScalingInputs(
            now=now,
            running_replicas=len(serving),
            target_replicas=self.target,
            min_replicas=self.setup.min_replicas,
            max_replicas=self.setup.max_replicas,
            ongoing_requests=ongoing,
            queued_requests=queued,
            engines=tuple(r for r in reports if r is not None),
        )

    def _scale(self, now: float) -> None:
        self.target, self.state = self.policy(self.inputs(now), self.state)
        live = [r for r in self.replicas if not r.stopping]
        for _ in range(self.target - len(live)):
            self.replicas.append(SimReplica(ready_s=now + self.capacity.startup_s))
        if len(live) > self.target:
            # Serve stops replicas still starting first, then the ones holding the fewest requests.
            order = sorted(live, key=lambda r: (r.ready(now), r.ongoing))
            for replica in order[: len(live) - self.target]:
                replica.stopping = True
                for request in replica.waiting:  # not started in vLLM: Serve retries them elsewhere
                    self.serve_queue.appendleft(request)
                replica.waiting.clear()

    # --- the loop -----------------------------------------------------------------------------
    def run(self, trace: list[TraceRequest], duration_s: float | None = None) -> SimResult:
        timing, dt = self.timing, self.timing.dt_s
        end_s = duration_s if duration_s is not None else (trace[-1].at_s if trace else 0.0) + 60
        pending = collections.deque(sorted(trace, key=lambda r: r.at_s))
        next_record = next_control = next_point = 0.0
        now = 0.0
        while now < end_s:
            while pending and pending[0].at_s <= now:
                item = pending.popleft()
                self._arrive(SimRequest(item, item.prompt_tokens, item.max_tokens, item.at_s), now)
            self._dispatch(now)
            busy = self._sharing(now)
            for replica in self.replicas:
                if replica.ready(now):
                    self._admit(replica, busy, now)
            busy = self._sharing(now)
            for replica in self.replicas:
                self._advance(replica, busy, now, dt)
            self.replicas = [r for r in self.replicas if not (r.stopping and not r.running and not r.waiting)]
            self.replica_seconds += len(self.replicas) * dt
            if now >= next_record:
                self._record(now)
                next_record += timing.record_interval_s
            if now >= next_control:
                self._scale(now)
                next_control += timing.control_period_s
            if now >= next_point:
                self.timeline.append(self._point(now))
                next_point += 1.0
            now += dt
        for request in self.serve_queue:
            request.rejected = request.rejected or "unfinished"
        return SimResult(self.requests, self.timeline, self.replica_seconds, self.setup.gpus_per_replica)

    def _point(self, now: float) -> TimelinePoint:
        ready = [r for r in self.replicas if r.ready(now)]
        return TimelinePoint(
            at_s=now,
            replicas=sum(1 for r in ready if not r.stopping),  # Serve's RUNNING: a draining one is STOPPING
            target=self.target,
            starting=len(self.replicas) - len(ready),
            queued=len(self.serve_queue) + sum(len(r.waiting) for r in self.replicas),
            running=sum(len(r.running) for r in self.replicas),
        )


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between ranks, as numpy's default."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """What `servegraph simulate` prints per model and policy."""

    requests: int
    served: int
    rejected: int
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    e2e_p50_s: float | None
    e2e_p99_s: float | None
    slo_misses: int  # served with TTFT over the SLO, plus rejected
    gpu_hours: float
    peak_replicas: int
    mean_replicas: float

    @classmethod
    def of(cls, result: SimResult, ttft_slo_s: float | None) -> Summary:
        served = [r for r in result.requests if r.done_s is not None]
        ttfts = [r.ttft_s for r in served if r.ttft_s is not None]
        e2es = [r.e2e_s for r in served if r.e2e_s is not None]
        rejected = [r for r in result.requests if r.rejected]
        late = sum(1 for t in ttfts if ttft_slo_s is not None and t > ttft_slo_s)
        replicas = [p.replicas for p in result.timeline]
        return cls(
            requests=len(result.requests),
            served=len(served),
            rejected=len(rejected),
            ttft_p50_s=percentile(ttfts, 50),
            ttft_p99_s=percentile(ttfts, 99),
            e2e_p50_s=percentile(e2es, 50),
            e2e_p99_s=percentile(e2es, 99),
            slo_misses=late + len(rejected),
            gpu_hours=result.gpu_hours,
            peak_replicas=max(replicas, default=0),
            mean_replicas=sum(replicas) / len(replicas) if replicas else 0.0,
        )
