"""The prefix-aware router: block hashing, the per-replica index and the choice (no Ray cluster),
then the Serve subclass around them with stand-in replicas, and its config."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import pytest
from pydantic import ValidationError

from servegraph.deployments.prefix_index import PrefixAffinity, PrefixIndex, block_hashes
from servegraph.models.spec import (
    PREFIX_ROUTER_CLASS_PATH,
    LocalBuildRecipe,
    ModelSpec,
    PrefixRouterSettings,
    RequestRouterSpec,
)

SYSTEM = list(range(100, 164))  # 64 tokens: four 16-token blocks


def affinity(**settings: int) -> PrefixAffinity:
    return PrefixAffinity(PrefixRouterSettings(**settings))


# --- block hashes ---------------------------------------------------------------------------


def test_block_hashes_cover_full_blocks_and_chain_the_prefix():
    hashes = block_hashes(SYSTEM + [1, 2, 3], 16)
    assert len(hashes) == 4  # the partial last block is not hashed: vLLM does not cache it
    assert block_hashes(SYSTEM + [9, 9], 16) == hashes
    changed_first = block_hashes([7] + SYSTEM[1:], 16)
    assert all(a != b for a, b in zip(changed_first, hashes, strict=True))  # block 3 differs: its prefix does
    assert block_hashes(SYSTEM[:15], 16) == []


def test_same_tokens_in_another_position_hash_differently():
    block = list(range(16))
    assert block_hashes(block + block, 16)[1] != block_hashes(block, 16)[0]


# --- the index ------------------------------------------------------------------------------


def test_index_matches_leading_blocks_only():
    index = PrefixIndex(capacity=100)
    index.record("a", block_hashes(SYSTEM, 16))
    assert index.matched_blocks("a", block_hashes(SYSTEM + list(range(16)), 16)) == 4
    assert index.matched_blocks("a", block_hashes(SYSTEM[:32] + list(range(32)), 16)) == 2
    assert index.matched_blocks("b", block_hashes(SYSTEM, 16)) == 0


def test_index_is_bounded_and_evicts_tails_before_shared_prefixes():
    index = PrefixIndex(capacity=6)
    shared = block_hashes(SYSTEM, 16)
    for suffix in range(5):
        index.record("a", block_hashes(SYSTEM + [suffix] * 32, 16))
    assert index.size("a") == 6
    assert index.matched_blocks("a", shared) == 4  # the prefix every prompt shares survives
    first_conversation = block_hashes(SYSTEM + [0] * 32, 16)
    assert index.matched_blocks("a", first_conversation) == 4  # its own tail went first


def test_index_forgets_replicas():
    index = PrefixIndex(capacity=100)
    for replica in "abc":
        index.record(replica, block_hashes(SYSTEM, 16))
    assert index.drop("a") == 4 and index.drop("a") == 0
    assert index.keep_only({"c"}) == {"b": 4}
    assert index.matched_blocks("b", block_hashes(SYSTEM, 16)) == 0
    assert index.matched_blocks("c", block_hashes(SYSTEM, 16)) == 4


# --- the choice -----------------------------------------------------------------------------


def test_longest_match_wins_while_load_is_even():
    policy = affinity()
    policy.routed("b", policy.hashes(SYSTEM))
    policy.routed("a", policy.hashes(SYSTEM[:16]))
    prompt = policy.hashes(SYSTEM + [1] * 20)
    assert policy.choose(prompt, {"a": 0, "b": 0, "c": 0}) == "b"
    assert policy.choose(prompt, {"a": 0, "b": 3, "c": 0}) == "b"  # busier, within the threshold (4)


def test_a_busy_holder_is_passed_over_for_the_best_of_the_rest():
    policy = affinity(imbalance_threshold=2)
    policy.routed("b", policy.hashes(SYSTEM))
    policy.routed("a", policy.hashes(SYSTEM[:32]))
    prompt = policy.hashes(SYSTEM)
    assert policy.choose(prompt, {"a": 0, "b": 3, "c": 0}) == "a"  # b is 3 over the least busy: skipped
    assert policy.choose(prompt, {"a": 5, "b": 3, "c": 0}) == "c"  # only c is within 2 of the least busy


def test_ties_go_to_the_shorter_queue_then_to_a_hash_every_router_agrees_on():
    policy = affinity()
    prompt = policy.hashes(SYSTEM)
    assert policy.choose(prompt, {"a": 2, "b": 1}) == "b"
    replicas = {f"replica-{i}": 0 for i in range(8)}
    picks = {affinity().choose(prompt, replicas) for _ in range(3)}
    assert len(picks) == 1  # fresh routers, no shared state: the same replica for a new prefix
    other_prefixes = {policy.choose(policy.hashes([n] * 16), replicas) for n in range(40)}
    assert len(other_prefixes) > 3  # different prefixes spread


def test_no_choice_without_a_full_block_or_queue_lengths():
    policy = affinity()
    assert policy.choose(policy.hashes(SYSTEM[:15]), {"a": 0}) is None
    assert policy.choose(policy.hashes(SYSTEM), {}) is None


def test_a_new_replica_takes_new_prefixes_and_spill_over():
    policy = affinity(imbalance_threshold=1)
    for n in range(4):
        policy.routed("a", policy.hashes([n] * 32))
    assert policy.choose(policy.hashes([0] * 32), {"a": 0, "new": 0}) == "a"
    assert policy.choose(policy.hashes([0] * 32), {"a": 2, "new": 0}) == "new"
    assert policy.choose(policy.hashes([9] * 32), {"a": 1, "new": 0}) == "new"  # nobody holds it: shorter queue


# --- the Serve router, with stand-in replicas -------------------------------------------------


@dataclass(eq=False)
class StandInReplica:
    """What Serve's routers read of a RunningReplica; queue_len answers probes."""

    replica_id: object
    max_ongoing_requests: int = 8
    node_id: str = "node"
    availability_zone: str | None = None
    multiplexed_model_ids: set = field(default_factory=set)
    is_cross_language: bool = False
    queue_len: int = 0

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len

    def push_proxy_handle(self, handle: object) -> None:
        pass


