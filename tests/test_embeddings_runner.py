"""The embedder's logic on a stand-in pooling engine: abandoned requests are charged what was embedded,
vLLM's own refusals are 400s. No Ray; vLLM's async helpers and exceptions are imported, hence `e2e`."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from servegraph.deployments.embedder import EmbeddingRunner, EmbedRequest
from servegraph.deployments.errors import BadRequestError, EngineUnavailableError

pytestmark = pytest.mark.e2e


class PoolingEngine:
    """Finishes the inputs named `fast` at once (noting when the runner took each output), never the others."""

    def __init__(self, refuse: Exception | None = None) -> None:
        self.errored = False
        self.taken = asyncio.Event()
        self._refuse = refuse

    async def encode(self, prompt, pooling_params, request_id: str, *, priority: int):
        if self._refuse is not None:
            raise self._refuse
        if request_id.startswith("fast"):
            yield SimpleNamespace(finished=True, prompt_token_ids=prompt["prompt_token_ids"])
            self.taken.set()  # resumed only once the runner has the output
        await asyncio.Event().wait()


def inputs(*ids: str) -> list[EmbedRequest]:
    return [EmbedRequest(request_id, [101, 7, 8, 102], None) for request_id in ids]


def test_an_abandoned_request_is_charged_the_inputs_already_embedded():
    charges = []
    runner = EmbeddingRunner(PoolingEngine(), charges.append)

    async def abandon() -> None:
        task = asyncio.create_task(runner.embed(inputs("fast-0", "slow-1", "slow-2"), charge_to="metered"))
        await runner.engine.taken.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(abandon())
    assert charges == [("metered", "fast-0", 4)]
    assert (runner.counters.started, runner.counters.aborted, runner.counters.finished) == (3, 2, 0)


def test_vllms_refusal_is_a_400_and_a_dead_engine_sends_the_request_elsewhere():
    from vllm.exceptions import VLLMValidationError

    refused = EmbeddingRunner(PoolingEngine(VLLMValidationError("Token id 40000 is out of vocabulary", parameter="x")))
    with pytest.raises(BadRequestError, match="out of vocabulary"):
        asyncio.run(refused.embed(inputs("fast-0")))
    dead = EmbeddingRunner(PoolingEngine())
    dead.engine.errored = True
    with pytest.raises(EngineUnavailableError):
        asyncio.run(dead.embed(inputs("fast-0")))
