"""Embeddings per second through the graph: a fixed batch workload on /v1/embeddings.

R requests, each a batch of B texts of W words (seeded draws out of the local models' corpus), C in
flight, after a short warm-up. Prints embeddings/s, requests/s, input tokens/s (the responses'
`usage`) and request latency p50/p99. With --offline it then runs vLLM's offline `LLM.embed` on
the same texts, with the engine arguments the graph's embedder uses, all in one call: the
engine's own ceiling on this machine.

    python -m servegraph.bench.embeddings --requests 64 --batch 16 --words 24 --concurrency 4
    python -m servegraph.bench.embeddings --url http://127.0.0.1:8000 --model minilm   # a running graph

Without --url it serves graphs/local.yaml's `minilm` alone on a Ray head of its own, and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from servegraph.models.build import CORPUS_PATH

WARMUP_REQUESTS = 4


def batches(requests: int, batch: int, words: int, seed: int, corpus: list[str]) -> list[list[str]]:
    """`requests` batches of `batch` texts, each `words` consecutive corpus words from a seeded start."""
    if min(requests, batch, words) < 1 or len(corpus) < words:
        raise ValueError("requests, batch and words must be at least 1, and the corpus longer than words")
    rng = random.Random(seed)
    starts = [[rng.randrange(len(corpus) - words + 1) for _ in range(batch)] for _ in range(requests)]
    return [[" ".join(corpus[start : start + words]) for start in row] for row in starts]


@dataclass(frozen=True)
class Outcome:
    """One request as the client saw it."""

    ok: bool
    embeddings: int
    input_tokens: int
    latency_s: float


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summarize(outcomes: list[Outcome], duration_s: float) -> dict[str, float | int | None]:
    """Throughput over the wall time of the measured requests; latency of the answered ones."""
    answered = [o for o in outcomes if o.ok]
    latencies = [o.latency_s for o in answered]
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    return {
        "requests": len(outcomes),
        "failed": len(outcomes) - len(answered),
        "embeddings_per_s": round(sum(o.embeddings for o in answered) / duration_s, 1),
        "requests_per_s": round(len(answered) / duration_s, 2),
        "input_tokens_per_s": round(sum(o.input_tokens for o in answered) / duration_s, 1),
        "latency_p50_ms": None if p50 is None else round(p50 * 1000, 1),
        "latency_p99_ms": None if p99 is None else round(p99 * 1000, 1),
    }


async def embed(client: httpx.AsyncClient, url: str, body: dict) -> Outcome:
    started = time.perf_counter()
    response = await client.post(url, json=body)
    latency = time.perf_counter() - started
    if response.status_code != 200:
        return Outcome(False, 0, 0, latency)
    answer = response.json()
    return Outcome(True, len(answer["data"]), answer["usage"]["prompt_tokens"], latency)


async def run(base_url: str, model: str, workload: list[list[str]], args: argparse.Namespace, headers: dict) -> dict:
    url = f"{base_url}/v1/embeddings"
    gate = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(timeout=600, headers=headers) as client:

        async def one(texts: list[str]) -> Outcome:
            async with gate:
                return await embed(client, url, {"model": model, "input": texts, "encoding_format": args.encoding})

        await asyncio.gather(*(one(texts) for texts in workload[:WARMUP_REQUESTS]))
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(one(texts) for texts in workload))
        return summarize(list(outcomes), time.perf_counter() - started)


def offline_figures(config: dict, model: str, workload: list[list[str]]) -> dict[str, float]:
    """vLLM's offline LLM.embed over every text at once, with the graph's engine arguments for the model."""
    from vllm import LLM

    from servegraph.bench.targets import model_spec
    from servegraph.deployments.embedder import pooling_engine_kwargs
    from servegraph.models.build import resolve_model_source

    spec = model_spec(config, model)
    llm = LLM(**pooling_engine_kwargs(spec, resolve_model_source(spec), on_cpu=True))
    texts = [text for batch in workload for text in batch]
    llm.embed(texts[: len(workload[0])], use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.embed(texts, use_tqdm=False)
    duration = time.perf_counter() - started
    tokens = sum(len(output.prompt_token_ids) for output in outputs)
    return {"embeddings_per_s": round(len(outputs) / duration, 1), "input_tokens_per_s": round(tokens / duration, 1)}


def local_graph(model: str) -> dict:
    """graphs/local.yaml serving `model` alone."""
    from servegraph.bench.targets import single_model_config
    from servegraph.graphs.local_cluster import load_config

    return single_model_config(load_config(), model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="Texts per request.")
    parser.add_argument("--words", type=int, default=24, help="Words per text (24: at most 211 MiniLM tokens).")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--encoding", choices=["float", "base64"], default="base64")  # the openai client's default
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--url", help="A running graph; default: start one serving the model alone.")
    parser.add_argument("--api-key")
    parser.add_argument("--offline", action="store_true", help="Also run vLLM's offline LLM.embed on the texts.")
    parser.add_argument("--out", help="Write the figures as JSON here too.")
    args = parser.parse_args(argv)
    corpus = CORPUS_PATH.read_text(encoding="utf-8").split()
    workload = batches(args.requests, args.batch, args.words, args.seed, corpus)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.url:
        figures = asyncio.run(run(args.url.rstrip("/"), args.model, workload, args, headers))
    else:
        from servegraph.bench.targets import ClusterTarget

        with ClusterTarget("servegraph", args.model, local_graph(args.model)) as base_url:
            figures = asyncio.run(run(base_url, args.model, workload, args, headers))
    report = {"figures": figures, "settings": vars(args)}
    print(f"graph: {figures}", flush=True)  # noqa: T201
    if args.offline:
        offline = offline_figures(local_graph(args.model), args.model, workload)
        ratio = round(figures["embeddings_per_s"] / offline["embeddings_per_s"], 2)
        report |= {"vllm_offline": offline, "graph_vs_offline": ratio}
    print(json.dumps(report, indent=2))  # noqa: T201
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
