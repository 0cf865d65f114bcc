"""Prefix-aware routing benchmark: multi-turn conversations sharing a long system prompt, on two
engine replicas of the local tiny model, under three request routers in turn.

    python -m servegraph.bench.prefix_routing                                   # 64 x 6 turns
    python -m servegraph.bench.prefix_routing --conversations 16 --turns 4      # smaller
    python -m servegraph.bench.prefix_routing --routers prefix,pow2

Routers: `prefix` (ours, servegraph.deployments.prefix_router), `pow2` (Serve's default power
of two choices) and `ray-prefix` (ray.serve.llm's PrefixCacheAffinityRouter, reading token ids:
bench/ray_prefix_router.py). Each runs on a Ray cluster of its own with the same graph, so
only the router differs. Every conversation sends its turns one after another, all of them at
once: a turn's prompt is the system prompt, then every earlier user message and reply, then
the new user message, as token ids (replies are fixed synthetic tokens, so every router sees
the same prompts). Prints, per router: vLLM's prefix-cache hit rate (its own
prefix_cache_hits / prefix_cache_queries counters, summed over both replicas), TTFT p50/p99,
output throughput, and the busiest replica's share of the prompt tokens (how even the load
was). Routers run one after another on a machine whose speed drifts: treat TTFT and
throughput differences of a few percent as noise.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import random
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from servegraph.bench.targets import single_model_config
from servegraph.graphs.local_cluster import LocalServeCluster, load_config, wait_for
from servegraph.models.spec import PREFIX_ROUTER_CLASS_PATH, PrefixRouterSettings

MODEL = "tiny"
ROUTER_NAMES = ("prefix", "pow2", "ray-prefix")


def request_routers(imbalance_threshold: int) -> dict[str, dict[str, Any] | None]:
    """Each router's `request_router` spec; both prefix routers get the same imbalance threshold."""
    return {
        "prefix": {"class_path": PREFIX_ROUTER_CLASS_PATH, "kwargs": {"imbalance_threshold": imbalance_threshold}},
        "pow2": None,  # Serve's default
        "ray-prefix": {
            "class_path": "servegraph.bench.ray_prefix_router:TokenPrefixCacheAffinityRouter",
            "kwargs": {"imbalanced_threshold": imbalance_threshold},
        },
    }


PREFIX_CACHE_SAMPLE = re.compile(r"^ray_vllm[_:]prefix_cache_(hits|queries)(?:_total)?(\{.*\})?\s+(\S+)$")
REPLICA_LABEL = re.compile(r'ReplicaId="([^"]*)"')
FIRST_TOKEN_ID = 10  # clear of the tokenizer's special tokens


@dataclass(frozen=True)
class ConversationWorkload:
    """Conversations x turns; every length in tokens."""

    conversations: int = 64
    turns: int = 6
    system_len: int = 300
    user_len: int = 32
    reply_len: int = 32
    output_len: int = 32
    vocab_size: int = 1024
    seed: int = 0

    @property
    def max_prompt_len(self) -> int:
        return self.system_len + self.turns * self.user_len + (self.turns - 1) * self.reply_len

    def prompts(self) -> list[list[list[int]]]:
        """Per conversation, each turn's prompt: the shared system prompt, the history, the new message."""
        rng = random.Random(self.seed)

        def tokens(n: int) -> list[int]:
            return [rng.randrange(FIRST_TOKEN_ID, self.vocab_size) for _ in range(n)]

        system = tokens(self.system_len)
        conversations = []
        for _ in range(self.conversations):
            history, turns = list(system), []
            for _ in range(self.turns):
                history += tokens(self.user_len)
                turns.append(list(history))
                history += tokens(self.reply_len)
            conversations.append(turns)
        return conversations


@dataclass(frozen=True)
class Turn:
    ttft_s: float
    completion_tokens: int


Counters = dict[str, tuple[float, float]]  # engine replica -> (prefix-cache hits, queries), in tokens


