"""The Batch API's HTTP routes on the ingress: /v1/files and /v1/batches, in OpenAI's shapes.

The ingress only reads the request and names the caller's tenant (front_door.py has
authenticated it); everything else happens in the BatchRunner replica, which owns the files
and the jobs, through one handle method (`call`). So `client.files.create`,
`client.batches.create`, `client.batches.retrieve` and `client.files.content` of the official
`openai` package work unchanged; a tenant sees only its own files and batches (404 otherwise).
"""

from __future__ import annotations

from typing import Any, Generic, Literal, Protocol, TypeVar

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError
from ray.serve.handle import DeploymentHandle

from servegraph.deployments.api_docs import error_responses
from servegraph.deployments.auth import Tenant
from servegraph.deployments.errors import PayloadTooLargeError, as_openai_error, invalid_field
from servegraph.deployments.front_door import tenant_of
from servegraph.deployments.http_errors import json_object


class BatchCalls(Protocol):
    """The BatchRunner's API methods by name (batch_runner.BatchService): a handle in Serve, the service in tests."""

    async def call(self, method: str, *args: Any) -> Any: ...


class HandleBatchCalls:
    """BatchCalls over the BatchRunner's handle; its errors arrive as the OpenAIErrors it raised."""

    def __init__(self, runner: DeploymentHandle) -> None:
        # Files travel whole in these calls: through Ray's object store, not Serve's gRPC
        # transport, whose messages stop at 4 MiB (an upload may be max_file_bytes, 200 MiB).
        self._runner = runner.options(_by_reference=True)

    async def call(self, method: str, *args: Any) -> Any:
        try:
            return await self._runner.call.remote(method, *args)
        except Exception as exc:
            raise as_openai_error(exc) from None

    async def set_traffic(self, traffic: dict[str, dict[str, float]]) -> None:
        """The ingress's version weights, for the runner's lines (BatchRunner.set_traffic)."""
        await self._runner.set_traffic.remote(traffic)


class LocalBatchCalls:
    """BatchCalls on a BatchService in this process."""

    def __init__(self, service: Any) -> None:
        self._service = service

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self._service, method)(*args)


# OpenAI's shapes, for the OpenAPI document (the runner builds the same dicts).
ItemT = TypeVar("ItemT", bound=BaseModel)


class Page(BaseModel, Generic[ItemT]):
    """OpenAI's cursor page of files or batches (batch_runner.page builds it): one shape for every list."""

    object: Literal["list"] = "list"
    data: list[ItemT]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["uploaded", "processed", "error"]
    expires_at: int | None = None
    status_details: str | None = None


class FileList(Page[FileObject]):  # a subclass, not an alias: the OpenAPI document keeps the name FileList
    pass


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchErrorItem(BaseModel):
    code: str | None = None
    line: int | None = None
    message: str | None = None
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorItem]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]  # fmt: skip
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts | None = None
    errors: BatchErrors | None = None
    metadata: dict[str, str] | None = None
    usage: dict[str, Any] | None = None


class BatchList(Page[BatchObject]):  # likewise
    pass


class BatchCreate(BaseModel):
    """POST /v1/batches: OpenAI's BatchCreateParams (other fields, like output_expires_after, are ignored)."""

    input_file_id: str = Field(max_length=64)
    endpoint: str = Field(max_length=64)
    completion_window: str = Field(max_length=16)
    metadata: dict[str, str] | None = None


FILE_STATUSES = (400, 401, 404)
UPLOADED_FILE, PURPOSE = File(description="JSON lines, one request each."), Form(description="`batch`.")
CONTENT = {200: {"description": "The file's bytes.", "content": {"application/octet-stream": {}}}}


FILES_PATH = "/v1/files"
# An upload's body is the file plus its multipart framing (boundaries, part headers, the purpose
# field): FrontDoor bounds the body at max_file_bytes plus this, the route the file exactly.
MULTIPART_ENVELOPE_BYTES = 64 << 10


