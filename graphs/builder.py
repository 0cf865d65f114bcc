"""Application builders: typed args in, bound Serve application out."""

# No `from __future__ import annotations`: Serve validates args only against a real class annotation.

from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from servegraph.autoscale.policy import StageKind, engine_autoscaling, stage_autoscaling
from servegraph.deployments.admin import Admin
from servegraph.deployments.batch_runner import BatchRunner
from servegraph.deployments.embedder import Embedder
from servegraph.deployments.engine import Engine
from servegraph.deployments.ingress import Ingress
from servegraph.deployments.postprocess import Postprocess
from servegraph.deployments.quota import Quota, limited_tenants
from servegraph.deployments.router import Router
from servegraph.deployments.tokenizer import Tokenizer
from servegraph.models.config import AdminAppArgs, LLMAppArgs
from servegraph.models.placement import (
    KNOWN_GPU_MEMORY_GIB,
    EngineMemory,
    check_memory,
    engine_deployment_options,
    model_shape,
)
from servegraph.models.spec import ModelSpec

LIGHT_STAGE_CPUS = 0.1
STAGE_MAX_ONGOING_REQUESTS = 512
STAGE_MAX_QUEUED_REQUESTS = 2048
# Every deployment's options are set here (engines: here and models/placement.py), none in the
# deployments' decorators, so there is one place to read what a stage asks of the cluster.
QUOTA_OPTIONS: dict[str, Any] = {
    "num_replicas": 1,  # one ledger: limits hold across every ingress replica
    "max_ongoing_requests": 4096,  # every ingress's admit and settle calls, each a few microseconds
    "ray_actor_options": {"num_cpus": 0},
}
BATCH_RUNNER_OPTIONS: dict[str, Any] = {
    "num_replicas": 1,  # the one owner of the batch files and jobs (batch_runner.py)
    "max_ongoing_requests": 256,  # API calls only; lines run in the replica's own tasks
    "ray_actor_options": {"num_cpus": 0},
}
ADMIN_OPTIONS: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0}}  # reads usage files now and then


def check_gpu_budgets(args: LLMAppArgs) -> None:
    """Refuse, before any replica starts, an engine whose weights and KV cache exceed its GPU share.

    Only models pinned to a known GPU type can be checked here; `servegraph plan` checks the rest
    against a cluster.
    """
    for spec in args.models:
        memory_gib = KNOWN_GPU_MEMORY_GIB.get(spec.accelerator_type or "")
        if memory_gib is not None and (spec.shape or spec.build):
            check_memory(spec, EngineMemory.of(spec, model_shape(spec)), spec.accelerator_type, memory_gib)


def build_llm_app(args: LLMAppArgs) -> Application:
    """ingress -> tokenizer, then ingress -> postprocess -> one engine deployment per model.

    A `quota` deployment joins when a tenant has limits: one replica, so they hold cluster-wide;
    the ingress settles each request with it, and engines charge what abandoned requests generated.

    The router owns the model registry; the ingress resolves names with a copy it fetches once.
    """
    if args.accelerator == "gpu":
        check_gpu_budgets(args)
    quota = Quota.options(**QUOTA_OPTIONS).bind(args.auth.tenants) if limited_tenants(args.auth.tenants) else None
    engines = {spec.engine_deployment_name: bound_engine(spec, args, quota) for spec in args.models}
    router = Router.options(**light_stage(StageKind.router)).bind(args.models, args.upstreams)
    tokenizer = Tokenizer.options(**light_stage(StageKind.tokenizer)).bind(
        args.models, args.cache_dir, args.limits.max_prompt_tokens
    )
    postprocess = Postprocess.options(**light_stage(StageKind.postprocess)).bind(args.models, engines, args.cache_dir)
    batch_runner = (
        BatchRunner.options(**BATCH_RUNNER_OPTIONS).bind(router, tokenizer, postprocess, args, quota)
        if args.batch.enabled
        else None
    )
    return Ingress.options(**light_stage(StageKind.ingress)).bind(
        router, tokenizer, postprocess, args, quota, batch_runner
    )


def bound_engine(spec: ModelSpec, args: LLMAppArgs, quota: Application | None) -> Application:
    """A model's engine deployment: an Embedder (vLLM's pooling runner) for `task: embed`, else an Engine.
    Both charge the quota what abandoned requests used."""
    deployment = Embedder if spec.task == "embed" else Engine
    return deployment.options(
        name=spec.engine_deployment_name,
        max_ongoing_requests=spec.engine_max_ongoing,
        max_queued_requests=spec.engine_queue_limit,
        autoscaling_config=engine_autoscaling(spec),
        **engine_deployment_options(spec, args.accelerator),
        **request_router_options(spec),
    ).bind(spec, args.cache_dir, quota)


def request_router_options(spec: ModelSpec) -> dict[str, Any]:
    """The model's own Serve request router, when its spec names one (Serve imports the class here)."""
    router = spec.request_router
    if router is None:
        return {}
    kwargs = router.kwargs_for(spec.engine_args)
    config = RequestRouterConfig(request_router_class=router.class_path, request_router_kwargs=kwargs)
    return {"request_router_config": config}


def light_stage(kind: StageKind) -> dict[str, Any]:
    """Options of the stages that hold requests but little CPU each: ingress, tokenizer, router, postprocess."""
    return {
        "ray_actor_options": {"num_cpus": LIGHT_STAGE_CPUS},
        "max_ongoing_requests": STAGE_MAX_ONGOING_REQUESTS,
        "max_queued_requests": STAGE_MAX_QUEUED_REQUESTS,
        "autoscaling_config": stage_autoscaling(kind),
    }


def build_admin_app(args: AdminAppArgs) -> Application:
    return Admin.options(**ADMIN_OPTIONS).bind(args.llm_app, args.auth)
