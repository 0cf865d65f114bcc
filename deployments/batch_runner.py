"""The Batch API's runner: files and batches per tenant, each batch's lines run through the graph.

`BatchService` is the logic (testable without Ray over a LineGraph and a BatchStore); the
`BatchRunner` deployment, one replica per application, wraps it with handle-backed stages.
A batch goes validating -> in_progress -> finalizing -> completed (or cancelling -> cancelled,
or expired when its completion window passes first). Its lines run `max_concurrent_lines` at a
time at the engines' batch priority; a line refused for quota (429) or overload (503) waits and
is tried again, until the window ends. Every finished line is appended to the output or error
file and fsynced before it counts, so a runner that restarts resumes each unfinished batch
where its files say it stopped: every line ends up in exactly one result line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from servegraph.deployments.auth import Tenant
from servegraph.deployments.batch_graph import GraphLines, LineGraph
from servegraph.deployments.batch_lines import (
    BATCH_ENDPOINTS,
    CANCELLED,
    EXPIRED,
    InputLine,
    Progress,
    ResultFile,
    ResultWriter,
    count_lines,
    error_line,
    input_lines,
    line_id,
    recover_progress,
    refused_line,
    success_line,
)
from servegraph.deployments.batch_store import (
    ERRORS,
    INPUT,
    OUTPUT,
    BatchJob,
    BatchStore,
    new_batch_id,
    no_such,
)
from servegraph.deployments.errors import (
    BadRequestError,
    OpenAIError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    as_openai_error,
)
from servegraph.deployments.graph_client import GraphClient
from servegraph.deployments.graph_stages import HandleStages
from servegraph.deployments.router import TrafficWeights
from servegraph.models.config import BatchConfig, LLMAppArgs, PriorityClass, RequestLimits, TenantLimits

logger = logging.getLogger("ray.serve.servegraph.batch")

COMPLETION_WINDOWS_S = {"24h": 24 * 3600}  # OpenAI accepts only 24h
FILE_PURPOSE = "batch"
RETRIED_STATUSES = (429, 503)  # the tenant's quota, or the graph's queues: the line waits, it did not fail
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
FILE_LIST_LIMIT, BATCH_LIST_LIMIT = (10_000, 10_000), (20, 100)  # (default, most) per page
OWNER_POLL_S, READY_WAIT_S = 1.0, 30.0  # a new runner waits for the old one's lock; API calls wait that long
ENDED_AT = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at", "failed": "failed_at"}


def tenant_snapshot(tenant: Tenant) -> dict[str, Any]:
    """What a resumed batch needs of its tenant if the tenant is not in the config (a custom auth backend's)."""
    return {"name": tenant.name, "models": sorted(tenant.models), "admin": tenant.admin,
            "limits": tenant.limits.model_dump(), "priority": tenant.priority.value}  # fmt: skip


def tenant_of_snapshot(snapshot: dict[str, Any]) -> Tenant:
    return Tenant(snapshot["name"], frozenset(snapshot["models"]), snapshot["admin"],
                  TenantLimits(**snapshot["limits"]), PriorityClass(snapshot["priority"]))  # fmt: skip


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """OpenAI's metadata rules: up to 16 string pairs, keys up to 64 characters, values up to 512."""
    if metadata is None:
        return None
    valid = isinstance(metadata, dict) and len(metadata) <= MAX_METADATA_PAIRS and all(
        isinstance(key, str) and isinstance(value, str) and len(key) <= MAX_METADATA_KEY
        and len(value) <= MAX_METADATA_VALUE for key, value in metadata.items()
    )  # fmt: skip
    if not valid:
        raise BadRequestError(
            "metadata: up to 16 pairs of strings, keys up to 64 characters, values up to 512.", param="metadata"
        )
    return metadata


def page(items: list, after: str | None, limit: int, kind: str) -> dict[str, Any]:
    """OpenAI's cursor page: the items after the one with id `after`, at most limit of them."""
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise no_such(kind, after)
        start = ids.index(after) + 1
    data = items[start : start + limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": start + limit < len(items)}  # fmt: skip


def checked_limit(limit: int | None, bounds: tuple[int, int]) -> int:
    default, most = bounds
    if limit is None:
        return default
    if not 1 <= limit <= most:
        raise BadRequestError(f"limit must be between 1 and {most}.", param="limit")
    return limit


class BatchService:
    """Files and batches for every tenant; each batch not yet ended runs in a task of its own.

    Calls name the caller's tenant: a file or batch of another tenant is a 404, as one that
    does not exist. `tenants` are the configured ones: a resumed batch runs with its tenant's
    current models and limits (or, for a tenant the config does not declare, those it had).
    """

    def __init__(
        self,
        store: BatchStore,
        graph: LineGraph,
        config: BatchConfig,
        limits: RequestLimits,
        tenants: Mapping[str, Tenant] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._graph = graph
        self._config = config
        self._limits = limits
        self._tenants = dict(tenants or {})
        self._clock = clock
        self._jobs: dict[str, BatchJob] = {}
        self._tasks: dict[str, asyncio.Task] = {}

    def _now(self) -> int:
        return int(self._clock())

    def start(self) -> None:
        """Every stored batch known, and those not ended resumed (call on the event loop that runs them)."""
        for job in self._store.batches():
            self._jobs[job.id] = job
            if not job.done:
                logger.info("resuming batch %s (%s)", job.id, job.status)
                self._launch(job)

    async def stop(self) -> None:
        """Running batches stopped as a shutdown stops them: to be resumed, not cancelled."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait(self, batch_id: str) -> None:
        """Until the batch's task ends (tests)."""
        task = self._tasks.get(batch_id)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    # Files

    async def upload_file(self, tenant: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        if purpose != FILE_PURPOSE:
            raise BadRequestError(f"purpose {purpose!r}: this server keeps files for the Batch API only: `batch`.",
                                  param="purpose")  # fmt: skip
        if len(data) > self._config.max_file_bytes:
            raise PayloadTooLargeError(f"The file is larger than the limit of {self._config.max_file_bytes} bytes.")
        if not data.strip():
            raise BadRequestError("The file is empty: a batch input file holds one JSON request per line.",
                                  param="file")  # fmt: skip
        stored = await asyncio.to_thread(self._store.add_file, tenant, filename, purpose, data, self._now())
        return stored.object()

    async def retrieve_file(self, tenant: str, file_id: str) -> dict[str, Any]:
        return self._store.file(tenant, file_id).object()

    async def file_content(self, tenant: str, file_id: str) -> bytes:
        return await asyncio.to_thread(self._store.file_path(tenant, file_id).read_bytes)

    async def delete_file(self, tenant: str, file_id: str) -> dict[str, Any]:
        await asyncio.to_thread(self._store.delete_file, tenant, file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    async def list_files(
        self, tenant: str, purpose: str | None = None, limit: int | None = None, after: str | None = None,
        order: str = "desc",
    ) -> dict[str, Any]:  # fmt: skip
        files = [stored for stored in self._store.files(tenant) if purpose is None or stored.purpose == purpose]
        files.sort(key=lambda stored: (stored.created_at, stored.id), reverse=order != "asc")
        return page([stored.object() for stored in files], after, checked_limit(limit, FILE_LIST_LIMIT), "File")

    # Batches

    async def create_batch(
        self, tenant: Tenant, input_file_id: str, endpoint: str, completion_window: str, metadata: Any = None
    ) -> dict[str, Any]:
        if endpoint not in BATCH_ENDPOINTS:
            raise BadRequestError(f"endpoint {endpoint!r} is not supported; supported: {', '.join(BATCH_ENDPOINTS)}.",
                                  param="endpoint")  # fmt: skip
        if completion_window not in COMPLETION_WINDOWS_S:
            raise BadRequestError("completion_window must be `24h`.", param="completion_window")
        metadata = check_metadata(metadata)
        stored = self._store.file(tenant.name, input_file_id)
        if stored.purpose != FILE_PURPOSE:
            raise BadRequestError(f"The file {input_file_id} has purpose {stored.purpose!r}; a batch needs `batch`.",
                                  param="input_file_id")  # fmt: skip
        now = self._now()
        job = BatchJob(new_batch_id(), tenant_snapshot(tenant), input_file_id, endpoint, completion_window,
                       now, now + COMPLETION_WINDOWS_S[completion_window], metadata=metadata)  # fmt: skip
        await asyncio.to_thread(self._store.add_batch, job)
        self._jobs[job.id] = job
        self._launch(job)
        return job.object()

    def _job(self, tenant: str, batch_id: str) -> BatchJob:
        job = self._jobs.get(batch_id)
        if job is None or job.tenant_name != tenant:
            raise no_such("batch", batch_id)
        return job

    async def retrieve_batch(self, tenant: str, batch_id: str) -> dict[str, Any]:
        return self._job(tenant, batch_id).object()

    async def list_batches(self, tenant: str, limit: int | None = None, after: str | None = None) -> dict[str, Any]:
        jobs = sorted((job for job in self._jobs.values() if job.tenant_name == tenant),
                      key=lambda job: (job.created_at, job.id), reverse=True)  # fmt: skip
        return page([job.object() for job in jobs], after, checked_limit(limit, BATCH_LIST_LIMIT), "batch")

    async def cancel_batch(self, tenant: str, batch_id: str) -> dict[str, Any]:
        """cancelling at once; the batch's task stops its lines and finishes it as cancelled."""
        job = self._job(tenant, batch_id)
        if job.status in ("cancelling", "cancelled"):
            return job.object()
        if job.done or job.ending is not None:
            raise BadRequestError(f"The batch is {job.status}: only a batch still running can be cancelled.")
        job.status, job.cancelling_at = "cancelling", self._now()
        await asyncio.to_thread(self._store.save, job)
        task = self._tasks.get(job.id)
        if task is not None:
            task.cancel()
        return job.object()

    # Running

    def _launch(self, job: BatchJob) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job), name=f"batch {job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda done: self._ended(job.id, done))

    def _ended(self, batch_id: str, task: asyncio.Task) -> None:
        if self._tasks.get(batch_id) is task:
            del self._tasks[batch_id]
        if not task.cancelled() and task.exception() is not None:
            logger.error("batch %s stopped; it resumes when the runner restarts", batch_id,
                         exc_info=task.exception())  # fmt: skip

    def _tenant(self, job: BatchJob) -> Tenant:
        return self._tenants.get(job.tenant_name) or tenant_of_snapshot(job.tenant)

    async def _run(self, job: BatchJob) -> None:
        folder = self._store.batch_dir(job.tenant_name, job.id)
        output, errors = ResultFile(folder / OUTPUT), ResultFile(folder / ERRORS)
        try:
            ending = job.ending
            if ending is None:
                progress = await asyncio.to_thread(recover_progress, output, errors)
                self._apply(job, progress)
                writer = ResultWriter(output, errors, progress, lambda: self._apply(job, progress))
                try:
                    ending = await self._work(job, folder / INPUT, writer)
                except asyncio.CancelledError:
                    if job.status != "cancelling":
                        raise  # a shutdown: the batch resumes with the next runner
                    ending = "cancelled"
                await writer.drain()  # lines whose writes were under way when their tasks stopped
                if ending in ("expired", "cancelled"):
                    await self._close_unfinished(job, folder / INPUT, progress, errors, ending)
            await asyncio.to_thread(self._finish, job, ending)
        finally:
            output.close()
            errors.close()

    async def _work(self, job: BatchJob, input_path: Path, writer: ResultWriter) -> str:
        """The batch's lines run; the status it ends with."""
        if job.status == "cancelling":
            return "cancelled"
        if self._clock() >= job.expires_at:
            return "expired"
        if job.status == "validating":
            job.total = await asyncio.to_thread(count_lines, input_path)
            if not 0 < job.total <= self._config.max_lines:
                message = f"The input file holds {job.total} requests; a batch takes 1 to {self._config.max_lines}."
                job.errors = [{"code": "invalid_request_count", "line": None, "message": message, "param": None}]
                return "failed"
            job.status, job.in_progress_at = "in_progress", self._now()
            await asyncio.to_thread(self._store.save, job)
        done = set(writer.progress.done)
        pending = (line for line in input_lines(input_path, job.endpoint, self._limits) if line.number not in done)
        tenant = self._tenant(job)

        async def worker() -> None:
            for line in pending:  # shared by the workers: each next() runs to its yield without awaiting
                await self._run_line(job, tenant, line, writer)

        try:
            async with asyncio.timeout(job.expires_at - self._clock()):
                async with asyncio.TaskGroup() as group:
                    for _ in range(self._config.max_concurrent_lines):
                        group.create_task(worker())
        except TimeoutError:
            return "expired"
        return "completed"

    async def _run_line(self, job: BatchJob, tenant: Tenant, line: InputLine, writer: ResultWriter) -> None:
        result_id, request_id = line_id(job.id, line.number), f"{job.id}-{line.number}"
        if line.error is not None:
            data = error_line(result_id, line.custom_id, line.error.code, line.error.message)
            await writer.failed(line.number, data, line.error)
        elif line.refused is not None:
            await writer.failed(line.number, refused_line(result_id, line.custom_id, request_id, line.refused))
        else:
            try:
                chunk = await self._answered(tenant, line, request_id)
            except OpenAIError as error:
                await writer.failed(line.number, refused_line(result_id, line.custom_id, request_id, error))
            else:
                data = success_line(result_id, line.custom_id, request_id, 200, chunk.data)
                await writer.succeeded(line.number, data, chunk.prompt_tokens, chunk.completion_tokens)

    async def _answered(self, tenant: Tenant, line: InputLine, request_id: str):
        """The line's response; refusals for quota or overload are waited out (the window bounds the wait)."""
        while True:
            try:
                return await self._graph.run(tenant, line.request, request_id)
            except Exception as exc:
                error = as_openai_error(exc)
                if error.status_code not in RETRIED_STATUSES:
                    raise error from exc
                retry_after = float(error.headers.get("Retry-After", 0) or 0)
                await asyncio.sleep(max(self._config.retry_interval_s, retry_after))

    async def _close_unfinished(self, job: BatchJob, input_path: Path, progress: Progress, errors: ResultFile,
                                ending: str) -> None:  # fmt: skip
        """Every line not done goes to the error file as OpenAI reports it: batch_expired or batch_cancelled."""
        code, message = EXPIRED if ending == "expired" else CANCELLED

        def unfinished() -> Iterator[bytes]:
            for line in input_lines(input_path, job.endpoint, self._limits):
                if line.number not in progress.done:
                    progress.failed += 1
                    yield error_line(line_id(job.id, line.number), line.custom_id, code, message)

        if job.total:  # a batch cancelled before it counted its lines has none to report
            await asyncio.to_thread(lambda: errors.append(b"".join(unfinished())))
        self._apply(job, progress)

    def _finish(self, job: BatchJob, ending: str) -> None:
        """Published results and the final status; each step is redone safely if a crash cuts this short."""
        now = self._now()
        if job.ending is None:
            job.ending = ending
            if ending == "completed":
                job.status, job.finalizing_at = "finalizing", now
            self._store.save(job)
        output_id, error_id = job.result_ids
        job.output_file_id = self._store.publish(job, OUTPUT, output_id, now)
        job.error_file_id = self._store.publish(job, ERRORS, error_id, now)
        job.status = ending
        setattr(job, ENDED_AT[ending], now)
        self._store.save(job)
        logger.info("batch %s %s: %d completed, %d failed", job.id, ending, job.completed, job.failed)

    @staticmethod
    def _apply(job: BatchJob, progress: Progress) -> None:
        job.completed, job.failed = progress.completed, progress.failed
        job.input_tokens, job.output_tokens = progress.input_tokens, progress.output_tokens
        job.errors = list(progress.errors) or job.errors


@serve.deployment(name="batch-runner")  # options: graphs/builder.py
class BatchRunner:
    """The one replica that runs every batch of the application; files and state live in `batch.dir`.

    Its lines reach the graph as the ingress's requests do (HandleStages, the quota replica,
    the same fallback policy), and write usage records and metrics as the ingress does.
    Replaced or restarted, it resumes every batch not ended.
    """

    async def __init__(
        self,
        router: DeploymentHandle,
        tokenizer: DeploymentHandle,
        postprocess: DeploymentHandle,
        args: LLMAppArgs,
        quota: DeploymentHandle | None = None,
    ) -> None:
        replica = serve.get_replica_context()
        self._graph = graph = GraphClient(HandleStages(router, tokenizer, postprocess), args, quota)
        lines = GraphLines(graph.stages, replica.app_name, graph.observe, graph.quotas, graph.fallbacks)
        tenants = {spec.name: Tenant.of(spec) for spec in args.auth.tenants} if args.auth.enabled else {}
        # One folder per application: each application's runner resumes only its own batches.
        store = await asyncio.to_thread(BatchStore, args.batch.directory(args.usage) / replica.app_name)
        self._store = store
        self._service = BatchService(store, lines, args.batch, args.limits, tenants)
        self._ready = asyncio.Event()
        self._traffic_lock = asyncio.Lock()
        self._taking_over = asyncio.get_running_loop().create_task(self._take_over(store))

    async def _take_over(self, store: BatchStore) -> None:
        """The store's lock first (a runner being replaced may still hold it), then every batch resumed."""
        while not await asyncio.to_thread(store.try_own):
            await asyncio.sleep(OWNER_POLL_S)
        try:
            await self._apply_traffic(await asyncio.to_thread(store.load_traffic))
        except Exception as exc:  # unreadable weights or the router away: lines go to first versions until the next
            logger.warning("kept traffic weights not applied: %r", exc)
        self._service.start()
        self._ready.set()

    async def call(self, method: str, *args: Any) -> Any:
        """One of BatchService's API methods (the ingress's batch routes name them)."""
        if method not in API_METHODS:
            raise BadRequestError(f"unknown batch call {method!r}")
        try:
            async with asyncio.timeout(READY_WAIT_S):
                await self._ready.wait()
        except TimeoutError:
            raise ServiceUnavailableError("The batch runner is taking over from the previous one; retry.") from None
        return await getattr(self._service, method)(*args)

    async def set_traffic(self, traffic: TrafficWeights) -> None:
        """The ingress's new version weights (its reconfigure sends them): lines split as requests do,
        and a restarted runner starts with them."""
        await self._ready.wait()
        async with self._traffic_lock:  # applied and kept in the order they came
            await self._apply_traffic(traffic)
            await asyncio.to_thread(self._store.save_traffic, traffic)

    async def _apply_traffic(self, traffic: TrafficWeights) -> None:
        try:
            await self._graph.stages.set_traffic(traffic)
        except ValueError as exc:  # weights kept from an older config may name versions no longer deployed
            logger.warning("traffic weights %s not applied: %s", traffic, exc)

    def __del__(self) -> None:
        graph = getattr(self, "_graph", None)
        if graph is not None:
            graph.close()


API_METHODS = frozenset({"upload_file", "retrieve_file", "file_content", "delete_file", "list_files", "create_batch",
                         "retrieve_batch", "list_batches", "cancel_batch"})  # fmt: skip
