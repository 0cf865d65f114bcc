"""Shared fixtures: the built tiny model's tokenizer for unit tests, and the `e2e` marking.

End-to-end fixtures (a real Ray cluster running graphs/local.yaml) live in tests/e2e; shared
fakes live in tests/fakes.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from servegraph.models.build import ensure_local_model
from servegraph.models.spec import LocalBuildRecipe, ModelSpec

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
EXIT_STATUS = pytest.StashKey[int]()
HEAVY_BEFORE = pytest.StashKey[frozenset[str]]()

# Every test in these folders needs a real Ray cluster (and the engines' vLLM).
E2E_FOLDERS = frozenset({"e2e", "cluster"})
# Fixtures that import vLLM (its front end): a test that uses one, even through another fixture, is not a unit test.
VLLM_FIXTURES = frozenset({"frontend_for"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: it must see these marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `e2e` every test that needs a Ray cluster or vLLM, so `-m "not e2e"` is the fast unit loop.

    By folder and by fixture rather than by hand, so a new e2e test, or one that takes the vLLM
    front end, is left out of `make test-unit` without anyone remembering to mark it. The few
    that start Ray or import vLLM themselves carry the mark in their own module.
    """
    for item in items:
        in_e2e_folder = item.path.is_relative_to(TESTS) and item.path.relative_to(TESTS).parts[0] in E2E_FOLDERS
        if in_e2e_folder or VLLM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


def heavy_state() -> frozenset[str]:
    """What a unit test must not bring about: vLLM imported, Ray initialised in this process."""
    ray = sys.modules.get("ray")
    state = {"vllm imported": "vllm" in sys.modules, "ray initialised": bool(ray and ray.is_initialized())}
    return frozenset(name for name, present in state.items() if present)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[HEAVY_BEFORE] = heavy_state()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Fail a test not marked `e2e` that imported vLLM or initialised Ray, through its fixtures too.

    Such a test would cost the unit loop vLLM's import or a cluster, and nothing else would
    notice. Only a change counts: in the full suite the e2e tests may have done both already.
    """
    if item.get_closest_marker("e2e") is None and HEAVY_BEFORE in item.stash:
        if new := heavy_state() - item.stash[HEAVY_BEFORE]:
            pytest.fail(f"{item.nodeid}: {', '.join(sorted(new))}; mark it e2e", pytrace=False)


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
    from servegraph.deployments.frontend import build_frontend

    built = {}

    def frontend(spec: ModelSpec):
        if spec.max_model_len not in built:
            built[spec.max_model_len] = build_frontend(spec, model_cache)
        return built[spec.max_model_len]

    return frontend


@pytest.fixture(scope="session")
def tiny_frontend(tiny_spec: ModelSpec, frontend_for):
    return frontend_for(tiny_spec)
