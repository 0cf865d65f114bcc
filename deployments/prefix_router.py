"""Serve request router for engine deployments that keeps shared prompt prefixes on one replica.

Chosen per model in the graph config:

    request_router:
      class_path: servegraph.deployments.prefix_router:PrefixAwareRouter
      kwargs: {block_size: 16, imbalance_threshold: 4, index_capacity: 32768}

Serve runs one router per calling process (each postprocess replica) for the engine
deployment. It reads the first prompt's token ids from the `generate` call's EngineRequests,
asks `prefix_index.PrefixAffinity` for a replica, and ranks Serve's power of two choices
behind it, for when that replica is full or the prompt is shorter than a block. A replica is
credited with a prompt's blocks once it accepts the request.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from servegraph.deployments.messages import EngineRequest
from servegraph.deployments.prefix_index import PrefixAffinity
from servegraph.models.spec import PrefixRouterSettings

logger = logging.getLogger("ray.serve.servegraph.prefix_router")

# Block hashes of requests chosen for but not yet accepted; Serve may ask twice for one request
# (a replica refused it) and tells us which replica took it later. Cancelled ones age out.
MAX_REQUESTS_IN_ROUTING = 4096


def first_prompt_ids(pending_request: PendingRequest | None) -> Sequence[int] | None:
    """The first prompt's token ids of an Engine.generate call; None for any other call (stats)."""
    if pending_request is None:
        return None
    for arg in (*pending_request.args, *pending_request.kwargs.values()):
        if isinstance(arg, list) and arg and isinstance(arg[0], EngineRequest):
            return arg[0].prompt_token_ids
    return None


class PrefixAwareRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Longest matching prefix among replicas within the load imbalance; see PrefixAffinity.

    No FIFOMixin: it would hand the replica chosen for one request's prefix to whichever
    request waits longest.
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self._affinity = PrefixAffinity(PrefixRouterSettings.model_validate(kwargs))
        self._hashes_in_routing: OrderedDict[str, list[int]] = OrderedDict()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        fallback = await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            return fallback  # a LoRA adapter: Serve's multiplexed choice; vLLM keys its prefix cache per adapter
        hashes = self._request_hashes(pending_request)
        if not hashes or not fallback:
            return fallback
        queue_lens = await self._open_queue_lens(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in queue_lens}
        chosen = self._affinity.choose(hashes, {replica_id: queue_lens[r] for replica_id, r in by_id.items()})
        return fallback if chosen is None else [[by_id[chosen]], *fallback]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        hashes = self._hashes_in_routing.pop(pending_request.metadata.internal_request_id, None)
        if hashes:
            self._affinity.routed(replica_id.unique_id, hashes)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Serve's replica set changed: replicas gone (scaled down, replaced) leave the index.
        New ones need nothing: they win new prefixes on their short queues."""
        super().update_replicas(replicas)
        self._log_dropped(self._affinity.index.keep_only({r.replica_id.unique_id for r in replicas}))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """Serve found the replica dead before the controller said so: forget it at once."""
        super().on_replica_actor_died(replica_id)
        blocks = self._affinity.index.drop(replica_id.unique_id)
        self._log_dropped({replica_id.unique_id: blocks} if blocks else {})

    @staticmethod
    def _log_dropped(dropped: dict[str, int]) -> None:
        for replica, blocks in dropped.items():
            logger.info("prefix index: dropped replica %s (%d blocks)", replica, blocks)

    def _request_hashes(self, pending_request: PendingRequest | None) -> list[int] | None:
        """The first prompt's block hashes, computed once per request however often Serve asks."""
        token_ids = first_prompt_ids(pending_request)
        if token_ids is None:
            return None
        request_id = pending_request.metadata.internal_request_id
        hashes = self._hashes_in_routing.get(request_id)
        if hashes is None:
            hashes = self._hashes_in_routing[request_id] = self._affinity.hashes(token_ids)
            if len(self._hashes_in_routing) > MAX_REQUESTS_IN_ROUTING:
                self._hashes_in_routing.popitem(last=False)
        return hashes

    async def _open_queue_lens(self, replicas: list[RunningReplica]) -> dict[RunningReplica, int]:
        """Queue lengths of the replicas that can take a request now: Serve's cached ones, probing
        the rest (and full ones, whose cached length may be stale) as Serve's own routers do."""
        cache = self.replica_queue_len_cache
        known = {r: cache.get(r.replica_id) for r in replicas}
        stale = [r for r, queued in known.items() if queued is None or queued >= r.max_ongoing_requests]
        if stale:
            known.update(await self._probe_queue_lens(stale, 0))
        return {r: queued for r, queued in known.items() if queued is not None and queued < r.max_ongoing_requests}
