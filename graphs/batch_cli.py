"""`servegraph batch`: a JSONL of requests through a running graph's Batch API, or a Parquet file offline.

Online (a `.jsonl` input): uploads the file, creates the batch, shows its progress on stderr
and downloads the output and error files next to the input; Ctrl-C cancels the batch.

Offline (`--offline`, a Parquet input): no graph; Ray Data's LLM processor
(`ray.data.llm.build_processor` over a `vLLMEngineProcessorConfig`) runs the model spec named
in a Serve config, with the engine arguments the graph's engine would use, over the whole
dataset, reading and writing Parquet, so a dataset larger than the online path should carry
spreads over the Ray cluster. Input columns: `custom_id` and `body` (a JSON request, as a
batch line's body: `messages` for chat, `prompt` for completions, and sampling fields).
Output columns: `custom_id`, `generated_text`, `num_input_tokens`, `num_generated_tokens`,
`generated_tokens` (the token ids).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ENDED = ("completed", "failed", "expired", "cancelled")
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "min_tokens", "n")
BAR_WIDTH = 30
# Logical CPUs of a local cluster: the read, tokenize, engine, detokenize and write stages each hold
# one at once (with four, the detokenize actor waited forever and the job never finished).
LOCAL_MIN_CPUS = 8


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("batch", help="run a JSONL file through the Batch API (or a Parquet file offline)")
    parser.add_argument("input", type=Path, help="requests: JSONL (online) or Parquet (--offline)")
    parser.add_argument("--endpoint", default="/v1/chat/completions", help="the batch's endpoint")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the graph's OpenAI base URL")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    parser.add_argument("--output", type=Path, help="results (default: INPUT.output.jsonl / .parquet)")
    parser.add_argument("--errors", type=Path, help="failed lines (default: INPUT.errors.jsonl)")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between progress checks")
    offline = parser.add_argument_group("offline mode (Ray Data)")
    offline.add_argument("--offline", action="store_true", help="run with Ray Data's LLM processor, no graph")
    offline.add_argument("--config", type=Path, default=Path("graphs/local.yaml"), help="Serve config with the model")
    offline.add_argument("--app", default="llm", help="application of the config whose model to use")
    offline.add_argument("--model", default="tiny", help="model name in that application")
    offline.add_argument("--batch-size", type=int, default=16, help="rows per engine call")
    offline.add_argument("--concurrency", type=int, default=1, help="engine replicas (Ray Data actors)")
    offline.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    offline.add_argument("--num-cpus", type=int, default=None,
                         help="logical CPUs of a local cluster (default: at least 8, for the CPU stages)")  # fmt: skip
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.offline:
        output = args.output or args.input.with_suffix(".output.parquet")
        rows = run_offline(args.config, args.app, args.model, args.endpoint, args.input, output,
                           args.batch_size, args.concurrency, args.address, args.num_cpus)  # fmt: skip
        print(f"{rows} rows written to {output}")
        return 0
    return run_online(args)


# Online


def progress_line(batch: dict[str, Any]) -> str:
    counts = batch.get("request_counts") or {"total": 0, "completed": 0, "failed": 0}
    total, done = counts["total"], counts["completed"] + counts["failed"]
    filled = BAR_WIDTH * done // total if total else 0
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    return f"[{bar}] {done}/{total} ({counts['completed']} ok, {counts['failed']} failed) {batch['status']}"


def checked(response) -> dict[str, Any]:
    """The JSON body of a 2xx answer; SystemExit with the API's error message otherwise."""
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        raise SystemExit(f"servegraph batch: {response.request.method} {response.request.url}: "
                         f"{response.status_code} {message}")  # fmt: skip
    return response.json()