@dataclass(frozen=True)
class Figures:
    router: str
    hit_rate: float
    busiest_share: float  # the busiest replica's share of the prompt tokens: how even the load was
    ttft_p50_ms: float
    ttft_p99_ms: float
    output_tokens_per_s: float
    requests: int
    duration_s: float


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks, as numpy's default."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def prefix_cache_counters(metrics_text: str) -> Counters:
    """Per engine replica (Ray's ReplicaId label), vLLM's prefix-cache (hits, queries) in tokens."""
    counters: dict[str, dict[str, float]] = {}
    for line in metrics_text.splitlines():
        if match := PREFIX_CACHE_SAMPLE.match(line):
            kind, labels, value = match.groups()
            replica = REPLICA_LABEL.search(labels or "")
            totals = counters.setdefault(replica.group(1) if replica else "", {"hits": 0.0, "queries": 0.0})
            totals[kind] += float(value)
    return {replica: (totals["hits"], totals["queries"]) for replica, totals in counters.items()}


def growth(before: Counters, after: Counters) -> Counters:
    """What each replica's counters gained (a replica absent before started at zero)."""
    return {
        replica: (hits - before.get(replica, (0.0, 0.0))[0], queries - before.get(replica, (0.0, 0.0))[1])
        for replica, (hits, queries) in after.items()
    }


def hit_rate(gained: Counters) -> float:
    queries = sum(q for _, q in gained.values())
    return sum(h for h, _ in gained.values()) / queries if queries else 0.0


def busiest_share(gained: Counters) -> float:
    queries = [q for _, q in gained.values()]
    return max(queries) / sum(queries) if sum(queries) else 0.0


def figures(router: str, turns: list[Turn], duration_s: float, gained: Counters) -> Figures:
    ttfts_ms = [turn.ttft_s * 1000 for turn in turns]
    return Figures(
        router=router,
        hit_rate=hit_rate(gained),
        busiest_share=busiest_share(gained),
        ttft_p50_ms=percentile(ttfts_ms, 50),
        ttft_p99_ms=percentile(ttfts_ms, 99),
        output_tokens_per_s=sum(turn.completion_tokens for turn in turns) / duration_s,
        requests=len(turns),
        duration_s=duration_s,
    )


def table(rows: list[Figures]) -> str:
    lines = [
        f"{'router':<12} {'hit rate':>9} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'out tok/s':>10} "
        f"{'busiest':>8} {'requests':>9}"
    ]
    lines += [
        f"{r.router:<12} {r.hit_rate:>9.1%} {r.ttft_p50_ms:>12.1f} {r.ttft_p99_ms:>12.1f} "
        f"{r.output_tokens_per_s:>10.1f} {r.busiest_share:>8.0%} {r.requests:>9}"
        for r in rows
    ]
    return "\n".join(lines)


def graph_config(
    router: dict[str, Any] | None, workload: ConversationWorkload, block_size: int | None = None
) -> dict[str, Any]:
    """graphs/local.yaml's LLM app with only `tiny`, on two engine replicas behind `router`.

    block_size: the engines' KV block size (vLLM's default on CPU is 128 tokens, 16 on GPUs);
    our router takes it from the engine args.
    """
    config = copy.deepcopy(single_model_config(load_config(), MODEL))
    model = config["applications"][0]["args"]["models"][0]
    model.update(
        max_model_len=2 ** math.ceil(math.log2(workload.max_prompt_len + workload.output_len)),
        autoscaling={"min_replicas": 2, "max_replicas": 2},
    )
    if router is not None:
        model["request_router"] = router
    if block_size is not None:
        model["engine_args"] = {"block_size": block_size}
    return config


