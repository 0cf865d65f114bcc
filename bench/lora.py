"""LoRA throughput: the base model alone against 1 and 4 adapters in use, on one engine.

    python -m servegraph.bench.lora [--requests 96 --concurrency 32 --max-tokens 64]

Runs vLLM's AsyncLLM with the engine arguments our Engine deployment derives for the default
graph's `tiny` with LoRA on (models/engine_config.py, CPU spare slot included) and the adapters
the project builds (models/build.py), so the figures are the engine's cost of multi-LoRA, without
the graph's hops (those are the same for every model name). Each scenario sends the same
requests (random prompt token ids, fixed length, ignore_eos) with `concurrency` in flight:
`base` without adapter, `1 adapter` all to one, `4 adapters` round robin over four.
Prints output tokens/s per scenario (median of --rounds) and each one's share of the base's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
import uuid

from servegraph.models.build import default_cache_dir, ensure_local_model, resolve_adapter_source
from servegraph.models.engine_config import cpu_kv_cache_bytes, engine_kwargs, kv_cache_bytes
from servegraph.models.spec import ModelSpec

ADAPTERS = 4
SPEC = ModelSpec(
    name="tiny",
    build={"hidden_size": 128, "num_layers": 2, "seed": 0},
    max_model_len=512,
    max_num_seqs=32,
    lora={
        "max_loras": ADAPTERS,
        "max_lora_rank": 8,
        "adapters": [{"name": f"tiny-lora-{i}", "build": {"seed": i}} for i in range(1, ADAPTERS + 1)],
    },
)


async def run_scenario(engine, lora_requests: list, requests: int, concurrency: int, prompt_len: int,
                       max_tokens: int) -> float:  # fmt: skip
    """Output tokens per second for `requests` requests, `concurrency` at a time, adapters round robin."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY
    )
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 1000) for _ in range(prompt_len)] for _ in range(requests)]
    slots = asyncio.Semaphore(concurrency)
    generated = 0

    async def one(index: int) -> None:
        nonlocal generated
        lora = lora_requests[index % len(lora_requests)] if lora_requests else None
        async with slots:
            prompt = TokensPrompt(prompt_token_ids=prompts[index])
            async for output in engine.generate(prompt, params, uuid.uuid4().hex, lora_request=lora):
                if output.finished:
                    generated += len(output.outputs[0].token_ids)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    return generated / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    from transformers import AutoConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    cache = default_cache_dir()
    model = str(ensure_local_model(SPEC.build, cache))
    config = AutoConfig.from_pretrained(model)
    kwargs = engine_kwargs(SPEC, model, on_cpu=True)
    head_dim = config.hidden_size // config.num_attention_heads
    kv = kv_cache_bytes(SPEC, config.num_hidden_layers, config.num_key_value_heads, head_dim)
    kwargs.setdefault("kv_cache_memory_bytes", cpu_kv_cache_bytes(kv))
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    try:
        loras = [
            LoRARequest(adapter.name, i + 1, resolve_adapter_source(SPEC, adapter, cache))
            for i, adapter in enumerate(SPEC.lora.adapters)
        ]
        for lora in loras:
            await engine.add_lora(lora)
        scenarios = {"base": [], "1 adapter": loras[:1], f"{ADAPTERS} adapters": loras}
        shape = (args.requests, args.concurrency, args.prompt_len, args.max_tokens)
        await run_scenario(engine, loras, args.concurrency, args.concurrency, args.prompt_len, 8)  # warm up
        rates: dict[str, list[float]] = {name: [] for name in scenarios}
        for _ in range(args.rounds):  # interleaved, so drift in the machine's load hits every scenario
            for name, lora_requests in scenarios.items():
                rates[name].append(await run_scenario(engine, lora_requests, *shape))
    finally:
        engine.shutdown()
    base = statistics.median(rates["base"])
    print(f"requests={args.requests} concurrency={args.concurrency} prompt={args.prompt_len} "
          f"max_tokens={args.max_tokens} rounds={args.rounds}")  # fmt: skip
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:>11}: {median:8.0f} output tokens/s  ({median / base:6.1%} of base)  runs {values}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