def run_online(args: argparse.Namespace) -> int:
    import httpx

    key = os.environ.get(args.api_key_env, "unused")
    output = args.output or args.input.with_suffix(".output.jsonl")
    errors = args.errors or args.input.with_suffix(".errors.jsonl")
    with httpx.Client(base_url=args.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as http:
        with open(args.input, "rb") as file:
            uploaded = checked(http.post("/files", files={"file": (args.input.name, file)}, data={"purpose": "batch"}))
        body = {"input_file_id": uploaded["id"], "endpoint": args.endpoint, "completion_window": "24h"}
        batch = checked(http.post("/batches", json=body))
        print(f"batch {batch['id']} created from {uploaded['id']}", file=sys.stderr)
        try:
            while batch["status"] not in ENDED:
                print("\r" + progress_line(batch), end="", file=sys.stderr, flush=True)
                time.sleep(args.poll_interval)
                batch = checked(http.get(f"/batches/{batch['id']}"))
        except KeyboardInterrupt:
            batch = checked(http.post(f"/batches/{batch['id']}/cancel"))
            print(f"\nbatch {batch['id']} {batch['status']}", file=sys.stderr)
            return 130
        print("\r" + progress_line(batch), file=sys.stderr)
        for file_id, path in ((batch.get("output_file_id"), output), (batch.get("error_file_id"), errors)):
            if file_id:
                response = http.get(f"/files/{file_id}/content")
                path.write_bytes(response.content if response.status_code == 200 else b"")
                print(f"{path}: {len(response.content.splitlines())} lines", file=sys.stderr)
    return 0 if batch["status"] == "completed" else 1


# Offline


def offline_row(body_json: str, chat: bool, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """A batch line's body as Ray Data's vLLM processor takes a row: messages or prompt, and sampling_params.

    defaults fill the fields a body leaves out: Ray Data stacks rows into one Arrow struct, where a
    field one row lacks reads None in that row, and vLLM's SamplingParams refuses None for most.
    """
    body = json.loads(body_json)
    sampling = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    if "max_completion_tokens" in body and "max_tokens" not in sampling:
        sampling["max_tokens"] = body["max_completion_tokens"]
    prompt = {"messages": body["messages"]} if chat else {"prompt": body["prompt"]}
    return {**prompt, "sampling_params": {**(defaults or {}), **sampling}}


def sampling_defaults(default_max_tokens: int) -> dict[str, Any]:
    """vLLM's own SamplingParams defaults for every field a body may set, and the model's max_tokens."""
    from vllm import SamplingParams

    defaults = SamplingParams()
    return {**{name: getattr(defaults, name) for name in SAMPLING_FIELDS}, "max_tokens": default_max_tokens}


def model_spec(config: Path, app: str, model: str):
    from servegraph.graphs.cli import read_config

    for app_config, args in read_config(config).llm_apps():
        if app_config["name"] == app:
            for spec in args.models:
                if model in spec.served_names:
                    return spec, args
    raise SystemExit(f"servegraph batch: {config}: application {app!r} has no model {model!r}")


def offline_engine_kwargs(spec, source: str, on_cpu: bool) -> dict[str, Any]:
    """The graph engine's arguments for this spec (models/engine_config.py), sized the same way on CPU."""
    from transformers import AutoConfig

    from servegraph.models.engine_config import cpu_kv_cache_bytes, engine_kwargs, kv_cache_bytes

    kwargs = engine_kwargs(spec, source, on_cpu)
    kwargs.pop("model"), kwargs.pop("served_model_name")
    kwargs.pop("scheduling_policy")  # one job, one priority: first come, first served
    if on_cpu:
        config = AutoConfig.from_pretrained(source)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        need = kv_cache_bytes(spec, config.num_hidden_layers, config.num_key_value_heads, head_dim)
        kwargs.setdefault("kv_cache_memory_bytes", cpu_kv_cache_bytes(need))
    return kwargs


def run_offline(
    config: Path, app: str, model: str, endpoint: str, input_path: Path, output: Path,
    batch_size: int = 16, concurrency: int = 1, address: str | None = None, num_cpus: int | None = None,
) -> int:  # fmt: skip
    """Every row of input_path through the model with Ray Data's vLLM processor; the rows written."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from servegraph.models import cpu_amx
    from servegraph.models.build import resolve_model_source

    spec, args = model_spec(config, app, model)
    if not ray.is_initialized():  # before build_processor, which would start Ray with its defaults (2 CPUs here)
        local = {"num_cpus": num_cpus or max(LOCAL_MIN_CPUS, os.cpu_count() or 1)} if address is None else {}
        ray.init(address=address or "local", **local)  # "local": a cluster of its own, never one found lying about
    on_cpu = args.accelerator == "cpu"
    source = resolve_model_source(spec, Path(args.cache_dir) if args.cache_dir else None)
    chat = endpoint == "/v1/chat/completions"
    defaults = sampling_defaults(spec.default_max_tokens)
    env = {cpu_amx.MODE_ENV: spec.cpu_amx, "VLLM_CONFIGURE_LOGGING": "0"}
    processor_config = vLLMEngineProcessorConfig(
        model_source=source,
        engine_kwargs=offline_engine_kwargs(spec, source, on_cpu),
        batch_size=batch_size,
        concurrency=concurrency,
        runtime_env={"env_vars": env},
        # Ray Data asks a GPU per engine worker unless told otherwise; on CPU hosts a CPU bundle.
        placement_group_config={"bundles": [{"CPU": 1}]} if on_cpu else None,
        chat_template_stage=chat,
        tokenize_stage=True,
        detokenize_stage=True,
    )
    processor = build_processor(
        processor_config,
        preprocess=lambda row: {"custom_id": row["custom_id"], **offline_row(row["body"], chat, defaults)},
        postprocess=lambda row: {
            "custom_id": row["custom_id"],
            "generated_text": row["generated_text"],
            "num_input_tokens": row["num_input_tokens"],
            "num_generated_tokens": row["num_generated_tokens"],
            "generated_tokens": row["generated_tokens"],
        },
    )
    dataset = processor(ray.data.read_parquet(str(input_path)))
    dataset.write_parquet(str(output))
    return ray.data.read_parquet(str(output)).count()