async def converse(client: httpx.AsyncClient, turns: list[list[int]], output_len: int) -> list[Turn]:
    """One conversation's turns, each streamed after the previous one ended."""
    done = []
    for prompt in turns:
        body = {
            "model": MODEL, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        started, first, tokens = time.perf_counter(), None, 0
        async with client.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                first = first or time.perf_counter()
                usage = json.loads(line.removeprefix("data: ")).get("usage")
                tokens = usage["completion_tokens"] if usage else tokens
        done.append(Turn(ttft_s=(first or time.perf_counter()) - started, completion_tokens=tokens))
    return done


async def run_conversations(base_url: str, workload: ConversationWorkload) -> tuple[list[Turn], float]:
    limits = httpx.Limits(max_connections=workload.conversations)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(converse(client, c, workload.output_len) for c in workload.prompts()))
        return [turn for turns in results for turn in turns], time.perf_counter() - started


def settled_counters(metrics_url: str) -> Counters:
    """The prefix-cache counters once two reads 2 s apart agree (Ray exports every second here)."""
    previous: list[Counters] = []

    def stable() -> Counters | None:
        current = prefix_cache_counters(httpx.get(metrics_url, timeout=10).text)
        exported = sum(queries for _, queries in current.values()) > 0
        agreed = exported and previous and previous[-1] == current
        previous.append(current)
        return current if agreed else None

    return wait_for(stable, 120, "the prefix-cache counters to settle", interval_s=2)


def warm_up(base_url: str, workload: ConversationWorkload) -> None:
    """A few short unrelated prompts, so both replicas' first-request costs stay out of the figures."""
    rng = random.Random(-1)
    for _ in range(6):
        prompt = [rng.randrange(FIRST_TOKEN_ID, workload.vocab_size) for _ in range(16)]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 4}
        httpx.post(f"{base_url}/v1/completions", json=body, timeout=300).raise_for_status()


def measure(
    name: str, router: dict[str, Any] | None, workload: ConversationWorkload, block_size: int | None
) -> Figures:
    """One router: its own cluster, warmed up, then the conversations, then vLLM's counters."""
    config = graph_config(router, workload, block_size)
    cluster = LocalServeCluster(config, Path(tempfile.mkdtemp()), num_cpus=8, metrics_report_interval_ms=1000)
    with cluster:
        warm_up(cluster.base_url, workload)
        before = settled_counters(cluster.metrics_url)
        turns, duration_s = asyncio.run(run_conversations(cluster.base_url, workload))
        after = settled_counters(cluster.metrics_url)
    return figures(name, turns, duration_s, growth(before, after))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ConversationWorkload()
    parser.add_argument("--routers", default=",".join(ROUTER_NAMES), help=f"comma-separated: {', '.join(ROUTER_NAMES)}")
    for field in ("conversations", "turns", "system_len", "user_len", "reply_len", "output_len", "seed"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
    parser.add_argument("--imbalance-threshold", type=int, default=PrefixRouterSettings().imbalance_threshold)
    parser.add_argument("--block-size", type=int, help="the engines' KV block size (default: vLLM's)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON result")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    routers = [name for name in args.routers.split(",") if name]
    if unknown := set(routers) - set(ROUTER_NAMES):
        raise SystemExit(f"unknown routers {sorted(unknown)}; known: {', '.join(ROUTER_NAMES)}")
    specs = request_routers(args.imbalance_threshold)
    fields = ("conversations", "turns", "system_len", "user_len", "reply_len", "output_len", "seed")
    workload = ConversationWorkload(**{field: getattr(args, field) for field in fields})
    rows = []
    for name in routers:
        rows.append(measure(name, specs[name], workload, args.block_size))
        print(table(rows[-1:]), flush=True)
    settings = f"engine block size {args.block_size or 'vLLM default'}, imbalance threshold {args.imbalance_threshold}"
    print(f"\n{workload}, {settings}\n{table(rows)}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = args.out / f"prefix-routing-{time.strftime('%Y%m%d-%H%M%S')}.json"
    summary = {
        "workload": asdict(workload),
        "block_size": args.block_size,
        "imbalance_threshold": args.imbalance_threshold,
        "routers": [asdict(r) for r in rows],
    }
    result.write_text(json.dumps(summary, indent=2))
    print(f"written: {result}")


if __name__ == "__main__":
    main()
