"""Stage logic without Ray: router, tokenizer policy, detokenization, stop strings."""

import pytest

from deployments.errors import BadRequestError, ContextLengthExceededError, ModelNotFoundError, as_openai_error
from deployments.messages import EngineRequest, ModelRoute, PreparedRequest, SamplingSettings, TokenChunk
from deployments.postprocess import IncrementalDetokenizer, StopStringMatcher, TextAssembler
from deployments.protocol import ChatCompletionRequest, CompletionRequest
from deployments.router import ModelRegistry
from deployments.tokenizer import PromptTokenizer
from models.spec import LongPromptPolicy

ROUTE = ModelRoute(model="tiny", version="v1", engine="engine-tiny-v1", timeout_s=600)


def test_registry_resolves_names_and_aliases(tiny_spec):
    registry = ModelRegistry([tiny_spec])
    assert registry.resolve("tiny-chat") == ROUTE
    assert [card.id for card in registry.model_list().data] == ["tiny", "tiny-chat"]


def test_unknown_model_lists_available_ones(tiny_spec):
    with pytest.raises(ModelNotFoundError) as info:
        ModelRegistry([tiny_spec]).resolve("gpt-5")
    assert info.value.status_code == 404
    assert "tiny, tiny-chat" in info.value.message and info.value.param == "model"


def tokenizer_for(spec, tokenizer, policy):
    return PromptTokenizer(spec.model_copy(update={"long_prompt": policy}), tokenizer)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [(LongPromptPolicy.truncate_left, list(range(10, 60))), (LongPromptPolicy.truncate_right, list(range(50)))],
)
def test_truncation_fits_max_model_len_minus_max_tokens(tiny_spec, tiny_tokenizer, policy, expected):
    prompt_tokenizer = tokenizer_for(tiny_spec, tiny_tokenizer, policy)
    kept, max_tokens, cut = prompt_tokenizer.fit_context(list(range(60)), 14, 16, "prompt")
    assert (kept, max_tokens, cut) == (expected, 14, 10)


def test_reject_names_prompt_tokens_and_limit(tiny_spec, tiny_tokenizer):
    prompt_tokenizer = tokenizer_for(tiny_spec, tiny_tokenizer, LongPromptPolicy.reject)
    with pytest.raises(ContextLengthExceededError) as info:
        prompt_tokenizer.fit_context(list(range(60)), 14, 16, "prompt")
    assert "maximum context length is 64 tokens" in info.value.message
    assert "60 in the prompt" in info.value.message and info.value.code == "context_length_exceeded"


def test_default_max_tokens_shrinks_to_remaining_context(tiny_spec, tiny_tokenizer):
    prompt_tokenizer = tokenizer_for(tiny_spec, tiny_tokenizer, LongPromptPolicy.reject)
    assert prompt_tokenizer.fit_context(list(range(60)), None, 16, "prompt") == (list(range(60)), 4, 0)


def test_max_tokens_beyond_limit_is_rejected(tiny_spec, tiny_tokenizer):
    with pytest.raises(BadRequestError, match="beyond this model's limit") as info:
        PromptTokenizer(tiny_spec, tiny_tokenizer).fit_context([1, 2], 64, 16, "prompt")
    assert info.value.param == "max_tokens"


def test_chat_prepare_counts_template_tokens(tiny_spec, tiny_tokenizer):
    request = ChatCompletionRequest(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5, stop="x"
    )
    prepared = PromptTokenizer(tiny_spec, tiny_tokenizer).prepare(ROUTE, request, "req-1")
    expected = tiny_tokenizer.encode("<|user|>\nhello<|end|>\n<|assistant|>\n", add_special_tokens=False)
    assert prepared.engine_request.prompt_token_ids == expected
    assert prepared.engine_request.sampling.stop_token_ids == (tiny_tokenizer.eos_token_id,)
    assert prepared.stop_strings == ("x",)


def test_completion_without_stop_uses_openai_default_max_tokens(tiny_spec, tiny_tokenizer):
    prepared = PromptTokenizer(tiny_spec, tiny_tokenizer).prepare(
        ROUTE, CompletionRequest(model="tiny", prompt="hi"), "r"
    )
    assert prepared.stop_strings == () and prepared.engine_request.sampling.max_tokens == 16