@pytest.fixture
def serve_router():
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

    from servegraph.deployments.prefix_router import PrefixAwareRouter

    deployment = DeploymentID(name="engine-tiny-v1", app_name="llm")

    async def build():
        router = PrefixAwareRouter(
            deployment_id=deployment, handle_source=DeploymentHandleSource.REPLICA, use_replica_queue_len_cache=True
        )
        router.initialize_state(block_size=16, imbalance_threshold=2)
        replicas = [StandInReplica(ReplicaID(name, deployment)) for name in ("r1", "r2")]
        router.update_replicas(replicas)
        for replica in replicas:
            router.replica_queue_len_cache.update(replica.replica_id, 0)
        return router, replicas

    return build


def generate_call(prompt: list[int]):
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    from servegraph.deployments.messages import EngineRequest

    metadata = RequestMetadata(request_id="r", internal_request_id=uuid.uuid4().hex)
    return PendingRequest(args=[[EngineRequest("r", prompt, sampling_params=None)]], kwargs={}, metadata=metadata)


def test_serve_router_prefers_the_holder_then_power_of_two_and_records_on_acceptance(serve_router):
    async def scenario():
        router, (r1, r2) = await serve_router()
        first = generate_call(SYSTEM + [1])
        ranks = await router.choose_replicas(router._replicas_list, first)
        preferred = ranks[0][0]
        assert len(ranks[0]) == 1 and {r.replica_id for r in ranks[1]} == {r1.replica_id, r2.replica_id}
        router.on_request_routed(first, preferred.replica_id, None)
        for n in range(5):
            ranks = await router.choose_replicas(router._replicas_list, generate_call(SYSTEM + [n] * 20))
            assert ranks[0] == [preferred]
        router.replica_queue_len_cache.update(preferred.replica_id, 3)  # 3 over the other: past the threshold
        ranks = await router.choose_replicas(router._replicas_list, generate_call(SYSTEM))
        assert ranks[0][0] is not preferred

    asyncio.run(scenario())


def test_serve_router_leaves_other_calls_and_short_prompts_to_power_of_two(serve_router):
    async def scenario():
        router, _ = await serve_router()
        stats_call = generate_call([])
        stats_call.args.clear()
        for call in (stats_call, generate_call(SYSTEM[:10])):
            ranks = await router.choose_replicas(router._replicas_list, call)
            assert len(ranks) == 1 and len(ranks[0]) == 2

    asyncio.run(scenario())


def test_serve_router_probes_unknown_queues_and_never_prefers_a_full_replica(serve_router):
    async def scenario():
        router, (r1, r2) = await serve_router()
        call = generate_call(SYSTEM)
        await router.choose_replicas(router._replicas_list, call)
        router.on_request_routed(call, r1.replica_id, None)
        for queued, preferred in ((r1.max_ongoing_requests, r2), (1, r1)):
            r1.queue_len = queued
            router.replica_queue_len_cache.invalidate_key(r1.replica_id)  # stale: Serve's cache forgot it
            ranks = await router.choose_replicas(router._replicas_list, generate_call(SYSTEM))
            assert ranks[0] == [preferred]
            assert router.replica_queue_len_cache.get(r1.replica_id) == queued  # probed

    asyncio.run(scenario())


def test_serve_router_drops_replicas_that_leave_or_die(serve_router):
    async def scenario():
        router, (r1, r2) = await serve_router()
        for replica in (r1, r2):
            call = generate_call(SYSTEM)
            await router.choose_replicas(router._replicas_list, call)
            router.on_request_routed(call, replica.replica_id, None)
        router.on_replica_actor_died(r1.replica_id)
        assert router._affinity.index.size(r1.replica_id.unique_id) == 0
        router.update_replicas([r1])
        assert router._affinity.index.size(r2.replica_id.unique_id) == 0

    asyncio.run(scenario())


# --- config -----------------------------------------------------------------------------------


def test_config_checks_our_routers_kwargs_and_takes_the_engines_block_size():
    with pytest.raises(ValidationError, match="imbalance_treshold"):
        RequestRouterSpec(class_path=PREFIX_ROUTER_CLASS_PATH, kwargs={"imbalance_treshold": 2})
    RequestRouterSpec(class_path="some.module:Router", kwargs={"anything": 1})  # others' kwargs are theirs
    spec = ModelSpec(
        name="m",
        build=LocalBuildRecipe(),
        engine_args={"block_size": 32},
        request_router={"class_path": PREFIX_ROUTER_CLASS_PATH, "kwargs": {"imbalance_threshold": 1}},
    )
    assert spec.request_router.kwargs_for(spec.engine_args) == {"block_size": 32, "imbalance_threshold": 1}
    explicit = RequestRouterSpec(class_path=PREFIX_ROUTER_CLASS_PATH, kwargs={"block_size": 16})
    assert explicit.kwargs_for({"block_size": 128}) == {"block_size": 16}
