"""Prefix-aware replica choice, without Ray: block hashes of a prompt's token ids, a bounded index
of the blocks each replica was recently sent, and the choice between replicas.

vLLM's prefix cache only helps a request that lands on the replica holding its prefix. The
tokenizer stage hands engines exact token ids, so the router can hash them in the engine's own
block size and match whole blocks, as vLLM's cache does, instead of guessing from text.
`prefix_router.PrefixAwareRouter` is the thin Serve layer around this.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence

from servegraph.models.spec import PrefixRouterSettings

ROOT_HASH = 0x5E4E_C0DE  # the parent of every prompt's first block


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the prompt's full blocks, as vLLM keys its prefix cache.

    Block i's hash covers every token up to its end, so two prompts share block i's hash only
    if they share that whole prefix. A partial last block is left out: vLLM does not cache it.
    Python's hash of a tuple of ints is the same in every process (no hash seed), which lets
    several routers agree (see PrefixAffinity.choose).
    """
    hashes: list[int] = []
    parent = ROOT_HASH
    for end in range(block_size, len(token_ids) + 1, block_size):
        parent = hash((parent, *token_ids[end - block_size : end]))
        hashes.append(parent)
    return hashes


class PrefixIndex:
    """Per replica, the block hashes it was recently sent; beyond `capacity` the least recent go.

    A stand-in for each replica's prefix cache, which evicts least recently used blocks too.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._blocks: dict[str, OrderedDict[int, None]] = {}

    def record(self, replica: str, hashes: Sequence[int]) -> None:
        """Remember that `replica` was sent these blocks.

        Touched last to first, so a prompt's first blocks are the most recent: a prefix shared
        by many prompts outlives their tails, and what remains of a prompt is always a prefix.
        """
        blocks = self._blocks.setdefault(replica, OrderedDict())
        for block in reversed(hashes):
            blocks[block] = None
            blocks.move_to_end(block)
        while len(blocks) > self._capacity:
            blocks.popitem(last=False)

    def matched_blocks(self, replica: str, hashes: Sequence[int]) -> int:
        """How many of the prompt's leading blocks the replica was sent."""
        blocks = self._blocks.get(replica)
        if not blocks:
            return 0
        matched = 0
        for block in hashes:
            if block not in blocks:
                break
            matched += 1
        return matched

    def size(self, replica: str) -> int:
        return len(self._blocks.get(replica, ()))

    def drop(self, replica: str) -> int:
        """Forget a replica (it died or was removed); the number of blocks it held."""
        return len(self._blocks.pop(replica, ()))

    def keep_only(self, replicas: Collection[str]) -> dict[str, int]:
        """Forget every replica not in `replicas`; the blocks each forgotten one held."""
        gone = [replica for replica in self._blocks if replica not in replicas]
        return {replica: self.drop(replica) for replica in gone}


def rendezvous_score(first_block: int, replica: str) -> int:
    """A stable pseudo-random rank of a replica for a prompt (highest random weight hashing)."""
    return hash((first_block, zlib.crc32(replica.encode())))


class PrefixAffinity:
    """Which replica takes a prompt: the longest recorded prefix among replicas not too busy.

    Rules, in order:
    - a replica with `imbalance_threshold` more requests than the least busy one is passed
      over, whatever it holds (with two replicas that leaves the less busy one: power of two
      choices' own pick);
    - among the rest, the most leading blocks recorded wins;
    - ties go to the shorter queue, then to a hash of the prompt's first block and the replica:
      several routers (one per calling replica) thus send a new prefix to the same replica.
    Prompts shorter than a block, and calls without queue lengths, get no choice (None): the
    caller falls back to power of two choices.
    """

    def __init__(self, settings: PrefixRouterSettings) -> None:
        self.settings = settings
        self.index = PrefixIndex(settings.index_capacity)

    def hashes(self, token_ids: Sequence[int]) -> list[int]:
        return block_hashes(token_ids, self.settings.block_size)

    def choose(self, hashes: Sequence[int], queue_lens: Mapping[str, int]) -> str | None:
        if not hashes or not queue_lens:
            return None
        least_busy = min(queue_lens.values())
        eligible = [r for r, queued in queue_lens.items() if queued - least_busy <= self.settings.imbalance_threshold]
        return max(
            eligible,
            key=lambda r: (self.index.matched_blocks(r, hashes), -queue_lens[r], rendezvous_score(hashes[0], r)),
        )

    def routed(self, replica: str, hashes: Sequence[int]) -> None:
        self.index.record(replica, hashes)
