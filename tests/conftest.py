"""Shared fixtures: the built tiny model's tokenizer for unit tests.

End-to-end fixtures (a real Ray cluster running graphs/local.yaml) live in tests/e2e.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models.build import ensure_local_model
from models.spec import LocalBuildRecipe, ModelSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("servegraph-cache")


@pytest.fixture(scope="session")
def tiny_spec() -> ModelSpec:
    return ModelSpec(
        name="tiny", aliases=["tiny-chat"], build=LocalBuildRecipe(), max_model_len=64, default_max_tokens=16
    )


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_spec: ModelSpec, model_cache: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_local_model(tiny_spec.build, model_cache))