def batch_router(batches: BatchCalls, max_file_bytes: int) -> APIRouter:
    """The routes over a BatchRunner; uploads larger than max_file_bytes are 413.

    Uploads are exempt from `limits.max_body_bytes` (FrontDoor gives FILES_PATH a limit of its own).
    """
    router = APIRouter()

    @router.post(FILES_PATH, responses=error_responses(400, 401, 413))
    async def create_file(
        file: UploadFile = UPLOADED_FILE, purpose: str = PURPOSE, tenant: Tenant = Depends(tenant_of)
    ) -> FileObject:
        """Upload a JSON-lines file of requests, purpose `batch`."""
        data = await file.read(max_file_bytes + 1)
        if len(data) > max_file_bytes:
            raise PayloadTooLargeError(f"The file is larger than the limit of {max_file_bytes} bytes.")
        return await batches.call("upload_file", tenant.name, file.filename or "upload.jsonl", purpose, data)

    @router.get("/v1/files", responses=error_responses(*FILE_STATUSES))
    async def list_files(
        tenant: Tenant = Depends(tenant_of),
        purpose: str | None = Query(None, max_length=64),
        limit: int | None = Query(None),
        after: str | None = Query(None, max_length=64),
        order: Literal["asc", "desc"] = "desc",
    ) -> FileList:
        return await batches.call("list_files", tenant.name, purpose, limit, after, order)

    @router.get("/v1/files/{file_id}", responses=error_responses(*FILE_STATUSES))
    async def retrieve_file(file_id: str, tenant: Tenant = Depends(tenant_of)) -> FileObject:
        return await batches.call("retrieve_file", tenant.name, file_id)

    @router.delete("/v1/files/{file_id}", responses=error_responses(*FILE_STATUSES))
    async def delete_file(file_id: str, tenant: Tenant = Depends(tenant_of)) -> FileDeleted:
        return await batches.call("delete_file", tenant.name, file_id)

    @router.get("/v1/files/{file_id}/content", response_class=Response,
                responses={**CONTENT, **error_responses(*FILE_STATUSES)})  # fmt: skip
    async def file_content(file_id: str, tenant: Tenant = Depends(tenant_of)) -> Response:
        data = await batches.call("file_content", tenant.name, file_id)
        return Response(data, media_type="application/octet-stream")

    create_body = {"required": True, "content": {"application/json": {"schema": BatchCreate.model_json_schema()}}}
    create_docs = {"responses": error_responses(400, 401, 404, 413), "openapi_extra": {"requestBody": create_body}}

    @router.post("/v1/batches", **create_docs)
    async def create_batch(http_request: Request, tenant: Tenant = Depends(tenant_of)) -> BatchObject:
        """Run every request of an uploaded file (purpose `batch`) at low priority; poll the batch for progress."""
        try:
            body = BatchCreate.model_validate(await json_object(http_request))
        except ValidationError as exc:
            raise invalid_field(exc.errors()) from None
        return await batches.call("create_batch", tenant, body.input_file_id, body.endpoint, body.completion_window,
                                  body.metadata)  # fmt: skip

    @router.get("/v1/batches", responses=error_responses(*FILE_STATUSES))
    async def list_batches(
        tenant: Tenant = Depends(tenant_of),
        limit: int | None = Query(None),
        after: str | None = Query(None, max_length=64),
    ) -> BatchList:
        return await batches.call("list_batches", tenant.name, limit, after)

    @router.get("/v1/batches/{batch_id}", responses=error_responses(*FILE_STATUSES))
    async def retrieve_batch(batch_id: str, tenant: Tenant = Depends(tenant_of)) -> BatchObject:
        return await batches.call("retrieve_batch", tenant.name, batch_id)

    @router.post("/v1/batches/{batch_id}/cancel", responses=error_responses(*FILE_STATUSES))
    async def cancel_batch(batch_id: str, tenant: Tenant = Depends(tenant_of)) -> BatchObject:
        """cancelling, then cancelled once the lines in flight stop; results so far stay in the output file."""
        return await batches.call("cancel_batch", tenant.name, batch_id)

    return router
