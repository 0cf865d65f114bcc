"""Forwarding a stream from a downstream deployment, shared by the stages that relay one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
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


T = TypeVar("T")


class Deadline:
    """A time limit shared by every await of one request; None means no limit."""

    def __init__(self, timeout_s: float | None, on_expiry: Callable[[], Exception]) -> None:
        self._loop = asyncio.get_running_loop()
        self._at = None if timeout_s is None else self._loop.time() + timeout_s
        self._on_expiry = on_expiry

    async def run(self, awaitable: Awaitable[T]) -> T:
        """awaitable's result; cancelled (so aborted downstream) and the expiry error raised once time is up."""
        if self._at is None:
            return await awaitable
        try:
            async with asyncio.timeout_at(self._at):  # no task per await: this runs once per stream chunk
                return await awaitable
        except TimeoutError:
            raise self._on_expiry() from None

    async def iterate(self, chunks: AsyncIterator[T]) -> AsyncIterator[T]:
        iterator = aiter(chunks)
        try:
            while True:
                try:
                    chunk = await self.run(anext(iterator))
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            await iterator.aclose()
