"""The prefix-aware router on the real graph: `resilience`'s `canary` v1 runs two engine replicas
behind it (block_size 16, imbalance_threshold 2; see conftest's resilience_app).

Which replica served a request is read from the engine replicas' own log files: each replica
writes its `engine request finished` line with the request's id, in a file named after it.
"""

from __future__ import annotations

import random
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.e2e.conftest import poll

APP, ENGINE = "resilience", "engine-canary-v1"
PREFIX_TOKENS = 64  # four 16-token blocks, well inside canary's 128-token context
LONG_OUTPUT = 48  # long enough that a burst overlaps on the engines


def fresh_prefix() -> list[int]:
    """Token ids no other test sent: the router's index lives as long as the session."""
    rng = random.Random(uuid.uuid4().int)
    return [rng.randrange(200, 1000) for _ in range(PREFIX_TOKENS)]


def send(graph, prompt: list[int], max_tokens: int = 2) -> str:
    """One completion with a token-id prompt; its request id."""
    request_id = f"prefix-{uuid.uuid4().hex[:12]}"
    body = {"model": "canary", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    response = httpx.post(
        f"{graph.base_url}/{APP}/v1/completions", json=body, headers={"X-Request-Id": request_id}, timeout=120
    )
    assert response.status_code == 200, response.text
    return request_id


def replica_logs(graph, deployment: str) -> dict[str, Path]:
    paths = (graph.logs_dir / "serve").glob(f"replica_{APP}_{deployment}_*.log")
    return {path.stem.rsplit("_", 1)[1]: path for path in paths}


def served_by_replica(graph, request_ids: list[str]) -> dict[str, str]:
    """request id -> the engine replica that finished it, once every one of them has logged."""

    def found() -> dict[str, str] | None:
        replicas = {}
        for replica, path in replica_logs(graph, ENGINE).items():
            for line in path.read_text(errors="replace").splitlines():
                if "engine request finished" in line:
                    replicas.update({rid: replica for rid in request_ids if rid in line})
        return replicas if len(replicas) == len(request_ids) else None

    return poll(found, 30, "the engine replicas to log every request")


def send_sequentially(graph, prompts: list[list[int]]) -> list[str]:
    """Each prompt after the previous one finished: the replicas' queues stay even."""
    ids = [send(graph, prompt) for prompt in prompts]
    served = served_by_replica(graph, ids)
    return [served[rid] for rid in ids]


def send_burst(graph, prefix: list[int], requests: int = 8) -> list[str]:
    """All at once, each generating LONG_OUTPUT tokens: queues grow on whichever replica holds the prefix."""
    with ThreadPoolExecutor(requests) as pool:
        ids = list(pool.map(lambda n: send(graph, prefix + [n + 1] * 4, LONG_OUTPUT), range(requests)))
    served = served_by_replica(graph, ids)
    return [served[rid] for rid in ids]


def running_replicas(graph) -> list[dict]:
    apps = graph.cluster.applications()
    return [r for r in apps[APP]["deployments"][ENGINE]["replicas"] if r["state"] == "RUNNING"]


def test_requests_sharing_a_prefix_stay_on_one_replica_while_load_is_even(graph):
    prefix = fresh_prefix()
    shared = send_sequentially(graph, [prefix + [n + 1] * 5 for n in range(6)])
    assert len(set(shared)) == 1, shared
    # Not one sticky replica: each new prefix goes where its first block hashes, so several spread.
    distinct = send_sequentially(graph, [fresh_prefix() for _ in range(8)])
    assert len(set(distinct)) == 2, distinct


def test_requests_sharing_a_prefix_spread_when_load_is_uneven(graph):
    served = send_burst(graph, fresh_prefix())
    counts = {replica: served.count(replica) for replica in set(served)}
    # Affinity alone would put all eight on one replica; past 2 requests of imbalance the other takes some.
    assert len(counts) == 2 and min(counts.values()) >= 2, served


def test_a_killed_replica_drops_out_of_the_index_and_its_replacement_takes_requests(graph):
    import ray

    prefix = fresh_prefix()
    holder = set(send_sequentially(graph, [prefix + [n + 1] * 5 for n in range(3)]))
    assert len(holder) == 1
    (killed,) = holder
    actor = next(r["actor_name"] for r in running_replicas(graph) if r["replica_id"] == killed)
    ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)

    def dropped() -> bool:
        logs = replica_logs(graph, "postprocess").values()
        return any(f"prefix index: dropped replica {killed}" in path.read_text(errors="replace") for path in logs)

    poll(dropped, 60, f"the router to drop {killed} from its index")
    survivor = set(send_sequentially(graph, [prefix + [n + 7] * 5 for n in range(3)]))
    assert len(survivor) == 1 and killed not in survivor, survivor

    def replaced() -> set[str] | None:
        now = {r["replica_id"] for r in running_replicas(graph)}
        return now - survivor if len(now) == 2 and killed not in now else None

    (replacement,) = poll(replaced, 600, "Serve to replace the killed replica", interval_s=1)
    assert set(send_sequentially(graph, [prefix + [9] * 5])) == survivor  # the prefix stayed where it lives
    # Serve tells the router about the new replica shortly after it runs; then bursts reach it too.
    poll(lambda: replacement in send_burst(graph, fresh_prefix()), 60, f"a request to reach {replacement}")
