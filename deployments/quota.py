"""Tenant quotas: requests and tokens per minute and requests in flight, for the whole cluster.

One `Quota` replica holds every tenant's counters, so limits hold however many ingress
replicas admit requests, and an ingress replica that dies takes nothing of them with it.
The ingress asks it once before serving (`admit`), reserving the request's prompt and
max_tokens, and tells it the tokens used once the request has finished (`settle`), which
frees the reservation: concurrent requests cannot overdraw a token limit between the two.

A request that does not stream and is abandoned (client gone, deadline) reaches the ingress
with no output, so the ingress settles it for no tokens; the engine replica, which knows what
it generated before the abort, charges its prompt and those tokens itself (`charge`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ray import serve
from ray.serve.handle import DeploymentHandle

from servegraph.deployments.errors import BadRequestError, RateLimitError
from servegraph.models.config import TenantLimits, TenantSpec

logger = logging.getLogger("ray.serve.servegraph.quota")

WINDOW_S = 60.0
# A request whose ingress died never settles; its concurrency slot and reservation free themselves after this.
LEASE_S = 900.0
SETTLE_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # then every 8 s until the quota replica answers
MAX_PENDING_SETTLEMENTS = 100_000


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


@dataclass(frozen=True)
class Lease:
    """An admitted request's slot and the tokens it may still use, until it settles or expires."""

    expiry: float
    reserved_tokens: int


@dataclass
class TenantUsage:
    requests: SlidingMinute = field(default_factory=SlidingMinute)
    tokens: SlidingMinute = field(default_factory=SlidingMinute)
    leases: dict[str, Lease] = field(default_factory=dict)
    charged: dict[str, float] = field(default_factory=dict)  # charge id -> when it may be forgotten

    def expire(self, now: float) -> None:
        self.requests.expire(now)
        self.tokens.expire(now)
        for lease in [lease for lease, held in self.leases.items() if held.expiry <= now]:
            del self.leases[lease]
        for charge in [charge for charge, until in self.charged.items() if until <= now]:
            del self.charged[charge]

    @property
    def reserved_tokens(self) -> int:
        return sum(lease.reserved_tokens for lease in self.leases.values())


def over_limit(tenant: str, what: str, limit: int, retry_after_s: float) -> RateLimitError:
    wait = max(1, math.ceil(retry_after_s))
    return RateLimitError(
        f"Tenant `{tenant}` is over its limit of {limit} {what}. Retry after {wait} s.",
        headers={"Retry-After": str(wait)},
    )


def check_token_budget(tenant: str, usage: TenantUsage, limit: int, reserve: int, now: float) -> None:
    """429 unless the tokens used this minute, those reserved by requests in flight and this
    request's reservation fit the limit together."""
    if reserve > limit:  # never admissible: a 400, which clients do not retry as they do a 429
        raise BadRequestError(
            f"This request may use up to {reserve} tokens (prompt and max_tokens), more than tenant "
            f"`{tenant}`'s limit of {limit} tokens per minute. Lower max_tokens or shorten the prompt.",
            param="max_tokens",
            code="request_too_large",
        )
    committed = usage.tokens.total + usage.reserved_tokens
    if committed + reserve > limit:
        budget = limit - usage.reserved_tokens - reserve  # what the used tokens must fall to
        wait = usage.tokens.seconds_until_below(budget + 1, now) if budget >= 0 else 1
        raise over_limit(tenant, "tokens per minute", limit, wait)


