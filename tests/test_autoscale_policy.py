"""The engine-signals autoscaling policy as plain logic, its config, its Serve adapter and the engine's report."""

from unittest import mock

import pytest
from pydantic import ValidationError
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config, replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from servegraph.autoscale.engine_policy import (
    CoolDowns,
    EngineReport,
    EngineSignalsPolicy,
    EngineSignalsSettings,
    OngoingRequestsPolicy,
    ScalingInputs,
)
from servegraph.autoscale.policy import ENGINE_SIGNALS_POLICY, engine_autoscaling
from servegraph.autoscale.serve_policy import EngineSignalsAutoscaler, scaling_inputs
from servegraph.models.scaling_policy import KV_CACHE_USAGE, RUNNING, TTFT_S, WAITING, EngineLoad
from servegraph.models.spec import ModelSpec, ScalingPolicyConfig

SETTINGS = EngineSignalsSettings(max_num_seqs=8, ttft_slo_s=0.5, upscale_delay_s=2, downscale_delay_s=10,
                                 downscale_to_zero_delay_s=30)  # fmt: skip


def inputs(now=100.0, replicas=1, target=None, engines=(), ongoing=None, queued=0.0, max_replicas=4):
    """ScalingInputs; ongoing defaults to what the engines hold plus the queue."""
    if ongoing is None:
        ongoing = sum(e.running + e.waiting for e in engines) + queued
    target = replicas if target is None else target
    return ScalingInputs(now, replicas, target, 0, max_replicas, ongoing, queued, tuple(engines))


def engine(running=0.0, waiting=0.0, kv=0.0, ttft=None) -> EngineReport:
    return EngineReport(running, waiting, kv, ttft)


def settle(policy, steps):
    """Feed the policy a list of ScalingInputs in order, carrying its state; the decisions."""
    state, decisions = {}, []
    for step in steps:
        replicas, state = policy(step, state)
        decisions.append(replicas)
    return decisions


def test_a_full_batch_with_a_queue_grows_replicas_in_proportion_once_the_upscale_delay_has_passed():
    policy = EngineSignalsPolicy(SETTINGS)
    busy = [engine(running=8, waiting=8, kv=0.2, ttft=0.3)]  # twice what one replica batches
    decisions = settle(policy, [inputs(now=t, engines=busy) for t in (100, 101, 102)])
    assert decisions == [1, 1, 2]


def test_long_prompts_filling_the_kv_cache_scale_up_where_the_ongoing_target_sees_an_idle_replica():
    few_long = [engine(running=2, waiting=0, kv=0.95, ttft=0.2)]
    signals = EngineSignalsPolicy(EngineSignalsSettings(max_num_seqs=8))
    ongoing = OngoingRequestsPolicy(target_ongoing_requests=6)
    assert signals(inputs(engines=few_long), {})[0] == 2
    assert ongoing(inputs(engines=few_long), {})[0] == 1


def test_ttft_over_the_slo_scales_up_and_a_met_slo_holds():
    policy = EngineSignalsPolicy(EngineSignalsSettings(max_num_seqs=32, ttft_slo_s=0.5))
    slow = [engine(running=10, ttft=1.2), engine(running=10, ttft=0.8)]  # mean 1.0 s: twice the SLO
    assert policy(inputs(replicas=2, engines=slow), {})[0] == 4
    fine = [engine(running=10, ttft=0.4), engine(running=10, ttft=0.4)]  # 0.8 of the SLO: in the band
    assert policy(inputs(replicas=2, engines=fine), {})[0] == 2


def test_light_load_scales_down_after_its_delay_to_what_brings_the_busiest_signal_to_the_band():
    policy = EngineSignalsPolicy(SETTINGS)
    light = [engine(running=1, ttft=0.1) for _ in range(4)]  # batch 1/8, TTFT 0.2 of the SLO: the busiest
    decisions = settle(policy, [inputs(now=t, replicas=4, engines=light) for t in (0, 5, 10)])
    assert decisions == [4, 4, 2]  # ceil(4 x 0.2 / 0.6), once the 10 s delay has passed


