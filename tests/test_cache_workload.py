"""The response-cache benchmark's pure logic: its schedule, best hit rate and summary."""

from __future__ import annotations

import pytest

from servegraph.bench.cache_workload import Outcome, best_hit_rate, question_schedule, summarize, usage_of


def test_schedule_is_reproducible_and_draws_only_the_distinct_questions():
    schedule = question_schedule(500, 7, seed=3)
    assert schedule == question_schedule(500, 7, seed=3) and schedule != question_schedule(500, 7, seed=4)
    assert set(schedule) == set(range(7))
    with pytest.raises(ValueError):
        question_schedule(10, 0, seed=0)


def test_best_hit_rate_counts_every_repeat_of_a_question_already_asked():
    assert best_hit_rate([0, 1, 0, 0, 2, 1]) == 3 / 6
    assert best_hit_rate([0, 1, 2]) == 0


def test_summary_counts_hits_among_answered_requests_and_throughput_over_wall_time():
    outcomes = [
        Outcome(True, "miss", 0.2, 1.0, 32),
        Outcome(True, "hit", 0.01, 0.02, 32),
        Outcome(True, "hit", 0.03, 0.04, 32),
        Outcome(False, None, None, 5.0, 0),
    ]
    summary = summarize(outcomes, duration_s=2.0)
    assert summary["requests"] == 4 and summary["failed"] == 1
    assert summary["hit_rate"] == round(2 / 3, 3)
    assert summary["ttft_p50_ms"] == 30.0 and summary["ttft_p99_ms"] == 200.0
    assert summary["requests_per_s"] == 1.5 and summary["output_tokens_per_s"] == 48.0


def test_usage_is_read_from_the_streams_usage_event_only():
    assert usage_of('{"choices": [], "usage": {"completion_tokens": 32}}') == 32
    assert usage_of('{"choices": [{"text": "x"}], "usage": null}') is None
    assert usage_of("[DONE]") is None
