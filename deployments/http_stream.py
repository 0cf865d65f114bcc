"""A generation's response as the client sees it: a stream whose first chunk decides the status, then SSE events."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from servegraph.deployments.errors import as_openai_error
from servegraph.deployments.messages import ResponseChunk
from servegraph.deployments.streaming import Deadline
from servegraph.deployments.telemetry import RequestTrace, status_of
from servegraph.deployments.upstream import sse

if TYPE_CHECKING:
    from servegraph.deployments.response_cache import StreamRecorder

logger = logging.getLogger("servegraph.ingress")


async def open_stream(chunks: AsyncIterator[ResponseChunk], deadline: Deadline) -> AsyncIterator[ResponseChunk]:
    """The text stream, once its first chunk is in: until then a failure (overload, timeout)
    still gets its own HTTP status, or a fallback, instead of an error event inside a 200 stream."""
    chunks = deadline.iterate(chunks)
    try:
        first = await anext(chunks)
    except BaseException:
        await chunks.aclose()
        raise

    async def replay() -> AsyncIterator[ResponseChunk]:
        yield first
        async for chunk in chunks:
            yield chunk

    return replay()


async def sse_events(
    chunks: AsyncIterator[ResponseChunk],
    response_id: str,
    trace: RequestTrace,
    recorder: StreamRecorder | None = None,
) -> AsyncIterator[str]:
    """The postprocess stage's SSE events as they come; a failure after the headers becomes an error event.

    A cacheable stream has a recorder: it sees every chunk as it passes and stores the stream
    only if every event went out and none was an error. Other streams pay one `is None` per chunk.
    """
    last: ResponseChunk | None = None
    status = 200
    try:
        async for chunk in chunks:
            trace.first_token()
            trace.text(chunk)
            last = chunk
            status = chunk.error_status or status
            if recorder is not None:
                recorder.add(chunk)
            yield chunk.data
        if recorder is not None and status == 200 and last is not None:
            recorder.complete(last)
    except Exception as exc:  # headers are gone: report the failure in the stream itself
        error = as_openai_error(exc)
        status = error.status_code
        logger.warning("stream %s failed: %s", response_id, error.message)
        yield sse(json.dumps(error.body()))
        yield sse("[DONE]")
    except BaseException as exc:  # the client went away
        status = status_of(exc)
        raise
    finally:
        trace.finish(status, last)
