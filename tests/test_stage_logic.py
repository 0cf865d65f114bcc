"""Stage logic without Ray: router, the tokenizer stage over vLLM's renderer, errors."""

import asyncio

import pytest

from servegraph.deployments.errors import (
    BadRequestError,
    ContextLengthExceededError,
    ModelNotFoundError,
    as_openai_error,
)
from servegraph.deployments.messages import ModelRoute
from servegraph.deployments.protocol import ClientRequest
from servegraph.deployments.router import ModelRegistry
from servegraph.deployments.tokenizer import PromptTokenizer
from servegraph.models.spec import LongPromptPolicy

ROUTE = ModelRoute(model="tiny", version="v1", engine="engine-tiny-v1", default_max_tokens=16, timeout_s=600)


def test_registry_resolves_names_and_aliases(tiny_spec):
    registry = ModelRegistry([tiny_spec])
    assert registry.resolve("tiny-chat") == ROUTE
    assert [card.id for card in registry.model_list().data] == ["tiny", "tiny-chat"]


def test_unknown_model_lists_available_ones(tiny_spec):
    with pytest.raises(ModelNotFoundError) as info:
        ModelRegistry([tiny_spec]).resolve("gpt-5")
    assert info.value.status_code == 404
    assert "tiny, tiny-chat" in info.value.message and info.value.param == "model"


def prepare(frontend, spec, body: dict, request_id: str = "req-1", policy=None):
    """The tokenizer stage's engine requests for body, as the ingress would hand it over."""
    if policy is not None:
        spec = spec.model_copy(update={"long_prompt": policy})
    request = ClientRequest.of("chat" if "messages" in body else "completion", {"model": "tiny", **body})
    return asyncio.run(PromptTokenizer(spec, frontend).prepare(ROUTE, request, request_id))


@pytest.mark.parametrize(
    ("policy", "expected"),
    [(LongPromptPolicy.truncate_left, list(range(110, 160))), (LongPromptPolicy.truncate_right, list(range(100, 150)))],
)
def test_truncation_fits_max_model_len_minus_max_tokens(tiny_spec, tiny_frontend, policy, expected):
    prepared = prepare(tiny_frontend, tiny_spec, {"prompt": list(range(100, 160)), "max_tokens": 14}, policy=policy)
    [engine_request] = prepared.engine_requests
    assert engine_request.prompt_token_ids == expected and engine_request.sampling_params.max_tokens == 14


def test_reject_names_prompt_tokens_and_limit(tiny_spec, tiny_frontend):
    with pytest.raises(ContextLengthExceededError) as info:
        prepare(tiny_frontend, tiny_spec, {"prompt": list(range(100, 160)), "max_tokens": 14})
    assert "maximum context length is 64 tokens" in info.value.message
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"


def test_default_max_tokens_shrinks_to_remaining_context(tiny_spec, tiny_frontend):
    for words in (2, 14):
        prepared = prepare(tiny_frontend, tiny_spec, {"messages": [{"role": "user", "content": "hello " * words}]})
        [engine_request] = prepared.engine_requests
        assert engine_request.sampling_params.max_tokens == min(16, 64 - len(engine_request.prompt_token_ids))
    assert engine_request.sampling_params.max_tokens < 16


def test_max_tokens_beyond_limit_is_rejected(tiny_spec, tiny_frontend):
    with pytest.raises(BadRequestError, match="beyond this model's limit") as info:
        prepare(tiny_frontend, tiny_spec, {"prompt": [1, 2], "max_tokens": 64})
    assert info.value.param == "max_tokens"


