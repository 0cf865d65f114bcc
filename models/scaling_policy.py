"""What an engine replica reports to the engine-signals autoscaling policy: vLLM's own queue, batch,
KV cache and TTFT (the policy: autoscale/engine_policy.py; its config: spec.py's ScalingPolicyConfig).

vLLM hands every stat logger its scheduler's stats each engine step (`SchedulerStats`:
running and waiting requests, KV-cache use) and the time to first token of each request that got
its first token in that step (`IterationStats`). `EngineLoad` keeps the latest of the first and a
running sum of the second (O(1) per step, no list that grows between reports); Serve calls the
engine's `record_autoscaling_stats` every few seconds, which returns `report()`. The metric names
are the contract between the engine deployment and the policy that reads them.
"""

from __future__ import annotations

from typing import Any

RUNNING = "servegraph_vllm_running"
WAITING = "servegraph_vllm_waiting"
KV_CACHE_USAGE = "servegraph_vllm_kv_cache_usage"
TTFT_S = "servegraph_vllm_ttft_s"


class EngineLoad:
    """vLLM's latest scheduler stats and the mean TTFT of first tokens since the last report."""

    def __init__(self) -> None:
        self._running = 0
        self._waiting = 0
        self._kv_cache_usage = 0.0
        self._ttft_sum_s = 0.0
        self._ttft_count = 0

    def observe(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        self._running, self._waiting, self._kv_cache_usage = running, waiting, kv_cache_usage

    def observe_first_tokens(self, ttfts_s: list[float]) -> None:
        if ttfts_s:
            self._ttft_sum_s += sum(ttfts_s)
            self._ttft_count += len(ttfts_s)

    def report(self, unfinished: int) -> dict[str, float]:
        """The signals since the last report. unfinished: the engine's unfinished requests now.

        vLLM sends stats only while it steps, so an engine that went idle still holds its last
        busy step's; no unfinished request means an empty batch and queue. TTFT is left out when
        no request got its first token since the last report: Serve keeps the last value it got
        for the look-back window instead of averaging a made-up zero in.
        """
        idle = unfinished == 0
        signals = {
            RUNNING: 0.0 if idle else float(self._running),
            WAITING: 0.0 if idle else float(self._waiting),
            KV_CACHE_USAGE: 0.0 if idle else self._kv_cache_usage,
        }
        if self._ttft_count:
            signals[TTFT_S] = self._ttft_sum_s / self._ttft_count
        self._ttft_sum_s, self._ttft_count = 0.0, 0
        return signals

    def stat_logger(self, vllm_config: Any, engine_index: int = 0) -> Any:
        """vLLM's per-engine stat logger factory (`AsyncLLM(stat_loggers=[...])`): a logger feeding this.

        vLLM is imported here, not at the top: the engine deployment's module imports this one in
        processes that never load vLLM (the graph's builder).
        """
        from vllm.v1.metrics.loggers import StatLoggerBase

        load = self

        class LoadStatLogger(StatLoggerBase):
            """Called by vLLM once per engine step with what the step did; keeps what autoscaling reads."""

            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:  # fmt: skip
                if scheduler_stats is not None:
                    stats = scheduler_stats
                    load.observe(stats.num_running_reqs, stats.num_waiting_reqs, stats.kv_cache_usage)
                if iteration_stats is not None:
                    load.observe_first_tokens(iteration_stats.time_to_first_tokens_iter)

            def log_engine_initialized(self) -> None:
                pass

        return LoadStatLogger(vllm_config, engine_index)
