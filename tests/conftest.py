"""Shared fixtures: the built tiny model's tokenizer for unit tests.

End-to-end fixtures (a real Ray cluster running graphs/local.yaml) live in tests/e2e.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from models.build import ensure_local_model
from models.spec import LocalBuildRecipe, ModelSpec

ROOT = Path(__file__).resolve().parents[1]
EXIT_STATUS = pytest.StashKey[int]()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with the tests' own verdict, skipping the interpreter's teardown.

    vLLM's import loads native extensions (triton's nanobind objects among them) whose
    teardown at interpreter exit has segfaulted after every test had passed, which failed
    `make test` whatever the tests did. By now the e2e fixture has stopped Ray and every
    engine, and the report is written: nothing of ours is left to tear down.
    """
    if EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[EXIT_STATUS])


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


@pytest.fixture(scope="session")
def frontend_for(model_cache: Path):
    """vLLM's front end (renderer, serving classes) for a spec, as each stage builds it; one per context length."""
    from deployments.frontend import build_frontend

    built = {}

    def frontend(spec: ModelSpec):
        if spec.max_model_len not in built:
            built[spec.max_model_len] = build_frontend(spec, model_cache)
        return built[spec.max_model_len]

    return frontend


@pytest.fixture(scope="session")
def tiny_frontend(tiny_spec: ModelSpec, frontend_for):
    return frontend_for(tiny_spec)
