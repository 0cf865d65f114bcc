"""The prefix-routing benchmark's pure parts: its conversations, counters and figures."""

from __future__ import annotations

import pytest

from servegraph.bench.prefix_routing import (
    ConversationWorkload,
    Turn,
    busiest_share,
    figures,
    graph_config,
    growth,
    hit_rate,
    percentile,
    prefix_cache_counters,
    request_routers,
    table,
)
from servegraph.models.config import LLMAppArgs


def test_turns_share_the_system_prompt_and_grow_by_their_own_history():
    workload = ConversationWorkload(conversations=3, turns=4, system_len=50, user_len=5, reply_len=7)
    conversations = workload.prompts()
    assert len(conversations) == 3 and all(len(turns) == 4 for turns in conversations)
    system = conversations[0][0][:50]
    assert all(turn[:50] == system for turns in conversations for turn in turns)
    for turns in conversations:
        assert [len(t) for t in turns] == [55, 67, 79, 91]
        assert all(later[: len(earlier)] == earlier for earlier, later in zip(turns, turns[1:], strict=False))
    first_messages = {tuple(turns[0][50:]) for turns in conversations}
    assert len(first_messages) == 3  # conversations differ after the system prompt
    assert workload.prompts() == conversations  # the same prompts for every router
    assert max(len(t) for turns in conversations for t in turns) == workload.max_prompt_len
    assert all(10 <= token < workload.vocab_size for turns in conversations for t in turns for token in t)


def test_prefix_cache_counters_per_replica_and_what_they_gained():
    def sample(kind: str, replica: str, value: float) -> str:
        labels = f'Component="core_worker",ReplicaId="{replica}",engine="0",model_name="tiny"'
        return f"ray_vllm_prefix_cache_{kind}_total{{{labels}}} {value}"

    before = prefix_cache_counters(
        "\n".join(["# TYPE ray_vllm_prefix_cache_hits_total counter", sample("hits", "a", 20.0),
                   sample("queries", "a", 100.0), 'ray_vllm_external_prefix_cache_hits_total{engine="0"} 9.0'])
    )  # fmt: skip
    assert before == {"a": (20.0, 100.0)}
    after = prefix_cache_counters(
        "\n".join([sample("hits", "a", 170.0), sample("queries", "a", 500.0),
                   sample("hits", "b", 30.0), sample("queries", "b", 100.0)])
    )  # fmt: skip
    gained = growth(before, after)
    assert gained == {"a": (150.0, 400.0), "b": (30.0, 100.0)}
    assert hit_rate(gained) == pytest.approx(180 / 500)
    assert busiest_share(gained) == pytest.approx(0.8)
    assert hit_rate({}) == busiest_share({}) == 0.0


def test_figures_take_percentiles_and_throughput():
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([1, 2], 99) == pytest.approx(1.99)
    turns = [Turn(ttft_s=t / 1000, completion_tokens=32) for t in range(1, 101)]
    row = figures("prefix", turns, duration_s=4.0, gained={"a": (50.0, 100.0), "b": (0.0, 100.0)})
    assert row.ttft_p50_ms == pytest.approx(50.5) and row.ttft_p99_ms == pytest.approx(99.01)
    assert row.output_tokens_per_s == 800 and row.requests == 100
    assert row.hit_rate == 0.25 and row.busiest_share == 0.5
    assert "prefix" in table([row]) and "25.0%" in table([row])


def test_every_router_gets_the_same_valid_graph_on_two_replicas():
    workload = ConversationWorkload(conversations=2, turns=6)
    for name, router in request_routers(imbalance_threshold=3).items():
        config = graph_config(router, workload)
        args = LLMAppArgs.model_validate(config["applications"][0]["args"])
        (model,) = args.models
        assert model.autoscaling.min_replicas == model.autoscaling.max_replicas == 2
        assert model.max_model_len >= workload.max_prompt_len + workload.output_len
        assert (model.request_router.class_path if model.request_router else None) == (
            router["class_path"] if router else None
        ), name
    ours = graph_config(request_routers(3)["prefix"], workload, block_size=32)
    (model,) = LLMAppArgs.model_validate(ours["applications"][0]["args"]).models
    assert model.request_router.kwargs_for(model.engine_args)["block_size"] == 32  # ours follows the engine
