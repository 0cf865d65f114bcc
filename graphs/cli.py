"""`servegraph`: check a graph config before anything starts, then run it with Serve."""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

if TYPE_CHECKING:
    from ray.serve.schema import ServeDeploySchema

    from servegraph.models.config import LLMAppArgs
    from servegraph.models.spec import ModelSpec


class ConfigError(Exception):
    """A config problem, phrased for the person who wrote the YAML."""


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  args.{where}: {item['msg']}")
    return "\n".join(lines)


@dataclass(frozen=True)
class ConfigFile:
    """A Serve config file read once: its YAML as written, and Serve's own schema of it."""

    path: Path
    raw: dict[str, Any]
    schema: ServeDeploySchema

    def llm_apps(self) -> Iterator[tuple[dict[str, Any], LLMAppArgs]]:
        """Each application `build_llm_app` builds, as written, with its typed args."""
        from servegraph.models.config import LLMAppArgs

        for app_config in self.raw["applications"]:
            if app_config["import_path"].endswith(":build_llm_app"):
                yield app_config, LLMAppArgs.model_validate(app_config.get("args", {}))


def read_config(path: Path) -> ConfigFile:
    """The file parsed and checked against Serve's schema; ConfigError saying what is wrong."""
    from ray.serve.schema import ServeDeploySchema

    try:
        raw = yaml.safe_load(path.read_text())
        return ConfigFile(path, raw, ServeDeploySchema.model_validate(raw))
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"{path}: not a valid Serve config:\n{exc}") from exc


def validate_config(config: ConfigFile) -> list[str]:
    """Build every application of a Serve config without deploying it.

    Returns a line per application naming its deployments; raises ConfigError naming the
    application and field at fault.
    """
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    summary = []
    for app_config in config.schema.applications:
        where = f"{config.path}: application {app_config.name!r}"
        try:
            app = call_user_app_builder_with_args_if_necessary(import_attr(app_config.import_path), app_config.args)
        except ValidationError as exc:
            raise ConfigError(f"{where} has invalid args:\n{_describe(exc)}") from exc
        except (ImportError, AttributeError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        names = [d.name for d in build_app(app, name=app_config.name).deployments]
        unknown = sorted({d.name for d in app_config.deployments} - set(names))
        if unknown:
            raise ConfigError(f"{where} overrides unknown deployments {unknown}; it has {names}")
        check_ingress_config(where, app_config)
        summary.append(f"{app_config.name} ({app_config.route_prefix}): {', '.join(names)}")
    return summary


def check_ingress_config(where: str, app_config) -> None:
    """The ingress user_config (traffic weights) must name the app's own models and versions."""
    from servegraph.deployments.router import ModelRegistry
    from servegraph.models.config import IngressConfig, LLMAppArgs

    ingress = next((d for d in app_config.deployments if d.name == "ingress"), None)
    user_config = getattr(ingress, "user_config", None)
    if not app_config.import_path.endswith(":build_llm_app") or not isinstance(user_config, dict):
        return
    try:
        traffic = IngressConfig.model_validate(user_config).traffic
        args = LLMAppArgs.model_validate(app_config.args)
        ModelRegistry(args.models, args.upstreams).set_traffic(traffic)
    except ValidationError as exc:
        raise ConfigError(f"{where}: invalid ingress user_config:\n{_describe(exc)}") from exc
    except ValueError as exc:
        raise ConfigError(f"{where}: invalid ingress user_config: {exc}") from exc


def build_models(config: ConfigFile) -> list[Path]:
    """Build the config's local models now so the first deploy does not wait for them."""
    from servegraph.models.build import default_cache_dir, ensure_local_model

    built = []
    for _, args in config.llm_apps():
        cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        built += [ensure_local_model(spec.build, cache) for spec in args.models if spec.build is not None]
    return built


def engine_replicas(app_config: dict, spec: ModelSpec) -> int:
    """The most replicas a config lets a model's engine deployment have."""
    override = next((d for d in app_config.get("deployments", []) if d.get("name") == spec.engine_deployment_name), {})
    autoscaling = override.get("autoscaling_config") or {}
    fixed = override.get("num_replicas")
    fixed = None if fixed == "auto" else fixed  # Serve's "auto" autoscales: the model's bounds stand
    return int(autoscaling.get("max_replicas") or fixed or spec.autoscaling.max_replicas)


def plan_config(config: ConfigFile, node_types) -> list[str]:
    """The placement of every GPU application of a Serve config; PlacementError if one does not fit."""
    from servegraph.models.placement import plan_placement

    reports = []
    for app_config, args in config.llm_apps():
        if args.accelerator == "cpu":
            reports.append(f"application {app_config['name']!r} runs on CPU: no GPUs to place")
            continue
        models = [(spec, engine_replicas(app_config, spec)) for spec in args.models]
        reports.append(f"application {app_config['name']!r}:\n{plan_placement(models, node_types).render()}")
    return reports


def cluster_node_types(args: argparse.Namespace):
    from servegraph.models.cluster import load_launcher_config, node_types_from_launcher, node_types_from_live_cluster

    gpu_memory = dict(item.split("=", 1) for item in args.gpu_memory)
    gpu_memory = {gpu: float(gib) for gpu, gib in gpu_memory.items()}
    if args.address:
        import ray

        ray.init(address=args.address, log_to_driver=False)
        return node_types_from_live_cluster(gpu_memory)
    return node_types_from_launcher(load_launcher_config(args.cluster), gpu_memory)


USAGE_COLUMNS = ["day", "tenant", "model", "requests", "succeeded", "failed", "cancelled", "prompt_tokens",
                 "completion_tokens", "total_tokens"]  # fmt: skip


def usage_report(args: argparse.Namespace) -> str:
    """A fixed-width table of summarize()'s rows, with a total line."""
    from servegraph.deployments.usage import read_usage, summarize
    from servegraph.models.config import UsageConfig

    directory = args.dir or UsageConfig().directory()
    table = read_usage(directory, since=args.since, until=args.until)  # only the days asked for
    report = summarize(table, tenant=args.tenant, application=args.application, since=args.since, until=args.until)
    rows = [[str(getattr(day, column)) for column in USAGE_COLUMNS] for day in report.data]
    totals = [sum(getattr(day, column) for day in report.data) for column in USAGE_COLUMNS[3:]]
    rows.append(["total", "", "", *map(str, totals)])
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(USAGE_COLUMNS)]
    lines = [USAGE_COLUMNS, *rows]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