def test_idle_goes_to_zero_only_after_the_to_zero_delay_and_a_request_brings_one_back_at_once():
    policy = EngineSignalsPolicy(SETTINGS)
    idle = [engine()]
    assert settle(policy, [inputs(now=t, engines=idle) for t in (0, 29, 30)]) == [1, 1, 0]
    cold = inputs(now=31, replicas=0, target=0, ongoing=3)
    assert policy(cold, {})[0] == 1


def test_a_request_served_within_the_window_keeps_the_last_replica_though_the_sampled_counts_read_zero():
    policy = EngineSignalsPolicy(SETTINGS)
    sparse = [engine(ttft=0.05)]  # short requests between Serve's samples: only their TTFT shows
    assert settle(policy, [inputs(now=t, engines=sparse, ongoing=0) for t in (0, 29, 30, 60)]) == [1, 1, 1, 1]


def test_a_wish_that_changes_direction_restarts_its_delay():
    policy = EngineSignalsPolicy(SETTINGS)
    busy, idle = [engine(running=8, waiting=8)], [engine()]
    steps = [inputs(now=0, engines=busy), inputs(now=1, engines=idle), inputs(now=2, engines=busy),
             inputs(now=3, engines=busy), inputs(now=4, engines=busy)]  # fmt: skip
    assert settle(policy, steps) == [1, 1, 1, 1, 2]


def test_replicas_stay_within_the_bounds_serve_passes():
    policy = EngineSignalsPolicy(EngineSignalsSettings(max_num_seqs=1))
    flooded = [engine(running=1, waiting=50)]
    assert policy(inputs(engines=flooded, max_replicas=3), {})[0] == 3


def test_without_reports_yet_the_batch_signal_falls_back_to_serves_request_count():
    policy = EngineSignalsPolicy(EngineSignalsSettings(max_num_seqs=4))
    assert policy(inputs(replicas=1, engines=(), ongoing=12), {})[0] == 3


def test_the_ongoing_requests_policy_decides_as_serves_default_does():
    """Our model of Serve's default (for the simulator) against Serve's own code, on one sequence of loads."""
    config = AutoscalingConfig(min_replicas=0, max_replicas=5, target_ongoing_requests=4, upscale_delay_s=3,
                               downscale_delay_s=5, downscale_to_zero_delay_s=8)  # fmt: skip
    serve_policy = _apply_autoscaling_config(replica_queue_length_autoscaling_policy)
    ours = OngoingRequestsPolicy(4, CoolDowns(3, 5, 8))
    loads = [0, 9, 9, 9, 9, 9, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 5]
    serve_state, our_state, running = {}, {}, 1
    serve_targets, our_targets = [], []
    for second, load in enumerate(loads):
        ctx = context(config, running, running, load, serve_state, now=1000.0 + second)
        with mock.patch("ray.serve.autoscaling_policy.time.time", return_value=1000.0 + second):
            serve_target, serve_state = serve_policy(ctx)
        our_target, our_state = ours(scaling_inputs(ctx), our_state)
        serve_targets.append(min(max(serve_target, 0), 5))
        our_targets.append(our_target)
        running = serve_targets[-1]
    assert our_targets == serve_targets
    assert max(serve_targets) == 3 and 0 in serve_targets  # the sequence went up, down and to zero


def context(config, running, target, ongoing, state, now, metrics=None):
    replicas = [ReplicaID(f"r{i}", DeploymentID("engine-x-v1", "app")) for i in range(running)]
    return AutoscalingContext(
        deployment_id=DeploymentID("engine-x-v1", "app"), deployment_name="engine-x-v1", app_name="app",
        current_num_replicas=running, target_num_replicas=target, running_replicas=replicas,
        total_num_requests=float(ongoing), total_queued_requests=0.0,
        aggregated_metrics=(metrics or (lambda ids: {}))(replicas), raw_metrics={},
        capacity_adjusted_min_replicas=config.min_replicas, capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=dict(state), last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=config,
    )  # fmt: skip


def spec_with_policy(**policy) -> ModelSpec:
    return ModelSpec(
        name="x", hub_id="org/x", max_num_seqs=8,
        autoscaling={"min_replicas": 0, "max_replicas": 3, "upscale_delay_s": 0, "downscale_delay_s": 5,
                     "downscale_to_zero_delay_s": 7, "policy": policy},
    )  # fmt: skip


