"""Application builders: typed args in, bound Serve application out."""

# No `from __future__ import annotations`: Serve validates args only against a real class annotation.

from ray.serve import Application

from deployments.admin import Admin
from deployments.engine import Engine
from deployments.ingress import Ingress
from deployments.postprocess import Postprocess
from deployments.router import Router
from deployments.tokenizer import Tokenizer
from graphs.config import AdminAppArgs, LLMAppArgs

LIGHT_STAGE_CPUS = 0.1
ENGINE_CPUS = 0.5
STAGE_MAX_ONGOING_REQUESTS = 512


def build_llm_app(args: LLMAppArgs) -> Application:
    """ingress -> router, tokenizer -> postprocess -> one engine deployment per model."""
    light = {"ray_actor_options": {"num_cpus": LIGHT_STAGE_CPUS}, "max_ongoing_requests": STAGE_MAX_ONGOING_REQUESTS}
    engines = {
        spec.engine_deployment_name: Engine.options(
            name=spec.engine_deployment_name,
            ray_actor_options={"num_cpus": ENGINE_CPUS},
            max_ongoing_requests=2 * spec.max_num_seqs,
        ).bind(spec, args.cache_dir)
        for spec in args.models
    }
    router = Router.options(**light).bind(args.models)
    tokenizer = Tokenizer.options(**light).bind(args.models, args.cache_dir)
    postprocess = Postprocess.options(**light).bind(args.models, engines, args.cache_dir)
    return Ingress.options(**light).bind(router, tokenizer, postprocess)


def build_admin_app(args: AdminAppArgs) -> Application:
    return Admin.bind(args.llm_app)
