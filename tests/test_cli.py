"""`servegraph validate|run`: config mistakes fail before anything starts."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.serve.request_router import RequestRouter

from servegraph.graphs.cli import ConfigError, read_config, validate_config
from servegraph.graphs.local_cluster import ROOT, load_config


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "graph.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def llm_app(config: dict) -> dict:
    return next(app for app in config["applications"] if app["name"] == "llm")


def test_default_config_validates():
    summary = validate_config(read_config(ROOT / "graphs" / "local.yaml"))
    assert summary[0] == (
        "llm (/): router, tokenizer, engine-tiny-v1, engine-small-v1, engine-minilm-v1, postprocess, batch-runner, "
        "ingress"
    )
    assert summary[1] == "admin (/admin): admin"


def test_misspelled_field_is_named(tmp_path):
    config = load_config()
    llm_app(config)["args"]["models"][0]["max_model_lenn"] = 5
    with pytest.raises(ConfigError, match=r"args\.models\.0\.max_model_lenn: Extra inputs are not permitted"):
        validate_config(read_config(write_config(tmp_path, config)))


def test_duplicate_served_name_is_refused(tmp_path):
    config = load_config()
    llm_app(config)["args"]["models"][1]["aliases"] = ["tiny"]
    with pytest.raises(ConfigError, match="'tiny' is used by both 'tiny' and 'small'"):
        validate_config(read_config(write_config(tmp_path, config)))


def test_override_of_unknown_deployment_is_refused(tmp_path):
    config = load_config()
    llm_app(config)["deployments"].append({"name": "engine-huge", "num_replicas": 2})
    with pytest.raises(ConfigError, match=r"overrides unknown deployments \['engine-huge'\]"):
        validate_config(read_config(write_config(tmp_path, config)))


@pytest.mark.parametrize(
    ("traffic", "message"),
    [({"tiny": {"v2": 1}}, r"not deployed: tiny \['v2'\]"), ({"tiny": {"v1": -1}}, "weights must be >= 0")],
)
def test_traffic_weights_must_name_deployed_versions(tmp_path, traffic, message):
    config = load_config()
    ingress = next(d for d in llm_app(config)["deployments"] if d["name"] == "ingress")
    ingress["user_config"] = {"traffic": traffic}
    with pytest.raises(ConfigError, match=message):
        validate_config(read_config(write_config(tmp_path, config)))


def test_run_exits_before_starting_ray(tmp_path):
    config = load_config()
    llm_app(config)["args"]["models"][0]["long_prompt"] = "truncate_middle"
    result = subprocess.run(
        [sys.executable, "-m", "servegraph.graphs.cli", "run", str(write_config(tmp_path, config))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "args.models.0.long_prompt" in result.stderr and "Started a local Ray instance" not in result.stderr


def test_haproxy_mode_keeps_each_cluster_apart(monkeypatch):
    from servegraph.graphs.local_cluster import haproxy_env

    monkeypatch.delenv("SERVEGRAPH_HAPROXY", raising=False)
    first, second = haproxy_env(isolated=True), haproxy_env(isolated=True)
    assert first["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # ray[serve] bundles the binary
    for key in ("RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT"):
        assert first[key] != second[key]
    assert len(first["RAY_SERVE_HAPROXY_SOCKET_PATH"]) + 65 <= 97  # Ray adds a 64-character folder
    assert haproxy_env() == {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    monkeypatch.setenv("SERVEGRAPH_HAPROXY", "0")
    assert haproxy_env(isolated=True) == {}


def test_a_lasting_port_is_never_one_already_chosen(monkeypatch):
    from servegraph.graphs.local_cluster import RAY_WORKER_PORTS_END, haproxy_env, lasting_free_port

    monkeypatch.delenv("SERVEGRAPH_HAPROXY", raising=False)
    gap = range(RAY_WORKER_PORTS_END + 1, int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0]))
    chosen = lasting_free_port()
    assert chosen in gap
    assert lasting_free_port({port for port in gap if port != chosen}) == chosen  # the only one left
    env = haproxy_env(isolated=True, taken={chosen})
    ports = {env["RAY_SERVE_HAPROXY_METRICS_PORT"], env["RAY_SERVE_HAPROXY_STATS_PORT"]}
    assert len(ports) == 2 and str(chosen) not in ports


class FirstReplicaRouter(RequestRouter):
    """A team's routing policy, named in its config: always the first candidate replica."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return [candidate_replicas[:1]]


def test_a_models_request_router_named_in_config_reaches_its_engine_deployment(tmp_path):
    from ray.serve._private.build_app import build_app

    from servegraph.graphs.builder import build_llm_app
    from servegraph.models.config import LLMAppArgs

    config = load_config()
    tiny = llm_app(config)["args"]["models"][0]
    tiny["request_router"] = {"class_path": "tests.test_cli:FirstReplicaRouter", "kwargs": {"note": "first"}}
    validate_config(read_config(write_config(tmp_path, config)))
    built = build_app(build_llm_app(LLMAppArgs.model_validate(llm_app(config)["args"])), name="llm")
    configs = {d.name: d._deployment_config.request_router_config for d in built.deployments}
    assert configs["engine-tiny-v1"].request_router_class == "tests.test_cli:FirstReplicaRouter"
    assert configs["engine-tiny-v1"].request_router_kwargs == {"note": "first"}
    assert configs["engine-small-v1"].request_router_class.endswith("PowerOfTwoChoicesRequestRouter")
    tiny["request_router"] = {"class_path": "tests.test_cli:NoSuchRouter"}
    with pytest.raises(ConfigError, match="NoSuchRouter"):
        validate_config(read_config(write_config(tmp_path, config)))