def test_chat_is_rendered_by_the_model_template_into_vllm_sampling_params(tiny_spec, tiny_frontend, tiny_tokenizer):
    body = {"messages": [{"role": "user", "content": "hello"}], "max_completion_tokens": 5, "stop": "x", "n": 2,
            "logprobs": True, "top_logprobs": 3, "seed": 7}  # fmt: skip
    [engine_request] = prepare(tiny_frontend, tiny_spec, body).engine_requests
    expected = tiny_tokenizer.encode("<|user|>\nhello<|end|>\n<|assistant|>\n", add_special_tokens=False)
    params = engine_request.sampling_params
    assert engine_request.prompt_token_ids == expected
    assert (params.max_tokens, params.stop, params.n, params.logprobs, params.seed) == (5, ["x"], 2, 3, 7)


def test_a_list_of_prompts_becomes_one_engine_request_each(tiny_spec, tiny_frontend):
    prepared = prepare(tiny_frontend, tiny_spec, {"prompt": ["a", "b", "c"], "max_tokens": 2}, request_id="cmpl-1")
    assert [r.request_id for r in prepared.engine_requests] == ["cmpl-1-0", "cmpl-1-1", "cmpl-1-2"]
    assert prepared.prompt_texts == ["a", "b", "c"] and prepared.model_name == "tiny"


def test_completion_uses_openai_default_max_tokens(tiny_spec, tiny_frontend):
    [engine_request] = prepare(tiny_frontend, tiny_spec, {"prompt": "hi"}).engine_requests
    assert engine_request.sampling_params.max_tokens == 16


def test_stream_asks_the_engine_for_deltas_and_others_for_the_final_output(tiny_spec, tiny_frontend):
    from vllm.sampling_params import RequestOutputKind

    [streamed] = prepare(tiny_frontend, tiny_spec, {"prompt": "hi", "stream": True}).engine_requests
    [whole] = prepare(tiny_frontend, tiny_spec, {"prompt": "hi"}).engine_requests
    assert streamed.sampling_params.output_kind is RequestOutputKind.DELTA
    assert whole.sampling_params.output_kind is RequestOutputKind.FINAL_ONLY
    assert streamed.sampling_params.stream_interval == tiny_spec.stream_interval


def test_out_of_vocab_token_prompt_is_rejected(tiny_spec, tiny_frontend):
    with pytest.raises(BadRequestError, match="token ids must be in"):
        prepare(tiny_frontend, tiny_spec, {"prompt": [1, 99999]})


def test_vllm_sampling_refusals_name_their_parameter(tiny_spec, tiny_frontend):
    with pytest.raises(BadRequestError) as info:
        prepare(tiny_frontend, tiny_spec, {"prompt": "hi", "max_tokens": 2, "min_tokens": 3})
    assert info.value.param == "min_tokens" and info.value.status_code == 400


def test_errors_survive_pickling_and_ray_wrapping():
    import pickle

    error = pickle.loads(pickle.dumps(ContextLengthExceededError("too long", param="prompt")))
    assert (type(error), error.param, error.code, error.status_code) == (
        ContextLengthExceededError,
        "prompt",
        "context_length_exceeded",
        400,
    )
    assert as_openai_error(RuntimeError("boom")).status_code == 500


@pytest.mark.parametrize(
    ("body", "param"),
    [({"use_beam_search": True, "n": 2}, "use_beam_search"), ({"prompt_embeds": "AAAA"}, "prompt_embeds")],
)
def test_what_the_graph_cannot_honour_is_refused_not_ignored(tiny_spec, tiny_frontend, body, param):
    with pytest.raises(BadRequestError) as info:
        prepare(tiny_frontend, tiny_spec, {"prompt": "hi", **body})
    assert info.value.param == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "logprobs": 50}, "logprobs"),
        ({"prompt": "hi", "logit_bias": {"99999": 5}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"regex": "(unclosed"}}, None),
    ],
)
def test_what_the_engine_would_refuse_is_refused_by_the_tokenizer_stage(tiny_spec, tiny_frontend, body, param):
    with pytest.raises(BadRequestError) as info:
        prepare(tiny_frontend, tiny_spec, body)
    assert info.value.status_code == 400 and (param is None or info.value.param == param), info.value.message
