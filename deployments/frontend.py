"""vLLM's OpenAI front end without an engine: its renderer, chat templates, parsers and serving classes.

The tokenizer stage renders requests with it and the postprocess stage shapes responses with it,
as vLLM's own GPU-less render server does (`vllm launch render`). Both build it from the same
model spec, so the chat template, tool parser and reasoning parser agree on both sides of the
engine, and every request field means what it means in `vllm serve`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servegraph.models.build import resolve_model_source
from servegraph.models.engine_config import engine_kwargs
from servegraph.models.spec import ModelSpec

RESPONSE_ROLE = "assistant"


def frontend_config(spec: ModelSpec, cache_dir: Path | None = None):
    """A VllmConfig for rendering only: the engine's model config, no device, no KV cache."""
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM's dictConfig would close Serve's handlers
    from vllm import envs
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    envs.VLLM_CPU_KVCACHE_SPACE = 0  # as vLLM's render server: no KV cache here, no warning about one
    kwargs = engine_kwargs(spec, resolve_model_source(spec, cache_dir), on_cpu=True)
    args = AsyncEngineArgs(**{k: v for k, v in kwargs.items() if k in FRONTEND_ENGINE_ARGS or k in spec.engine_args})
    model_config = args.create_model_config()
    model_config.quantization = None
    return VllmConfig(model_config=model_config, structured_outputs_config=args.create_structured_outputs_config())


# Engine arguments that shape what the front end renders; the rest size the engine only.
FRONTEND_ENGINE_ARGS = {"model", "served_model_name", "dtype", "max_model_len"}


@dataclass
class EngineShape:
    """What vLLM's serving classes read from an engine client; this front end has no engine of its own."""

    vllm_config: Any
    renderer: Any
    input_processor: None = None
    errored: bool = False
    dead_error: Exception | None = None

    @property
    def model_config(self):
        return self.vllm_config.model_config

    def check_admission(self, n: int = 1) -> None:
        """Admission is the engine stage's (Serve's queue limits), not the front end's."""


@dataclass
class Frontend:
    """One model's vLLM front end: rendering for the tokenizer stage, response shaping for postprocess."""

    spec: ModelSpec
    vllm_config: Any
    renderer: Any
    online_renderer: Any

    @property
    def tokenizer(self):
        return self.renderer.get_tokenizer()

    @property
    def model_config(self):
        return self.vllm_config.model_config

    def serving(self) -> tuple[Any, Any, Any]:
        """vLLM's chat, completion and responses serving classes over this front end, for their response generators."""
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses

        shape = EngineShape(self.vllm_config, self.renderer)
        models = model_registry(self.spec, self.model_config)
        parsers = {  # the same template and parsers as the tokenizer stage's renderer
            "request_logger": None,
            "chat_template": None,
            "chat_template_content_format": "auto",
            "enable_auto_tools": self.spec.tool_parser is not None,
            "tool_parser": self.spec.tool_parser,
            "reasoning_parser": self.spec.reasoning_parser or "",
        }
        chat = OpenAIServingChat(shape, models, RESPONSE_ROLE, online_renderer=self.online_renderer, **parsers)
        completion = OpenAIServingCompletion(shape, models, online_renderer=self.online_renderer, request_logger=None)
        responses = OpenAIServingResponses(shape, models, self.online_renderer, **parsers)
        return chat, completion, responses


def model_registry(spec: ModelSpec, model_config):
    from vllm.entrypoints.openai.models.protocol import BaseModelPath
    from vllm.entrypoints.openai.models.serving import OpenAIModelRegistry

    paths = [BaseModelPath(name=name, model_path=model_config.model) for name in [spec.name, *spec.aliases]]
    return OpenAIModelRegistry(model_config, paths)


def build_frontend(spec: ModelSpec, cache_dir: Path | None = None) -> Frontend:
    from vllm.renderers import renderer_from_config
    from vllm.renderers.online_renderer import OnlineRenderer

    vllm_config = frontend_config(spec, cache_dir)
    renderer = renderer_from_config(vllm_config)
    online_renderer = OnlineRenderer(
        model_config=vllm_config.model_config,
        renderer=renderer,
        request_logger=None,
        chat_template=None,
        chat_template_content_format="auto",
        enable_auto_tools=spec.tool_parser is not None,
        tool_parser=spec.tool_parser,
        reasoning_parser=spec.reasoning_parser,
    )
    online_renderer.warmup()
    return Frontend(spec, vllm_config, renderer, online_renderer)
