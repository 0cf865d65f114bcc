"""Per-hop latency of the graph: each stage called through its own handle, medians in ms.

Runs in a process that is a driver of the graph's Ray cluster (bench.compare is).
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import httpx

from servegraph.deployments.messages import PreparedRequest, Sealed
from servegraph.deployments.protocol import ClientRequest


async def median_ms(call: Callable[[], Awaitable[object]], repeats: int) -> float:
    await call()  # warm up connections and caches
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


async def _measure(base_url: str, model: str, app: str, repeats: int) -> dict[str, float]:
    from ray import serve

    def handle(name: str):
        return serve.get_deployment_handle(name, app_name=app)

    router, tokenizer, postprocess = handle("router"), handle("tokenizer"), handle("postprocess")
    request = ClientRequest.of(
        "completion", {"model": model, "prompt": "Hello there", "max_tokens": 1, "temperature": 0}
    )
    route = (await router.registry.remote()).resolve(model)  # as the ingress does: the registry's copy
    prepared = (await tokenizer.prepare.remote(route, request, "hops")).open()
    engine = handle(route.engine).options(stream=True)
    request_ids = (f"hops-{i}" for i in itertools.count())

    def fresh() -> PreparedRequest:
        (engine_request,) = prepared.engine_requests
        return replace(prepared, engine_requests=[replace(engine_request, request_id=next(request_ids))])

    async def engine_call() -> list:
        return [chunk async for chunk in engine.generate.remote(fresh().engine_requests)]

    t = {
        "tokenizer": await median_ms(lambda: tokenizer.prepare.remote(route, request, "hops"), repeats),
        "engine": await median_ms(engine_call, repeats),
        "postprocess+engine": await median_ms(lambda: postprocess.complete.remote(Sealed.of(fresh())), repeats),
        "http": await _one_token_http_ms(base_url, model, repeats),
    }
    return {
        **{f"{name} ms": value for name, value in t.items()},
        "added by tokenizer hop ms": t["tokenizer"],
        "added by postprocess hop ms": t["postprocess+engine"] - t["engine"],
        "added by proxy+ingress ms": t["http"] - t["tokenizer"] - t["postprocess+engine"],
        **await _messages_per_token(tokenizer, engine, postprocess, route, model),
    }


STREAM_TOKENS = 64


async def _messages_per_token(tokenizer, engine, postprocess, route, model: str) -> dict[str, float]:
    """Ray messages per generated token of one 64-token stream, per hop: engine -> postprocess -> ingress."""
    body = {"model": model, "prompt": "Hello there", "max_tokens": STREAM_TOKENS, "ignore_eos": True, "stream": True}
    prepared = (await tokenizer.prepare.remote(route, ClientRequest.of("completion", body), "hops-stream")).open()
    engine_messages = len([item async for item in engine.generate.remote(prepared.engine_requests)])
    prepared = replace(prepared, engine_requests=[replace(prepared.engine_requests[0], request_id="hops-stream-2")])
    stream = postprocess.options(stream=True).stream.remote(Sealed.of(prepared))
    postprocess_messages = len([item async for item in stream])
    return {
        "engine->postprocess msgs/token": engine_messages / STREAM_TOKENS,
        "postprocess->ingress msgs/token": postprocess_messages / STREAM_TOKENS,
    }


async def _one_token_http_ms(base_url: str, model: str, repeats: int) -> float:
    body = {"model": model, "prompt": "Hello there", "max_tokens": 1, "temperature": 0}
    async with httpx.AsyncClient(timeout=60) as client:

        async def call() -> None:
            (await client.post(f"{base_url}/v1/completions", json=body)).raise_for_status()

        return await median_ms(call, repeats)


def one_token_http_ms(base_url: str, model: str, repeats: int = 100) -> float:
    """Median latency of a sequential one-token completion over HTTP: any OpenAI server."""
    return asyncio.run(_one_token_http_ms(base_url, model, repeats))


def hop_latencies(base_url: str, model: str, app: str = "llm", repeats: int = 100) -> dict[str, float]:
    """One-token requests, sequential: what each hop adds when nothing else is running.

    The caller must be a driver of the graph's Ray cluster; the route is the graph's root.
    """
    return asyncio.run(_measure(base_url, model, app, repeats))
