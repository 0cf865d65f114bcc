"""Fallback: which failures move a request to the next target (a policy chosen in config), and circuit breakers."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Protocol, TypeVar

from servegraph.deployments.errors import (
    ContextLengthExceededError,
    EngineCrashedError,
    EngineUnavailableError,
    ModelUnavailableError,
    OpenAIError,
    ServiceUnavailableError,
    UpstreamError,
    as_openai_error,
)
from servegraph.models.spec import CircuitBreakerConfig, imported

logger = logging.getLogger("servegraph.fallback")

T = TypeVar("T")


class BreakerState(str, Enum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


class CircuitBreaker:
    """Opens after N consecutive failures; after a cool-down lets one probe through, closing on its success."""

    def __init__(self, name: str, config: CircuitBreakerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._config = config
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.closed
        if self._clock() - self._opened_at < self._config.cooldown_s:
            return BreakerState.open
        return BreakerState.half_open

    def allow(self) -> bool:
        """Whether a request may go to the target now; in half-open state only one probe at a time."""
        state = self.state
        if state is BreakerState.closed:
            return True
        if state is BreakerState.half_open and not self._probing:
            self._probing = True
            return True
        return False

    def succeeded(self) -> None:
        if self._opened_at is not None:
            logger.warning("circuit breaker for %s closed", self.name)
        self._failures, self._opened_at, self._probing = 0, None, False

    def failed(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self._config.failure_threshold:
            if self._opened_at is None or self._probing:
                logger.warning("circuit breaker for %s opened after %d failures", self.name, self._failures)
            self._opened_at, self._probing = self._clock(), False

    def released(self) -> None:
        """The request ended without telling whether the target works (client gone, prompt too long)."""
        self._probing = False


def is_target_failure(error: OpenAIError) -> bool:
    """Failures that say the target itself is broken: they count towards its breaker."""
    return isinstance(error, EngineUnavailableError | UpstreamError) or error.status_code == 500


def moves_on(error: OpenAIError) -> bool:
    """Whether the next target of the chain should get the request.

    Overload, a cold start past its bound, a broken target and a prompt longer than this
    target's context do; client errors, timeouts (the time is spent), the tenant's own 429
    and a request that was running when its engine crashed (it may be the cause) never do.
    """
    if isinstance(error, EngineCrashedError):
        return False
    return isinstance(error, ServiceUnavailableError | ContextLengthExceededError) or is_target_failure(error)


class FallbackPolicy(Protocol):
    """Which failures count against a target's breaker, and which move a request down its chain.

    Chosen in the config (`fallback_policy: module:Class`, constructed without arguments); a
    team that wants, say, no context-window fallback or a fallback on timeouts plugs in its own.
    """

    def counts_as_failure(self, error: OpenAIError) -> bool: ...
    def moves_on(self, error: OpenAIError) -> bool: ...


class DefaultFallbackPolicy:
    """Broken targets count; overload, cold starts, broken targets and too-long prompts move on."""

    def counts_as_failure(self, error: OpenAIError) -> bool:
        return is_target_failure(error)

    def moves_on(self, error: OpenAIError) -> bool:
        return moves_on(error)


def load_fallback_policy(import_path: str | None) -> FallbackPolicy:
    if import_path is None:
        return DefaultFallbackPolicy()
    return imported(import_path)()


class ChainLink(Protocol):
    name: str
    breaker: CircuitBreakerConfig


LinkT = TypeVar("LinkT", bound=ChainLink)


class FallbackChain:
    """Tries a request's targets in order, with one breaker per target; one instance per ingress replica."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, policy: FallbackPolicy | None = None) -> None:
        self._breakers: dict[str, CircuitBreaker] = {}
        self._clock = clock
        self._policy = policy or DefaultFallbackPolicy()

    def breaker(self, link: ChainLink) -> CircuitBreaker:
        if link.name not in self._breakers:
            self._breakers[link.name] = CircuitBreaker(link.name, link.breaker, self._clock)
        return self._breakers[link.name]

    def states(self) -> dict[str, str]:
        return {name: breaker.state.value for name, breaker in self._breakers.items()}

    async def first_served(self, links: list[LinkT], attempt: Callable[[LinkT], Awaitable[T]]) -> tuple[LinkT, T]:
        """The first link that serves, and what it returned; else the first link's error.

        A replica that died before the request started gets the request once more: Serve
        routes the retry to another replica (or the restarted one).
        """
        errors: list[OpenAIError] = []
        for link in links:
            breaker = self.breaker(link)
            if not breaker.allow():
                errors.append(ModelUnavailableError(f"`{link.name}` is failing; its circuit breaker is open."))
                continue
            for retry in (False, True):
                try:
                    result = await attempt(link)
                except Exception as exc:
                    error = as_openai_error(exc)
                    if self._policy.counts_as_failure(error):
                        breaker.failed()
                    else:
                        breaker.released()
                    if not retry and isinstance(error, EngineUnavailableError) and breaker.allow():
                        continue
                    if not self._policy.moves_on(error):
                        raise error from exc
                    errors.append(error)
                    break
                except BaseException:
                    breaker.released()
                    raise
                breaker.succeeded()
                return link, result
        raise errors[0]
