import hashlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from servegraph.models.build import build_local_model, ensure_local_model
from servegraph.models.engine_config import cpu_kv_cache_bytes, engine_kwargs, kv_cache_bytes
from servegraph.models.spec import LocalBuildRecipe, ModelSpec

ROOT = Path(__file__).resolve().parents[1]


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_recipe_builds_byte_identical_files(tmp_path):
    recipe = LocalBuildRecipe(seed=3)
    build_local_model(recipe, tmp_path / "a")
    build_local_model(recipe, tmp_path / "b")
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(file_digests(tmp_path / "a"))


def test_different_seed_gives_different_weights(tmp_path):
    build_local_model(LocalBuildRecipe(seed=0), tmp_path / "a")
    build_local_model(LocalBuildRecipe(seed=1), tmp_path / "b")
    a, b = file_digests(tmp_path / "a"), file_digests(tmp_path / "b")
    assert a["model.safetensors"] != b["model.safetensors"]
    assert a["tokenizer.json"] == b["tokenizer.json"]


def test_cache_is_reused(model_cache):
    recipe = LocalBuildRecipe()
    first = ensure_local_model(recipe, model_cache)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_local_model(recipe, model_cache) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_tokenizer_has_chat_template_and_round_trips_multibyte(tiny_tokenizer):
    text = "héllo 世界 🚀"
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text
    rendered = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_spec_needs_exactly_one_source():
    with pytest.raises(ValidationError, match="exactly one of path, hub_id, build"):
        ModelSpec(name="m", path="/x", hub_id="org/m")
    with pytest.raises(ValidationError, match="exactly one"):
        ModelSpec(name="m")


def test_spec_rejects_unknown_fields():
    with pytest.raises(ValidationError, match="max_model_lenn"):
        ModelSpec(name="m", path="/x", max_model_lenn=5)


def test_engine_kwargs_pass_through_overrides(tiny_spec):
    spec = tiny_spec.model_copy(update={"engine_args": {"enforce_eager": False, "seed": 7}})
    kwargs = engine_kwargs(spec, "/models/tiny", on_cpu=True)
    assert "skip_tokenizer_init" not in kwargs  # structured outputs compile grammars with the engine's tokenizer
    assert kwargs["enforce_eager"] is False and kwargs["seed"] == 7
    assert engine_kwargs(tiny_spec, "/m", on_cpu=False)["gpu_memory_utilization"] == 0.92


def test_kv_cache_budget_arithmetic(tiny_spec):
    need = kv_cache_bytes(tiny_spec, num_layers=2, num_kv_heads=2, head_dim=64)
    assert need == 2 * 2 * 2 * 64 * 2 * tiny_spec.max_model_len * tiny_spec.max_num_seqs
    assert cpu_kv_cache_bytes(need) == 64 * 2**20  # the floor
    assert cpu_kv_cache_bytes(3 * 2**30) == 6 * 2**30


def test_cpu_amx_plugin_is_registered_with_vllm():
    from importlib.metadata import entry_points

    from servegraph.models import cpu_amx

    plugins = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert plugins["servegraph_cpu_amx"].load() is cpu_amx.prepare_process


def test_cpu_amx_modes(monkeypatch):
    import torch

    from servegraph.models import cpu_amx

    monkeypatch.setenv(cpu_amx.MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match="auto, off, vllm"):
        cpu_amx.mode_from_env()
    monkeypatch.delenv(cpu_amx.MODE_ENV)
    assert cpu_amx.mode_from_env() == "auto"
    assert "no AMX tiles" in cpu_amx.describe("auto", has_amx=False)
    assert "requests AMX tile permission" in cpu_amx.describe("auto", has_amx=True)
    assert cpu_amx.plugin_allowed({}) and cpu_amx.plugin_allowed({"VLLM_PLUGINS": "x, servegraph_cpu_amx"})
    assert not cpu_amx.plugin_allowed({"VLLM_PLUGINS": "lora_filesystem_resolver"})
    assert "has no effect" in cpu_amx.describe("auto", has_amx=True, plugin_loads=False)

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    cpu_amx.apply("vllm")
    assert torch.cpu._is_amx_tile_supported()
    cpu_amx.apply("off")  # what vLLM's kernel choice then sees
    assert not torch.cpu._is_amx_tile_supported()
    with pytest.raises(ValidationError):
        ModelSpec(name="m", build=LocalBuildRecipe(), cpu_amx="on")


def test_process_guard_sees_a_parent_gone_once_the_child_is_handed_to_another():
    from servegraph.models.process_guard import parent_gone

    assert not parent_gone(4242, current_parent=lambda: 4242)
    assert parent_gone(4242, current_parent=lambda: 1)


def test_a_vllm_child_whose_parent_is_killed_exits_with_it(tmp_path):
    """What happens to a killed replica's engine core: it is a multiprocessing child that loaded the plugin."""
    import subprocess
    import sys

    import psutil

    script = tmp_path / "family.py"
    script.write_text(
        "import multiprocessing, time\n"
        "from servegraph.models.process_guard import watch_parent\n"
        "def child():\n    watch_parent()\n    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    multiprocessing.set_start_method('spawn')\n"
        "    p = multiprocessing.Process(target=child)\n    p.start()\n    print(p.pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = psutil.Process(int(parent.stdout.readline()))
    parent.kill()  # SIGKILL: no chance to clean up, as a replica killed by the OOM killer
    parent.wait()
    psutil.wait_procs([child], timeout=30)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