def test_ignore_eos_drops_the_eos_stop_token(tiny_spec, tiny_tokenizer):
    prompts = PromptTokenizer(tiny_spec, tiny_tokenizer)
    keep = prompts.prepare(ROUTE, CompletionRequest(model="tiny", prompt="hi"), "r")
    ignore = prompts.prepare(ROUTE, CompletionRequest(model="tiny", prompt="hi", ignore_eos=True), "r")
    assert keep.engine_request.sampling.stop_token_ids == (tiny_tokenizer.eos_token_id,)
    assert ignore.engine_request.sampling.stop_token_ids == ()


def test_out_of_vocab_token_prompt_is_rejected(tiny_spec, tiny_tokenizer):
    request = CompletionRequest(model="tiny", prompt=[1, 99999])
    with pytest.raises(BadRequestError, match="token ids must be in"):
        PromptTokenizer(tiny_spec, tiny_tokenizer).prepare(ROUTE, request, "req-1")


def test_detokenizer_holds_back_split_multibyte_characters(tiny_tokenizer):
    text = "naïve 世界 🚀 done"
    ids = tiny_tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tiny_tokenizer)
    pieces = [detokenizer.step([token]) for token in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def byte_token_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of text, from the byte-level alphabet."""
    from tokenizers import pre_tokenizers

    byte_chars = "".join(piece for piece, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text))
    return tokenizer.convert_tokens_to_ids(list(byte_chars))


def test_detokenizer_emits_a_character_only_when_its_last_byte_arrives(tiny_tokenizer):
    rocket = byte_token_ids(tiny_tokenizer, "🚀")
    assert len(rocket) == 4
    detokenizer = IncrementalDetokenizer(tiny_tokenizer)
    assert [detokenizer.step([token]) for token in rocket] == ["", "", "", "🚀"]


def test_detokenizer_flushes_incomplete_bytes_as_replacement(tiny_tokenizer):
    ids = byte_token_ids(tiny_tokenizer, "ok🚀")
    detokenizer = IncrementalDetokenizer(tiny_tokenizer)
    assert detokenizer.step(ids[:2]) == "ok"
    assert detokenizer.step(ids[2:4]) == ""
    flushed = detokenizer.flush()
    assert flushed and set(flushed) == {"\ufffd"}


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_stop_string_found_across_chunks(split):
    text = "hello world, stop here please"
    matcher = StopStringMatcher(("stop here",))
    emitted, hit = "", False
    for start in range(0, len(text), split):
        out, hit = matcher.feed(text[start : start + split])
        emitted += out
        if hit:
            break
    assert hit and emitted == "hello world, "


def test_stop_matcher_releases_held_text_on_flush():
    matcher = StopStringMatcher(("abc",))
    assert matcher.feed("xxab") == ("xx", False)
    assert matcher.flush() == "ab"


def prepared_with(stops: tuple[str, ...]) -> PreparedRequest:
    request = EngineRequest("r", [1, 2, 3], SamplingSettings(max_tokens=50))
    return PreparedRequest(route=ROUTE, engine_request=request, stop_strings=stops)


def test_assembler_counts_usage_and_stops_at_stop_string(tiny_tokenizer):
    ids = tiny_tokenizer.encode("one two three four")
    assembler = TextAssembler(tiny_tokenizer, prepared_with(("three",)))
    chunks = [assembler.add(TokenChunk([token])) for token in ids]
    texts = "".join(c.text for c in chunks if c is not None)
    assert texts == "one two " and assembler.finish_reason == "stop"
    last = [c for c in chunks if c is not None][-1]
    assert last.prompt_tokens == 3 and last.finish_reason == "stop"


def test_assembler_passes_engine_finish_reason_and_flushes_held_text(tiny_tokenizer):
    ids = tiny_tokenizer.encode("hi there")
    assembler = TextAssembler(tiny_tokenizer, prepared_with(("therex",)))
    chunk = assembler.add(TokenChunk(ids, finish_reason="length"))
    assert (chunk.text, chunk.finish_reason, chunk.completion_tokens) == ("hi there", "length", len(ids))
    assert assembler.add(TokenChunk([5])) is None


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


def test_engine_sampling_params_stream_token_deltas():
    from vllm.sampling_params import RequestOutputKind

    from deployments.engine import sampling_params

    settings = SamplingSettings(max_tokens=7, temperature=0.5, seed=3, top_k=5, stop_token_ids=(0,))
    params = sampling_params(EngineRequest("r", [1, 2], settings), stream_interval=8)
    assert (params.max_tokens, params.temperature, params.seed, params.top_k) == (7, 0.5, 3, 5)
    assert params.stop_token_ids == [0] and not params.detokenize
    assert params.output_kind is RequestOutputKind.DELTA and params.stream_interval == 8
