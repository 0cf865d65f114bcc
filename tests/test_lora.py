"""LoRA adapters without Ray: config, built adapter files, engine arguments, the registry and its
ingress copy, and how an engine replica loads adapters (vLLM and Serve's multiplexing faked)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from servegraph.deployments.admission import allowed_links
from servegraph.deployments.auth import Tenant
from servegraph.deployments.engine import EngineAdapters, adapter_load_error
from servegraph.deployments.errors import BadRequestError, ModelNotFoundError, OpenAIError
from servegraph.deployments.router import AdapterConflictError, ModelRegistry, RegistryCopy
from servegraph.models.build import ADAPTER_CONFIG, ADAPTER_WEIGHTS, build_local_adapter, resolve_adapter_source
from servegraph.models.config import LLMAppArgs, served_names
from servegraph.models.engine_config import engine_kwargs, lora_adapters_per_replica
from servegraph.models.spec import LocalBuildRecipe, LoraBuildRecipe, ModelSpec
from tests.fakes import FakeClock

BASE = {"hidden_size": 128, "num_layers": 2, "seed": 0}
LORA = {"max_loras": 2, "max_lora_rank": 8, "adapters": [{"name": "sql", "build": {"seed": 1}}]}


def tiny(**overrides) -> ModelSpec:
    return ModelSpec(**{"name": "tiny", "build": BASE, "lora": LORA, **overrides})


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"adapters": [{"name": "a", "build": {}}, {"name": "a", "path": "/x"}]}, "repeat"),
        ({"adapters": [{"name": "a"}]}, "exactly one of path, build"),
        ({"adapters": [{"name": "a", "path": "/x", "build": {}}]}, "exactly one of path, build"),
        ({"max_lora_rank": 8, "adapters": [{"name": "a", "build": {"rank": 16}}]}, "above max_lora_rank"),
        ({"max_lora_rank": 12}, "max_lora_rank"),
        ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras"),
        ({"adapters": [{"name": "tiny-chat", "path": "/x"}]}, "share a name"),
    ],
)
def test_lora_config_refuses_what_cannot_be_served(lora, message):
    with pytest.raises(ValidationError, match=message):
        ModelSpec(name="tiny", aliases=["tiny-chat"], build=BASE, lora=lora)


def test_built_adapters_need_a_built_model():
    with pytest.raises(ValidationError, match="needs a built model"):
        ModelSpec(name="m", path="/models/m", lora={"adapters": [{"name": "a", "build": {}}]})
    ModelSpec(name="m", path="/models/m", lora={"adapters": [{"name": "a", "path": "/adapters/a"}]})


def test_adapter_names_are_served_names_of_the_app():
    """So metrics label them (not `other`) and two models cannot claim one adapter name."""
    args = LLMAppArgs(models=[tiny()], auth={"enabled": False})
    assert "sql" in served_names(args)
    clash = {"name": "other", "build": BASE, "lora": {"adapters": [{"name": "sql", "path": "/x"}]}}
    with pytest.raises(ValidationError, match="'sql' is used by both"):
        LLMAppArgs(models=[tiny(), clash], auth={"enabled": False})


# --- built adapter files ------------------------------------------------------------------------


def test_built_adapter_is_peft_format_and_byte_identical(tmp_path):
    recipe = LoraBuildRecipe(seed=1, target_modules=["q_proj", "v_proj", "down_proj"])
    base = LocalBuildRecipe(**BASE)
    build_local_adapter(base, recipe, tmp_path / "one")
    build_local_adapter(base, recipe, tmp_path / "two")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    config = json.loads((tmp_path / "one" / ADAPTER_CONFIG).read_text())
    assert config | {"r": 8, "lora_alpha": 16, "peft_type": "LORA"} == config
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]

    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "one" / ADAPTER_WEIGHTS)
    assert len(tensors) == 2 * 3 * 2  # layers x modules x (A, B)
    prefix = "base_model.model.model.layers.1"
    assert tuple(tensors[f"{prefix}.self_attn.q_proj.lora_A.weight"].shape) == (8, 128)
    assert tuple(tensors[f"{prefix}.self_attn.v_proj.lora_B.weight"].shape) == (128, 8)
    assert tuple(tensors[f"{prefix}.mlp.down_proj.lora_A.weight"].shape) == (8, 256)
    assert tensors[f"{prefix}.mlp.down_proj.lora_B.weight"].abs().sum() > 0  # unlike PEFT's init: it changes output


def test_adapter_builds_are_cached_by_recipe_and_base(tmp_path):
    spec = tiny()
    first = resolve_adapter_source(spec, spec.lora.adapters[0], tmp_path)
    assert resolve_adapter_source(spec, spec.lora.adapters[0], tmp_path) == first
    other_base = tiny(build={**BASE, "seed": 9})
    assert resolve_adapter_source(other_base, other_base.lora.adapters[0], tmp_path) != first
    assert LoraBuildRecipe(seed=1).fingerprint(spec.build) != LoraBuildRecipe(seed=2).fingerprint(spec.build)


# --- engine arguments ---------------------------------------------------------------------------


def test_engine_args_enable_lora_with_a_spare_slot_on_cpu():
    cpu = engine_kwargs(tiny(), "/m", on_cpu=True)
    assert cpu | {"enable_lora": True, "max_loras": 3, "max_cpu_loras": 3, "max_lora_rank": 8} == cpu
    assert lora_adapters_per_replica(tiny(), on_cpu=True) == 2  # the last slot never fills (see its docstring)
    gpu = engine_kwargs(tiny(lora={**LORA, "max_cpu_loras": 6}), "/m", on_cpu=False)
    assert gpu | {"max_loras": 2, "max_cpu_loras": 6} == gpu
    assert lora_adapters_per_replica(tiny(lora={**LORA, "max_cpu_loras": 6}), on_cpu=False) == 6
    assert "enable_lora" not in engine_kwargs(tiny(lora=None), "/m", on_cpu=True)


# --- registry -----------------------------------------------------------------------------------


def registry() -> ModelRegistry:
    small = ModelSpec(name="small", build=BASE, fallbacks=["tiny"])
    return ModelRegistry([tiny(fallbacks=["small"]), small])


def test_adapter_routes_to_its_base_engine_under_its_own_name():
    reg = registry()
    route = reg.resolve("sql")
    assert (route.model, route.base_model, route.engine, route.version) == ("sql", "tiny", "engine-tiny-v1", "v1")
    assert route.adapter.name == "sql" and route.adapter.multiplexed_id.startswith("sql#")
    assert reg.resolve("tiny").adapter is None
    chain = reg.chain("sql")
    assert [link.model for link in chain] == ["sql", "small"]  # the base model's fallbacks
    assert reg.spec(route).name == "tiny"
    card = next(card for card in reg.model_list().data if card.id == "sql")
    assert (card.root, card.versions, card.max_model_len) == ("sql", ["v1"], 512)
    assert getattr(card, "parent", "tiny") == "tiny"


def test_configured_adapters_keep_their_lora_id_across_router_incarnations():
    assert registry().resolve("sql").adapter.lora_id == registry().resolve("sql").adapter.lora_id
    assert registry().revision != registry().revision  # but a new router's copy is always news


def test_tenants_allow_adapters_by_name():
    link = registry().chain("sql")
    assert allowed_links(Tenant("t", frozenset({"sql"})), "sql", link)[0].model == "sql"
    with pytest.raises(OpenAIError) as refused:
        allowed_links(Tenant("t", frozenset({"tiny"})), "sql", link)
    assert refused.value.status_code == 403


def test_adapters_added_and_removed_at_runtime_change_the_revision():
    reg = registry()
    revision = reg.revision
    route = reg.new_adapter("tiny", "poet", "/adapters/poet")
    with pytest.raises(ModelNotFoundError):
        reg.resolve("poet")  # not registered before an engine loaded it
    reg.add_adapter(route)
    assert reg.resolve("poet").adapter.source.path == "/adapters/poet"
    assert reg.revision != revision
    again = reg.new_adapter("tiny", "poet2", "/adapters/poet")
    assert again.adapter.lora_id != route.adapter.lora_id  # re-added weights are a new adapter to vLLM
    assert reg.remove_adapter("poet").name == "poet"
    with pytest.raises(ModelNotFoundError):
        reg.resolve("poet")
    with pytest.raises(ModelNotFoundError):
        reg.remove_adapter("poet")


@pytest.mark.parametrize(
    ("model", "name", "version", "error", "status"),
    [
        ("nope", "x", None, ModelNotFoundError, 404),
        ("tiny", "x", "v9", ModelNotFoundError, 404),
        ("small", "x", None, BadRequestError, 400),  # no `lora` in its config
        ("tiny", "sql", None, AdapterConflictError, 409),
        ("tiny", "small", None, AdapterConflictError, 409),
    ],
)
def test_new_adapter_refusals(model, name, version, error, status):
    with pytest.raises(error) as refused:
        registry().new_adapter(model, name, "/x", version)
    assert refused.value.status_code == status


class RouterFake:
    """The router's registry_if_changed, counting calls."""

    def __init__(self) -> None:
        self.registry = registry()
        self.calls = 0

    async def fetch(self, revision: str | None):
        self.calls += 1
        await asyncio.sleep(0)
        return None if revision == self.registry.revision else pickled(self.registry)  # a copy, as over Ray


