"""Tenant quotas: requests and tokens per minute and requests in flight, for the whole cluster.

One `Quota` replica holds every tenant's counters, so limits hold however many ingress
replicas admit requests. The ingress asks it once before serving (`admit`) and tells it
the tokens used once the request has finished (`settle`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ray import serve
from ray.serve.handle import DeploymentHandle

from servegraph.deployments.errors import RateLimitError
from servegraph.models.config import TenantLimits, TenantSpec

logger = logging.getLogger("ray.serve.servegraph.quota")

WINDOW_S = 60.0
# A request whose ingress died never settles; its concurrency slot frees itself after this.
LEASE_S = 900.0


@dataclass
class SlidingMinute:
    """Amounts (requests or tokens) spent over the last WINDOW_S seconds."""

    entries: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - WINDOW_S:
            self.total -= self.entries.popleft()[1]

    def add(self, now: float, amount: int) -> None:
        if amount:
            self.entries.append((now, amount))
            self.total += amount

    def seconds_until_below(self, limit: int, now: float) -> float:
        """How long until the spent total is under limit again."""
        excess = self.total - limit + 1
        for spent_at, amount in self.entries:
            excess -= amount
            if excess <= 0:
                return spent_at + WINDOW_S - now
        return WINDOW_S


@dataclass
class TenantUsage:
    requests: SlidingMinute = field(default_factory=SlidingMinute)
    tokens: SlidingMinute = field(default_factory=SlidingMinute)
    leases: dict[str, float] = field(default_factory=dict)  # lease id -> expiry

    def in_flight(self, now: float) -> int:
        for lease in [lease for lease, expiry in self.leases.items() if expiry <= now]:
            del self.leases[lease]
        return len(self.leases)


def over_limit(tenant: str, what: str, limit: int, retry_after_s: float) -> RateLimitError:
    wait = max(1, math.ceil(retry_after_s))
    return RateLimitError(
        f"Tenant `{tenant}` is over its limit of {limit} {what}. Retry after {wait} s.",
        headers={"Retry-After": str(wait)},
    )


class QuotaLedger:
    """Every limited tenant's sliding-minute counters and in-flight leases."""

    def __init__(self, limits: dict[str, TenantLimits], clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._usage = {tenant: TenantUsage() for tenant in limits}
        self._clock = clock

    def admit(self, tenant: str, lease: str) -> None:
        """Counts the request against the tenant's limits, or raises RateLimitError naming the one it is over."""
        limits, usage, now = self._limits[tenant], self._usage[tenant], self._clock()
        usage.requests.expire(now)
        usage.tokens.expire(now)
        if limits.max_concurrent is not None and usage.in_flight(now) >= limits.max_concurrent:
            raise over_limit(tenant, "concurrent requests", limits.max_concurrent, 1)
        if limits.requests_per_minute is not None and usage.requests.total >= limits.requests_per_minute:
            wait = usage.requests.seconds_until_below(limits.requests_per_minute, now)
            raise over_limit(tenant, "requests per minute", limits.requests_per_minute, wait)
        if limits.tokens_per_minute is not None and usage.tokens.total >= limits.tokens_per_minute:
            wait = usage.tokens.seconds_until_below(limits.tokens_per_minute, now)
            raise over_limit(tenant, "tokens per minute", limits.tokens_per_minute, wait)
        usage.requests.add(now, 1)
        usage.leases[lease] = now + LEASE_S

    def settle(self, tenant: str, lease: str, tokens: int) -> None:
        """The request finished: its slot frees and its tokens count from now."""
        usage = self._usage[tenant]
        usage.leases.pop(lease, None)
        usage.tokens.add(self._clock(), tokens)


def limited_tenants(tenants: list[TenantSpec]) -> dict[str, TenantLimits]:
    return {spec.name: spec.limits for spec in tenants if spec.limits.any}


@serve.deployment(name="quota")  # options: graphs/builder.py
class Quota:
    """The one replica holding the ledger; its methods run on one event loop, so no locks.

    Counters restart empty if the replica is replaced.
    """

    def __init__(self, tenants: list[TenantSpec]) -> None:
        self._ledger = QuotaLedger(limited_tenants(tenants))

    async def admit(self, tenant: str, lease: str) -> None:
        self._ledger.admit(tenant, lease)

    async def settle(self, tenant: str, lease: str, tokens: int) -> None:
        self._ledger.settle(tenant, lease, tokens)


class Quotas(Protocol):
    """What the ingress needs of the quota store."""

    async def admit(self, tenant: str, lease: str) -> None: ...
    def settle(self, tenant: str, lease: str, tokens: int) -> None: ...


class LocalQuotas:
    """A ledger in this process: for one replica, and for tests."""

    def __init__(self, ledger: QuotaLedger) -> None:
        self._ledger = ledger

    async def admit(self, tenant: str, lease: str) -> None:
        self._ledger.admit(tenant, lease)

    def settle(self, tenant: str, lease: str, tokens: int) -> None:
        self._ledger.settle(tenant, lease, tokens)


class HandleQuotas:
    """The cluster's Quota replica; settling does not hold up the response."""

    def __init__(self, quota: DeploymentHandle) -> None:
        self._quota = quota
        self._settling: set[asyncio.Task] = set()

    async def admit(self, tenant: str, lease: str) -> None:
        await self._quota.admit.remote(tenant, lease)

    def settle(self, tenant: str, lease: str, tokens: int) -> None:
        task = asyncio.get_running_loop().create_task(self._settle(tenant, lease, tokens))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, tenant: str, lease: str, tokens: int) -> None:
        try:
            await self._quota.settle.remote(tenant, lease, tokens)
        except Exception:
            logger.warning("could not settle %s tokens for tenant %s", tokens, tenant, exc_info=True)
