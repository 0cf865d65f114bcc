"""Forwarding a stream from a downstream deployment, shared by the stages that relay one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, TypeVar


class Finishing(Protocol):
    finish_reason: str | None


class Cancellable(Protocol):
    def cancel(self) -> None: ...


ChunkT = TypeVar("ChunkT", bound=Finishing)


async def until_finished(upstream: Cancellable, chunks: AsyncIterator[ChunkT]) -> AsyncIterator[ChunkT]:
    """Yield chunks until one finishes the request; cancel upstream if we stop before that.

    A client disconnect, a stop string or an error here then aborts the engine request
    instead of leaving it generating tokens for nobody.
    """
    finished = False
    try:
        async for chunk in chunks:
            finished = chunk.finish_reason is not None
            yield chunk
            if finished:
                return
    finally:
        if not finished:
            upstream.cancel()