def test_ingress_copy_learns_of_a_new_adapter_on_the_first_request_naming_it():
    async def scenario():
        router, clock = RouterFake(), FakeClock()
        copy = RegistryCopy(router.fetch, refresh_interval_s=5, miss_interval_s=1, clock=clock)
        await copy.set_traffic({"tiny": {"v1": 1}})
        assert router.calls == 1
        await copy.chain("tiny", None)
        assert router.calls == 1  # no hop per request
        router.registry.add_adapter(router.registry.new_adapter("tiny", "poet", "/p"))
        assert (await copy.chain("poet", None))[0].model == "poet"
        assert router.calls == 2
        for _ in range(3):
            with pytest.raises(ModelNotFoundError):
                await copy.chain("unknown", None)
        assert router.calls == 2  # misses ask the router at most once per miss_interval_s
        clock.now += 1
        with pytest.raises(ModelNotFoundError):
            await copy.chain("unknown", None)
        assert router.calls == 3

    asyncio.run(scenario())


def test_ingress_copy_drops_a_removed_adapter_after_a_background_refresh():
    async def scenario():
        router, clock = RouterFake(), FakeClock()
        copy = RegistryCopy(router.fetch, refresh_interval_s=5, clock=clock)
        await copy.chain("sql", None)
        router.registry.remove_adapter("sql")
        assert (await copy.chain("sql", None))[0].model == "sql"  # still the old copy
        clock.now += 5
        await copy.chain("tiny", None)  # starts the refresh, answers from the current copy
        await asyncio.sleep(0.01)
        with pytest.raises(ModelNotFoundError):
            await copy.chain("sql", None)

    asyncio.run(scenario())


