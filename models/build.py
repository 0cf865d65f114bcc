"""Deterministic local models: a random-weight Llama and a byte-level BPE tokenizer.

Our machines have no model hub, so tests and the default graph serve models the project
builds itself. Same recipe, same bytes: every node can build its own copy on first use and
the cache key is the recipe's fingerprint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from servegraph.models.spec import LocalBuildRecipe, ModelSpec

CORPUS_PATH = Path(__file__).with_name("corpus.txt")
SPECIAL_TOKENS = ["<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Tool-call and reasoning markers as vLLM's hermes tool parser and <think> reasoning parsers read them:
# ordinary added tokens (not special), so detokenizing keeps them in the text those parsers see.
MARKUP_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]
EOS_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
# Hermes-style tools: offered in a system turn, called as <tool_call>{"name": ..., "arguments": ...}</tool_call>.
CHAT_TEMPLATE = (
    '{% if tools %}<|system|>\nYou may call these tools, each as <tool_call>{"name": ..., "arguments": ...}'
    "</tool_call>:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|end|>\n{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{% for call in message.get('tool_calls') or [] %}<tool_call>{\"name\": \"{{ call['function']['name'] }}\", "
    "\"arguments\": {{ call['function']['arguments'] if call['function']['arguments'] is string "
    "else call['function']['arguments'] | tojson }}}</tool_call>{% endfor %}"
    "{{ '<|end|>' }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)
INITIALIZER_RANGE = 0.2  # wide init makes greedy argmax robust to bf16 rounding


def default_cache_dir() -> Path:
    return Path(os.environ.get("SERVEGRAPH_CACHE_DIR", Path.home() / ".cache" / "servegraph"))


def resolve_model_source(spec: ModelSpec, cache_dir: Path | None = None) -> str:
    """Return what vLLM and transformers should load: a directory or a hub id."""
    if spec.path is not None:
        return spec.path
    if spec.hub_id is not None:
        return spec.hub_id
    assert spec.build is not None
    return str(ensure_local_model(spec.build, cache_dir or default_cache_dir()))


def ensure_local_model(recipe: LocalBuildRecipe, cache_dir: Path) -> Path:
    """Build the recipe's model into the cache unless it is already there."""
    target = cache_dir / "models" / f"llama-{recipe.fingerprint()}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_local_model(recipe, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").exists():  # lost the race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_local_model(recipe: LocalBuildRecipe, out_dir: Path) -> None:
    """Write tokenizer and weights for the recipe into out_dir."""
    tokenizer = _train_tokenizer(recipe)
    tokenizer.save_pretrained(out_dir)
    _make_weights(recipe, tokenizer).save_pretrained(out_dir, safe_serialization=True)


def _train_tokenizer(recipe: LocalBuildRecipe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS_PATH.read_text(encoding="utf-8").splitlines(), trainer=trainer)
    bpe.add_tokens(MARKUP_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=recipe.max_position_embeddings,
    )


def _make_weights(recipe: LocalBuildRecipe, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        head_dim=recipe.head_dim,
        max_position_embeddings=recipe.max_position_embeddings,
        initializer_range=INITIALIZER_RANGE,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.do_sample = False
    return model
