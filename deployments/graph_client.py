"""What the deployments that run clients' requests through the graph hold: the Ingress and the BatchRunner.

Both reach the graph over the same handles, admit through the same quota replica, fall back by
the same policy, and record every finished request in the usage log and the request metrics.
One definition here keeps a batch line served and recorded exactly as an interactive request.
"""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from servegraph.deployments.fallback import FallbackChain, load_fallback_policy
from servegraph.deployments.graph_stages import HandleStages
from servegraph.deployments.quota import HandleQuotas
from servegraph.deployments.telemetry import MetricLabels, RequestRecord, RequestTelemetry
from servegraph.deployments.usage import UsageRecord
from servegraph.deployments.usage_log import UsageLog
from servegraph.models.config import LLMAppArgs, served_names


class GraphClient:
    """The graph's stages, quotas and fallback chain for one replica, and where its requests are recorded.

    Built inside a Serve replica (the usage log's writer is named after it). It takes the stages
    built, not the router, tokenizer and postprocess handles, whose list the deployments' own
    signatures already spell out (graphs/builder.py binds them).
    """

    def __init__(self, stages: HandleStages, args: LLMAppArgs, quota: DeploymentHandle | None = None) -> None:
        self.stages = stages
        self.quotas = HandleQuotas(quota) if quota is not None else None
        self.fallbacks = FallbackChain(policy=load_fallback_policy(args.fallback_policy))
        self.labels = MetricLabels.of(served_names(args), args.auth)
        self.telemetry = RequestTelemetry(self.labels)
        self.usage = UsageLog(args.usage, serve.get_replica_context().replica_id.unique_id)

    def observe(self, record: RequestRecord) -> None:
        """A finished request: its usage record written, its metrics counted."""
        self.usage.write(UsageRecord.of(record))
        self.telemetry.observe(record)

    def close(self) -> None:
        """Serve's graceful shutdown: the open usage segment becomes Parquet now."""
        self.usage.close()
