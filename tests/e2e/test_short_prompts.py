"""Prompts of one to four tokens on every locally built model of the test graph.

On CPUs with AMX, vLLM 0.32's AMX attention kernel kills its worker (SIGILL) on such prompts
unless the process was granted AMX tiles first (models/cpu_amx.py); this runs whatever the CPU.
These tests run before every other e2e test (see conftest), so they are each engine's first
requests: after one prompt of five or more tokens a process holds its AMX tiles anyway.
"""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import ALPHA_KEY, SERVED_BY, poll, with_traffic

SHORT_PROMPTS = [[300], [100, 200], [100, 200, 300], [100, 200, 300, 400]]
SHORTEST_CHAT = [{"role": "user", "content": ""}]

# (application route prefix, API key, model): the models of the shared test graph that do not scale to
# zero. `elastic`'s cold request in test_autoscaling is a one-token prompt; `sleepy` is never given
# the time to start.
MODELS = [
    ("", "unused", "tiny"),
    ("", "unused", "small"),
    ("/limits", ALPHA_KEY, "strict"),
    ("/limits", ALPHA_KEY, "shared"),
    ("/resilience", "unused", "canary"),
]


def app_client(graph, prefix: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{graph.base_url}{prefix}/v1", api_key=key, max_retries=0, timeout=120)


def assert_short_prompts_served(client: openai.OpenAI, model: str) -> set[str]:
    """Every short prompt, streamed and not, plus the shortest chat; which versions served them."""
    served_by: set[str] = set()
    for prompt in SHORT_PROMPTS:
        for stream in (False, True):
            raw = client.completions.with_raw_response.create(
                model=model, prompt=prompt, max_tokens=2, temperature=0, stream=stream
            )
            served_by.add(raw.headers[SERVED_BY])
            reply = raw.parse()
            if stream:
                chunks = list(reply)
                assert chunks[-1].choices[0].finish_reason == "length", (model, prompt, chunks)
            else:
                assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 2, reply
    chat = client.chat.completions.create(model=model, messages=SHORTEST_CHAT, max_tokens=2, temperature=0)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 2, chat
    return served_by


@pytest.mark.parametrize(("prefix", "key", "model"), MODELS, ids=[m for _, _, m in MODELS])
def test_one_to_four_token_prompts_are_served(graph, prefix, key, model):
    client = app_client(graph, prefix, key)
    assert_short_prompts_served(client, model)
    # The engine is still the one that served them: nothing died and was replaced meanwhile.
    assert client.completions.create(model=model, prompt=[1], max_tokens=1).usage.completion_tokens == 1


def test_one_to_four_token_prompts_on_the_canary_version(graph):
    """`canary` v2 is its own build (seed 1): give it all the traffic for this test, then give it back."""
    client = app_client(graph, "/resilience", "unused")
    graph.cluster.deploy(with_traffic(graph, {"v1": 0, "v2": 100}))
    try:

        def on_v2() -> bool:
            raw = client.completions.with_raw_response.create(model="canary", prompt=[300], max_tokens=1)
            return raw.headers[SERVED_BY] == "canary@v2"

        poll(on_v2, 60, "traffic to move to canary v2")
        assert assert_short_prompts_served(client, "canary") == {"canary@v2"}
    finally:
        graph.cluster.deploy(with_traffic(graph, {"v1": 100}))
