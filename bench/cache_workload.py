"""Repeated questions (FAQ-like traffic) against the ingress's response cache: cache off, then on.

N greedy streaming requests are drawn (uniformly, seeded) from K distinct questions and sent
with C in flight. The same graph serves both sides: "off" sends every request with
`Cache-Control: no-store` (the cache neither answers nor keeps it), "on" sends them plainly,
starting from an empty cache for those questions (each run's questions carry a fresh tag). It
prints, per side, the hit rate (from the `X-Servegraph-Cache` header), TTFT p50/p99 (to the
first SSE event), end-to-end p50, requests/s and output tokens/s, and the best hit rate the
schedule allows with one ingress replica (every repeat of a question already asked).

    python -m servegraph.bench.cache_workload --requests 200 --distinct 20 --concurrency 8
    python -m servegraph.bench.cache_workload --url http://127.0.0.1:8000 --model tiny   # a running graph

Without --url it serves graphs/local.yaml's `tiny` alone with the response cache on, on a Ray
head of its own, and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import uuid
from dataclasses import dataclass

import httpx

CACHE_HEADER = "x-servegraph-cache"  # deployments.response_cache.CACHE_HEADER, as httpx lowers it
NO_STORE = {"Cache-Control": "no-store"}


def question_schedule(requests: int, distinct: int, seed: int) -> list[int]:
    """Which of `distinct` questions each of `requests` requests asks, drawn uniformly and reproducibly."""
    if requests < 1 or distinct < 1:
        raise ValueError("requests and distinct must be at least 1")
    rng = random.Random(seed)
    return [rng.randrange(distinct) for _ in range(requests)]


def best_hit_rate(schedule: list[int]) -> float:
    """The hit rate of a perfect single cache: every request but each question's first."""
    return (len(schedule) - len(set(schedule))) / len(schedule)


def questions(distinct: int, tag: str) -> list[str]:
    """K prompts, each tagged with the run so another run's entries never answer them."""
    return [f"[{tag}] Question {index}: what are the opening hours of branch {index}?" for index in range(distinct)]


@dataclass(frozen=True)
class Outcome:
    """One request as the client saw it."""

    ok: bool
    cache: str | None  # the X-Servegraph-Cache header: hit, miss, or None (not cacheable)
    ttft_s: float | None
    latency_s: float
    completion_tokens: int


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def summarize(outcomes: list[Outcome], duration_s: float) -> dict[str, float | int | None]:
    """Hit rate over the answered requests, latency percentiles in ms, throughput over the run's wall time."""
    answered = [o for o in outcomes if o.ok]
    ttfts = [o.ttft_s for o in answered if o.ttft_s is not None]
    hits = sum(o.cache == "hit" for o in answered)
    return {
        "requests": len(outcomes),
        "failed": len(outcomes) - len(answered),
        "hit_rate": round(hits / len(answered), 3) if answered else None,
        "ttft_p50_ms": ms(percentile(ttfts, 0.5)),
        "ttft_p99_ms": ms(percentile(ttfts, 0.99)),
        "e2e_p50_ms": ms(statistics.median([o.latency_s for o in answered])) if answered else None,
        "requests_per_s": round(len(answered) / duration_s, 2) if duration_s > 0 else None,
        "output_tokens_per_s": round(sum(o.completion_tokens for o in answered) / duration_s, 1)
        if duration_s > 0
        else None,
    }


def usage_of(event: str) -> int | None:
    """The completion tokens of a stream's usage event (stream_options.include_usage), else None."""
    if not event.startswith("{"):
        return None
    usage = json.loads(event).get("usage")
    return usage.get("completion_tokens") if usage else None


async def ask(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> Outcome:
    started = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return Outcome(False, None, None, time.perf_counter() - started, 0)
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                ttft = ttft if ttft is not None else time.perf_counter() - started
                tokens = usage_of(line.removeprefix("data: ")) or tokens
            return Outcome(True, response.headers.get(CACHE_HEADER), ttft, time.perf_counter() - started, tokens)
    except httpx.HTTPError:
        return Outcome(False, None, ttft, time.perf_counter() - started, 0)


async def run_side(
    base_url: str, model: str, prompts: list[str], schedule: list[int], concurrency: int, max_tokens: int, headers: dict
) -> dict:
    url = f"{base_url}/v1/completions"
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> Outcome:
        body = {"model": model, "prompt": prompts[index], "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        async with gate:
            return await ask(client, url, body, headers)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(one(index) for index in schedule))
        return summarize(list(outcomes), time.perf_counter() - started)


def compare(base_url: str, model: str, args: argparse.Namespace, api_key: str | None) -> dict:
    """The off side, then the on side, each over a fresh set of questions and the same schedule."""
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    schedule = question_schedule(args.requests, args.distinct, args.seed)
    sides = {}
    for side, extra in (("off", NO_STORE), ("on", {})):
        prompts = questions(args.distinct, f"{side}-{uuid.uuid4().hex[:6]}")
        run = run_side(base_url, model, prompts, schedule, args.concurrency, args.max_tokens, auth | extra)
        sides[side] = asyncio.run(run)
        print(f"cache {side}: {sides[side]}", flush=True)  # noqa: T201
    return {"best_hit_rate": round(best_hit_rate(schedule), 3), "sides": sides, "settings": vars(args)}


def local_graph_with_cache(model: str) -> dict:
    """graphs/local.yaml serving `model` alone, its response cache on."""
    from servegraph.bench.targets import llm_app, single_model_config
    from servegraph.graphs.local_cluster import load_config

    config = single_model_config(load_config(), model)
    app = llm_app(config)
    app["args"] = {**app["args"], "response_cache": {"enabled": True}}
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--distinct", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--url", help="A running graph (its response cache on for the caller); default: start one.")
    parser.add_argument("--api-key")
    parser.add_argument("--out", help="Write the figures as JSON here too.")
    args = parser.parse_args(argv)
    if args.url:
        report = compare(args.url.rstrip("/"), args.model, args, args.api_key)
    else:
        from servegraph.bench.targets import ClusterTarget

        with ClusterTarget("servegraph", args.model, local_graph_with_cache(args.model)) as base_url:
            report = compare(base_url, args.model, args, args.api_key)
    print(json.dumps(report, indent=2))  # noqa: T201
    if args.out:
        with open(args.out, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