def pickled(value):
    import pickle

    return pickle.loads(pickle.dumps(value))


# --- engine replica ---------------------------------------------------------------------------


WORKER_FAILURE = (  # how vLLM 0.32 reports a worker's failure to load an adapter
    "Call to add_lora method failed: Worker failed with error '{}', "
    "please check the stack trace above for the root cause"
)


@pytest.mark.parametrize(
    ("reason", "error", "code"),
    [
        ("Loading lora sql failed: No adapter found for /nowhere", ModelNotFoundError, "adapter_not_found"),
        ("Error while deserializing header: header too large", BadRequestError, "adapter_load_failed"),
        ("LoRA rank 16 is greater than max_lora_rank 8.", BadRequestError, "adapter_load_failed"),
    ],
)
def test_vllm_adapter_failures_are_client_errors(reason, error, code):
    adapter = registry().resolve("sql").adapter
    mapped = adapter_load_error(adapter, Exception(WORKER_FAILURE.format(reason)))
    assert isinstance(mapped, error) and mapped.code == code
    assert mapped.message.endswith(reason) and "`sql`" in mapped.message


@dataclass(frozen=True)
class LoraRequestFake:
    lora_name: str
    lora_int_id: int
    lora_path: str


class FakeAsyncLLM:
    def __init__(self, refuse: set[str] = frozenset()) -> None:
        self.refuse = refuse
        self.added: list[tuple[str, int, str]] = []
        self.removed: list[int] = []

    async def add_lora(self, request) -> bool:
        if request.lora_name in self.refuse:
            raise Exception(WORKER_FAILURE.format(f"No adapter found for {request.lora_path}"))
        self.added.append((request.lora_name, request.lora_int_id, request.lora_path))
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return True


def lru_multiplexed(max_num_models_per_replica: int):
    """Serve's multiplexing in miniature: load once per id, evict the least recently used."""

    def decorate(load):
        loaded: dict[str, object] = {}

        async def wrapper(model_id: str):
            if model_id in loaded:
                loaded[model_id] = loaded.pop(model_id)
                return loaded[model_id]
            if len(loaded) >= max_num_models_per_replica:
                await loaded.pop(next(iter(loaded))).__del__()
            loaded[model_id] = await load(model_id)
            return loaded[model_id]

        return wrapper

    return decorate


def test_engine_loads_each_adapter_once_and_unloads_what_serve_evicts(tmp_path):
    async def scenario():
        reg = registry()
        for name in ("a", "b"):
            reg.add_adapter(reg.new_adapter("tiny", name, f"/adapters/{name}"))
        engine = FakeAsyncLLM(refuse={"b"})
        adapters = EngineAdapters(engine, tiny(), tmp_path, 1, lru_multiplexed, LoraRequestFake)
        sql = reg.resolve("sql").adapter
        first = await adapters.lora_request(sql)
        again = await adapters.lora_request(sql)
        assert first is again and len(engine.added) == 1
        assert (first.lora_name, first.lora_int_id) == ("sql", sql.lora_id)
        assert first.lora_path == resolve_adapter_source(tiny(), sql.source, tmp_path)  # built on this node
        with pytest.raises(ModelNotFoundError, match="`b` was not found"):
            await adapters.lora_request(reg.resolve("b").adapter)
        await adapters.lora_request(reg.resolve("a").adapter)
        assert engine.removed == [sql.lora_id]  # one adapter per replica here: sql made room for a

    asyncio.run(scenario())


def test_admin_app_routes_adapters_for_admins_only():
    from fastapi.testclient import TestClient

    from servegraph.deployments.admin import build_admin_app
    from servegraph.deployments.front_door import TenantDirectory
    from servegraph.models.config import AuthConfig

    auth = AuthConfig(tenants=[{"name": "team", "key_hashes": ["sha256:" + "0" * 64]}])
    client = TestClient(build_admin_app("llm", TenantDirectory(auth)))
    for method, path in [("get", "/adapters"), ("post", "/adapters"), ("delete", "/adapters/sql")]:
        assert getattr(client, method)(path).status_code == 401, path
