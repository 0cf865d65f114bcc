"""`ray.serve.llm`'s PrefixCacheAffinityRouter, fed our engine calls, for the prefix benchmark.

Ray's router matches prompt text (a character prefix tree in a detached actor); our engine
deployments receive token ids. Each token id becomes one character, so its tree matches
exactly the token prefixes ours does, and the comparison is between routing policies on the
same graph, not between two serving stacks.
"""

from __future__ import annotations

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter
from ray.serve.request_router import PendingRequest

from servegraph.deployments.prefix_router import first_prompt_ids

FIRST_CHARACTER = 0x10000  # past the UTF-16 surrogates, so every token id maps to a valid character


def token_text(token_ids: list[int]) -> str:
    return "".join(chr(FIRST_CHARACTER + token) for token in token_ids)


class TokenPrefixCacheAffinityRouter(PrefixCacheAffinityRouter):
    """Ray's router, reading the first prompt's token ids instead of `prompt`/`messages` text."""

    def _extract_text_from_request(self, pending_request: PendingRequest) -> str | None:
        token_ids = first_prompt_ids(pending_request)
        return token_text(token_ids) if token_ids else None  # None: Ray's own power of two choices
