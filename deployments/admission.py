"""Who may run what: a tenant's fallback chain cut to the models it may use, and its quota lease settled."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from servegraph.deployments.auth import Tenant, model_not_allowed
from servegraph.deployments.errors import BadRequestError
from servegraph.deployments.messages import ModelRoute
from servegraph.deployments.protocol import ClientRequest
from servegraph.deployments.quota import Quotas
from servegraph.deployments.request_limits import reserved_tokens
from servegraph.deployments.router import Link
from servegraph.deployments.telemetry import RequestRecord, RequestTrace


def allowed_links(tenant: Tenant, requested: str, links: list[Link]) -> list[Link]:
    """The chain this tenant may use: 403 for the model asked for, fallbacks it may not use dropped."""
    primary, *fallbacks = links
    if not tenant.allows(primary.model):
        raise model_not_allowed(tenant, requested)
    return [primary, *(link for link in fallbacks if tenant.allows(link.model))]


def local_links(model: str, links: list[Link]) -> list[Link]:
    """An embeddings request's chain: its local models, as upstreams are called for generation only."""
    if not isinstance(links[0].target, ModelRoute):
        raise BadRequestError(f"`{model}` is an external upstream: it serves no embeddings here.", param="model")
    return [link for link in links if isinstance(link.target, ModelRoute)]


UPSTREAM_DEFAULT_MAX_TOKENS = 256  # reserved for an upstream's reply when the request sets no max_tokens


def reservation(request: ClientRequest, primary: Link) -> Callable[[], int]:
    """The tokens to reserve for request on its chain's first link; counted only for a limited tenant."""
    default_max_tokens = getattr(primary.target, "default_max_tokens", UPSTREAM_DEFAULT_MAX_TOKENS)
    return lambda: reserved_tokens(request.body, default_max_tokens)


def settling(observe: Callable[[RequestRecord], None], quotas: Quotas, tenant: str, lease: str):
    """observe, after telling the quota store the request's tokens and freeing its slot."""

    def finished(record: RequestRecord) -> None:
        quotas.settle(tenant, lease, record.prompt_tokens + record.completion_tokens)
        observe(record)

    return finished


async def take_lease(
    quotas: Quotas | None, tenant: Tenant, lease: str, trace: RequestTrace, reserve: Callable[[], int]
) -> str | None:
    """A limited tenant's slot, reserving reserve() tokens (429 when it has no room left); the
    request's tokens are counted instead, and the slot freed, when the trace writes its record.

    Returns the tenant the engine charges if the request is abandoned (None: unlimited, nothing
    to charge). A request cancelled (or failed) while the quota replica admits it settles at
    once, as the slot may have been taken; settling a lease the replica refused changes nothing.
    """
    if quotas is None or not tenant.limits.any:
        return None
    try:
        await quotas.admit(tenant.name, lease, reserve())
    except BaseException:
        quotas.settle(tenant.name, lease, 0)
        raise
    trace.observe = settling(trace.observe, quotas, tenant.name, lease)
    return tenant.name


async def admit(
    quotas: Quotas | None, tenant: Tenant, request: ClientRequest, chain: list[Link], lease: str, trace: RequestTrace
) -> tuple[list[Link], str | None]:
    """The links of the request's chain this tenant may use, and the tenant the engine charges (take_lease).

    One admission for the ingress's routes and the batch runner's lines: an embeddings request
    keeps the chain's local models and reserves its inputs' tokens only, as nothing is generated.
    """
    links = allowed_links(tenant, request.model, chain)
    if request.kind == "embedding":
        links = local_links(request.model, links)
        reserve = partial(reserved_tokens, request.body, 0)
    else:
        reserve = reservation(request, links[0])
    return links, await take_lease(quotas, tenant, lease, trace, reserve)