class QuotaLedger:
    """Every limited tenant's sliding-minute counters and in-flight leases."""

    def __init__(self, limits: dict[str, TenantLimits], clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._usage = {tenant: TenantUsage() for tenant in limits}
        self._clock = clock

    def admit(self, tenant: str, lease: str, reserve_tokens: int = 0) -> None:
        """Counts the request against the tenant's limits, or raises RateLimitError naming the one it is over.

        reserve_tokens (its prompt and max_tokens) count against the token limit until it settles.
        """
        limits, usage, now = self._limits[tenant], self._usage[tenant], self._clock()
        usage.expire(now)
        if limits.max_concurrent is not None and len(usage.leases) >= limits.max_concurrent:
            raise over_limit(tenant, "concurrent requests", limits.max_concurrent, 1)
        if limits.requests_per_minute is not None and usage.requests.total >= limits.requests_per_minute:
            wait = usage.requests.seconds_until_below(limits.requests_per_minute, now)
            raise over_limit(tenant, "requests per minute", limits.requests_per_minute, wait)
        if limits.tokens_per_minute is not None:
            check_token_budget(tenant, usage, limits.tokens_per_minute, reserve_tokens, now)
        usage.requests.add(now, 1)
        usage.leases[lease] = Lease(now + LEASE_S, reserve_tokens)

    def settle(self, tenant: str, lease: str, tokens: int) -> None:
        """The request finished: its slot and reservation free, and the tokens it used count from now.

        Once per lease: a settlement sent again (its first reply was lost) changes nothing. A lease
        this ledger never saw (it restarted since) is not counted either: its counters started empty.
        """
        usage = self._usage.get(tenant)
        if usage is not None and usage.leases.pop(lease, None) is not None:
            usage.tokens.add(self._clock(), tokens)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Each limited tenant's minute so far: what an operator (and a test) can read of the ledger."""
        now = self._clock()
        for usage in self._usage.values():
            usage.expire(now)
        return {
            tenant: {
                "requests_this_minute": usage.requests.total,
                "tokens_this_minute": usage.tokens.total,
                "reserved_tokens": usage.reserved_tokens,
                "in_flight": len(usage.leases),
            }
            for tenant, usage in self._usage.items()
        }

    def charge(self, tenant: str, charge_id: str, tokens: int) -> None:
        """Tokens an engine generated for an abandoned request, counted once per charge id.

        No lease: the request has already settled (for no tokens) at the ingress. A charge sent
        again, because its first reply was lost, changes nothing.
        """
        usage, now = self._usage.get(tenant), self._clock()
        if usage is None:
            return
        usage.expire(now)
        if charge_id not in usage.charged:
            usage.charged[charge_id] = now + LEASE_S
            usage.tokens.add(now, tokens)


def limited_tenants(tenants: list[TenantSpec]) -> dict[str, TenantLimits]:
    return {spec.name: spec.limits for spec in tenants if spec.limits.any}


@serve.deployment(name="quota")  # options: graphs/builder.py
class Quota:
    """The one replica holding the ledger; its methods run on one event loop, so no locks.

    Counters restart empty if the replica is replaced.
    """

    def __init__(self, tenants: list[TenantSpec]) -> None:
        self._ledger = QuotaLedger(limited_tenants(tenants))

    async def admit(self, tenant: str, lease: str, reserve_tokens: int = 0) -> None:
        self._ledger.admit(tenant, lease, reserve_tokens)

    async def settle_all(self, settlements: list[TokenEntry]) -> None:
        for tenant, lease, tokens in settlements:
            self._ledger.settle(tenant, lease, tokens)

    async def charge_all(self, charges: list[TokenEntry]) -> None:
        for tenant, charge_id, tokens in charges:
            self._ledger.charge(tenant, charge_id, tokens)

    async def snapshot(self) -> dict[str, dict[str, int]]:
        return self._ledger.snapshot()


TokenEntry = tuple[str, str, int]  # tenant, lease or charge id, tokens: one settlement or one charge


class Quotas(Protocol):
    """What the ingress needs of the quota store."""

    async def admit(self, tenant: str, lease: str, reserve_tokens: int = 0) -> None: ...
    def settle(self, tenant: str, lease: str, tokens: int) -> None: ...


class LocalQuotas:
    """A ledger in this process: for one replica, and for tests."""

    def __init__(self, ledger: QuotaLedger) -> None:
        self._ledger = ledger

    async def admit(self, tenant: str, lease: str, reserve_tokens: int = 0) -> None:
        self._ledger.admit(tenant, lease, reserve_tokens)

    def settle(self, tenant: str, lease: str, tokens: int) -> None:
        self._ledger.settle(tenant, lease, tokens)


class OrderedSender:
    """Settlements for one method of the Quota replica: they do not hold up the response, but are
    not dropped on a failed call either. They queue in order and go in one call per batch,
    retried with backoff until the replica answers (settling and charging are idempotent, so a
    retry cannot bill twice)."""

    def __init__(self, method: Any, retry_delays_s: tuple[float, ...] = SETTLE_RETRY_DELAYS_S) -> None:
        self._method = method  # a DeploymentHandle method: settle_all or charge_all
        self._pending: deque[TokenEntry] = deque(maxlen=MAX_PENDING_SETTLEMENTS)  # oldest dropped past it
        self._sender: asyncio.Task | None = None
        self._retry_delays_s = retry_delays_s

    def send(self, settlement: TokenEntry) -> None:
        self._pending.append(settlement)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_pending())

    async def _send_pending(self) -> None:
        """Every queued settlement, oldest first, until none is left; failed calls wait longer each time."""
        failures = 0
        while self._pending:
            batch = list(self._pending)
            try:
                await self._method.remote(batch)
            except Exception:
                delay = self._retry_delays_s[min(failures, len(self._retry_delays_s) - 1)]
                logger.warning("could not send %d settlements; retrying in %s s", len(batch), delay, exc_info=True)
                failures += 1
                await asyncio.sleep(delay)
                continue
            failures = 0
            for settled in batch:
                if self._pending and self._pending[0] == settled:  # the bounded queue may have dropped it
                    self._pending.popleft()


class HandleQuotas:
    """The cluster's Quota replica: admission awaited, settlements sent in order in the background."""

    def __init__(self, quota: DeploymentHandle, retry_delays_s: tuple[float, ...] = SETTLE_RETRY_DELAYS_S) -> None:
        self._quota = quota
        self._settlements = OrderedSender(quota.settle_all, retry_delays_s)

    async def admit(self, tenant: str, lease: str, reserve_tokens: int = 0) -> None:
        await self._quota.admit.remote(tenant, lease, reserve_tokens)

    def settle(self, tenant: str, lease: str, tokens: int) -> None:
        self._settlements.send((tenant, lease, tokens))
