"""Typed model specs: what a graph config says about each served model."""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Base for every config schema: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LongPromptPolicy(str, Enum):
    """What the tokenizer stage does with a prompt that leaves no room for max_tokens."""

    reject = "reject"
    truncate_left = "truncate_left"
    truncate_right = "truncate_right"


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
        """Content key for the build cache: changes whenever any recipe field changes."""
        payload = json.dumps(self.model_dump(), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:12]


class ModelShape(StrictModel):
    """What placement needs to size a model it cannot read locally (a hub model, say)."""

    num_parameters: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)


PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class ModelSpec(StrictModel):
    """One served model: where it comes from, its limits and how its engine is sized."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)
    aliases: list[str] = Field(default_factory=list)
    version: str = "v1"
    path: str | None = Field(None, description="A model directory on every node.")
    hub_id: str | None = Field(None, description="A Hugging Face hub id (GPU clusters with hub access).")
    build: LocalBuildRecipe | None = Field(None, description="Build a small local model on first use.")
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
    max_queued_requests: int | None = Field(
        None,
        ge=0,
        description="Requests waiting for the engine beyond max_ongoing; more get 503. Default 2 x max_num_seqs.",
    )
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Passed through to vLLM as is.")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSpec:
        sources = [s for s in ("path", "hub_id", "build") if getattr(self, s) is not None]
        if len(sources) != 1:
            raise ValueError(f"model {self.name!r} needs exactly one of path, hub_id, build; got {sources or 'none'}")
        if self.default_max_tokens >= self.max_model_len:
            raise ValueError(f"model {self.name!r}: default_max_tokens must be less than max_model_len")
        return self

    @property
    def engine_queue_limit(self) -> int:
        return self.max_queued_requests if self.max_queued_requests is not None else 2 * self.max_num_seqs

    @property
    def num_workers(self) -> int:
        """Engine workers per replica, one per GPU slice."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def served_names(self) -> list[str]:
        return [self.name, *self.aliases]

    @property
    def engine_deployment_name(self) -> str:
        return f"engine-{self.name}"
