"""The embeddings benchmark's pure logic: its workload and its summary."""

from __future__ import annotations

import pytest

from servegraph.bench.embeddings import Outcome, batches, summarize

CORPUS = "one two three four five six seven eight".split()


def test_the_workload_is_reproducible_batches_of_consecutive_words():
    workload = batches(5, 3, 4, seed=1, corpus=CORPUS)
    assert workload == batches(5, 3, 4, seed=1, corpus=CORPUS) != batches(5, 3, 4, seed=2, corpus=CORPUS)
    assert len(workload) == 5 and all(len(texts) == 3 for texts in workload)
    for text in (text for texts in workload for text in texts):
        start = CORPUS.index(text.split()[0])
        assert text.split() == CORPUS[start : start + 4]
    with pytest.raises(ValueError):
        batches(1, 1, 9, seed=0, corpus=CORPUS)


def test_throughput_counts_answered_embeddings_over_wall_time():
    outcomes = [Outcome(True, 16, 400, 0.5), Outcome(True, 16, 300, 1.5), Outcome(False, 0, 0, 0.1)]
    summary = summarize(outcomes, duration_s=2.0)
    assert (summary["requests"], summary["failed"]) == (3, 1)
    assert (summary["embeddings_per_s"], summary["requests_per_s"], summary["input_tokens_per_s"]) == (16, 1, 350)
    assert (summary["latency_p50_ms"], summary["latency_p99_ms"]) == (1500, 1500)