# Modules that add a subcommand: each has `add_command(commands)`, which registers a parser whose
# defaults set `handler`, a function of the parsed args returning the exit status.
COMMAND_MODULES: tuple[str, ...] = (
    "servegraph.graphs.k8s",
    "servegraph.autoscale.simulate",
    "servegraph.graphs.batch_cli",
)


def main(argv: list[str] | None = None) -> int:
    from servegraph.models.placement import PlacementError

    parser = argparse.ArgumentParser(prog="servegraph", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("validate", "check a Serve config's typed args and deployment overrides"),
        ("build-models", "build the config's local models into the cache"),
        ("run", "validate, build local models, then `serve run` the config"),
        ("plan", "print where each model's engines go on a cluster's GPUs, or why they do not fit"),
    ]:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("config", type=Path)
        if name == "plan":
            command.add_argument("--cluster", type=Path, default=Path("cluster.yaml"), help="cluster-launcher file")
            command.add_argument("--address", help="plan against this live Ray cluster instead (e.g. auto)")
            command.add_argument(
                "--gpu-memory", action="append", default=[], metavar="TYPE=GIB", help="memory of a GPU type"
            )
    hash_command = commands.add_parser("hash-key", help="print the key_hashes entry for an API key read from stdin")
    hash_command.set_defaults(config=None)
    usage_command = commands.add_parser("usage", help="print usage per tenant, model and day from the Parquet files")
    usage_command.add_argument("--dir", type=Path, help="usage directory (default as the graph's: usage.dir)")
    usage_command.add_argument("--tenant", help="only this tenant")
    usage_command.add_argument("--application", help="only this application")
    usage_command.add_argument("--since", type=date.fromisoformat, help="first day, YYYY-MM-DD (UTC)")
    usage_command.add_argument("--until", type=date.fromisoformat, help="last day, YYYY-MM-DD (UTC)")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_command(commands)
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is not None:
        return args.handler(args)
    if args.command == "hash-key":
        from servegraph.deployments.auth import hash_key

        print(hash_key(sys.stdin.readline().strip()))
        return 0
    if args.command == "usage":
        print(usage_report(args))
        return 0

    try:
        config = read_config(args.config)
        summary = validate_config(config)
        if args.command == "plan":
            summary = plan_config(config, cluster_node_types(args))
    except (ConfigError, PlacementError) as exc:
        print(f"servegraph: {exc}", file=sys.stderr)
        return 2
    if args.command in ("validate", "plan"):
        print("\n".join(summary))
        return 0
    for model_dir in build_models(config):
        print(f"model ready: {model_dir}")
    if args.command == "run":
        from servegraph.graphs.local_cluster import SERVE_ENV, haproxy_env

        for name, value in (SERVE_ENV | haproxy_env()).items():
            os.environ.setdefault(name, value)
        serve = shutil.which("serve") or str(Path(sys.executable).with_name("serve"))
        os.execv(serve, [serve, "run", str(args.config)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