def test_the_default_engine_config_keeps_serves_ongoing_requests_target():
    config = engine_autoscaling(ModelSpec(name="x", hub_id="org/x", max_num_seqs=8))
    assert "policy" not in config and config["target_ongoing_requests"] == 6
    assert AutoscalingConfig(**config).policy.is_default_policy_function()


def test_a_model_with_a_policy_gets_our_class_in_serves_config_and_serve_runs_it():
    config = AutoscalingConfig(**engine_autoscaling(spec_with_policy(ttft_slo_s=0.25)))
    assert config.policy.policy_function == ENGINE_SIGNALS_POLICY
    assert (config.upscale_delay_s, config.downscale_delay_s, config.downscale_to_zero_delay_s) == (0, 0, 0)
    assert config.policy.policy_kwargs["downscale_to_zero_delay_s"] == 7
    assert config.policy.policy_kwargs["ttft_slo_s"] == 0.25
    # What Serve's controller does with it: unpickle, instantiate with the kwargs, wrap with its own rules.
    policy = _apply_autoscaling_config(config.policy.get_policy()(**config.policy.policy_kwargs))

    def slow_engines(replicas):
        return {RUNNING: {r: 4.0 for r in replicas}, WAITING: {r: 0.0 for r in replicas},
                KV_CACHE_USAGE: {r: 0.1 for r in replicas}, TTFT_S: {r: 0.75 for r in replicas}}  # fmt: skip

    decision, state = policy(context(config, 1, 1, 4, {}, now=10.0, metrics=slow_engines))
    assert decision == 3  # TTFT 3x the SLO, capped at max_replicas
    assert isinstance(EngineSignalsAutoscaler(**config.policy.policy_kwargs), EngineSignalsAutoscaler)


def test_scaling_inputs_read_only_the_replicas_that_reported():
    config = AutoscalingConfig(min_replicas=0, max_replicas=3)

    def first_only(replicas):
        return {RUNNING: {replicas[0]: 3.0}, KV_CACHE_USAGE: {replicas[0]: 0.5}}

    read = scaling_inputs(context(config, 2, 2, 5, {}, now=1.0, metrics=first_only))
    assert read.engines == (EngineReport(3.0, 0.0, 0.5, None),)
    assert (read.running_replicas, read.ongoing_requests) == (2, 5.0)


def test_policy_config_is_checked_with_the_graph_config():
    assert spec_with_policy().autoscaling.policy == ScalingPolicyConfig()
    with pytest.raises(ValidationError, match="look_back_period_s"):
        spec_with_policy(look_back_period_s=2, metrics_interval_s=2)
    with pytest.raises(ValidationError, match="Extra inputs"):
        spec_with_policy(ttft_slo=1)


def test_the_engine_report_is_zero_when_idle_and_ttft_is_sent_once():
    load = EngineLoad()
    load.observe(running=3, waiting=2, kv_cache_usage=0.4)
    load.observe_first_tokens([0.1, 0.3])
    assert load.report(unfinished=5) == {RUNNING: 3.0, WAITING: 2.0, KV_CACHE_USAGE: 0.4, TTFT_S: pytest.approx(0.2)}
    assert TTFT_S not in load.report(unfinished=5)
    assert load.report(unfinished=0) == {RUNNING: 0.0, WAITING: 0.0, KV_CACHE_USAGE: 0.0}


def test_a_scale_up_still_starting_is_not_undone_while_the_running_replicas_are_still_wanted():
    policy = EngineSignalsPolicy(SETTINGS)
    streaming = [engine(running=1)]  # one long stream, no first token in this window: reads light
    starting = [inputs(now=t, replicas=1, target=2, engines=streaming) for t in (100, 111, 122)]
    assert settle(policy, starting) == [2, 2, 2]
    assert settle(policy, [inputs(now=t, replicas=2, engines=streaming * 2) for t in (130, 141)]) == [2, 1]
    idle_while_starting = [inputs(now=t, replicas=2, target=3, engines=[engine(), engine()]) for t in (150, 161)]
    assert settle(policy, idle_while_starting) == [3, 1]  # fewer than the running ones would do: no hold
