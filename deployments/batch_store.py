"""The Batch API's disk: uploaded files, each batch's state and its append-only result files.

Layout under the configured directory, one folder per tenant (so no lookup can reach another
tenant's objects: every path is built from the caller's tenant and an id checked against its
pattern):

    <tenant>/files/<file-id>            the bytes as uploaded (or a batch's published results)
    <tenant>/files/<file-id>.json       its FileObject
    <tenant>/batches/<batch-id>/state.json    the batch's BatchJob
    <tenant>/batches/<batch-id>/input.jsonl   a hard link to (or copy of) the input file
    <tenant>/batches/<batch-id>/output.jsonl  results appended as lines finish (fsynced)
    <tenant>/batches/<batch-id>/errors.jsonl  failed and malformed lines, likewise

Every file that is replaced (metadata, state) is written under a temporary name, fsynced and
renamed, and its directory fsynced: a crash leaves the old version or the new one. Result
lines are appended whole and fsynced before they count, and each carries an id that names its
input line, so a restarted runner knows exactly which lines are done (see batch_lines.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from servegraph.deployments.errors import OpenAIError

FILE_ID = re.compile(r"file-[0-9a-f]{32}")
BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
MAX_FILENAME_CHARS = 256
OUTPUT, ERRORS, INPUT, STATE = "output.jsonl", "errors.jsonl", "input.jsonl", "state.json"
TRAFFIC = ".traffic.json"  # the ingress's weights (a dot name: no tenant folder is named so)


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


class NotFoundError(OpenAIError):
    status_code = 404
    default_code = "not_found"


def no_such(kind: str, object_id: str) -> NotFoundError:
    """OpenAI's answer for an id the caller cannot see: the same whether it is another tenant's or nobody's."""
    return NotFoundError(f"No such {kind} object: {object_id[:80]}", param="id")


def tenant_folder(tenant: str) -> str:
    """A folder name for a tenant: its own name when that is a safe path component, else a hash of it."""
    if SAFE_NAME.fullmatch(tenant) and tenant not in (".", ".."):
        return tenant
    return "t-" + hashlib.sha256(tenant.encode()).hexdigest()[:32]


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """path holds data or its previous content, whatever happens: temp file, fsync, rename, directory fsync."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


@dataclass(frozen=True)
class StoredFile:
    """One file's FileObject fields (OpenAI's shape; `status` is deprecated there and always `processed` here)."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str

    def object(self) -> dict[str, Any]:
        return {**asdict(self), "object": "file", "status": "processed", "expires_at": None, "status_details": None}


@dataclass
class BatchJob:
    """A batch as stored: OpenAI's Batch fields, plus what the runner needs to resume it.

    request_counts and usage are kept in memory while the batch runs and rebuilt from the
    result files when a runner resumes it; `ending` is the final status a batch is being
    finished into, set before its result files are published, so a finish cut short is redone.
    """

    id: str
    tenant: dict[str, Any]  # the tenant's name, models, limits, priority when the batch was created
    input_file_id: str
    endpoint: str
    completion_window: str
    created_at: int
    expires_at: int
    status: str = "validating"
    metadata: dict[str, str] | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None  # published when the batch ends
    error_file_id: str | None = None
    ending: str | None = None
    result_ids: tuple[str, str] = field(default_factory=lambda: (new_file_id(), new_file_id()))

    @property
    def tenant_name(self) -> str:
        return self.tenant["name"]

    @property
    def done(self) -> bool:
        return self.status in ("completed", "failed", "expired", "cancelled")

    def object(self) -> dict[str, Any]:
        """OpenAI's Batch object."""
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "metadata": self.metadata,
            "usage": {
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens,
            },
        }

    def state(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def of_state(cls, data: bytes) -> BatchJob:
        fields = json.loads(data)
        fields["result_ids"] = tuple(fields["result_ids"])
        return cls(**fields)


class BatchStore:
    """Files and batches on disk, per tenant; the one BatchRunner replica is its only writer."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._owner_fd: int | None = None

    def try_own(self) -> bool:
        """Whether this process now holds the store's lock (held until it exits), so that a runner
        replacing another (a redeploy starts the new replica before the old one stops) runs no
        batch until the old one has gone: two runners would run the same lines twice."""
        if self._owner_fd is None:
            self._owner_fd = os.open(self.root / "runner.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._owner_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def save_traffic(self, traffic: dict[str, dict[str, float]]) -> None:
        """The ingress's traffic weights, kept so a restarted runner splits lines as the ingress splits requests."""
        write_atomically(self.root / TRAFFIC, json.dumps(traffic, sort_keys=True).encode())

    def load_traffic(self) -> dict[str, dict[str, float]]:
        path = self.root / TRAFFIC
        return json.loads(path.read_bytes()) if path.exists() else {}

    def _tenant(self, tenant: str) -> Path:
        return self.root / tenant_folder(tenant)

    def _files(self, tenant: str) -> Path:
        return self._tenant(tenant) / "files"

    def batch_dir(self, tenant: str, batch_id: str) -> Path:
        if not BATCH_ID.fullmatch(batch_id):
            raise no_such("batch", batch_id)
        return self._tenant(tenant) / "batches" / batch_id

    def file_path(self, tenant: str, file_id: str) -> Path:
        """The file's bytes; 404 unless this tenant has it."""
        self.file(tenant, file_id)
        return self._files(tenant) / file_id

    # Files

    def add_file(self, tenant: str, filename: str, purpose: str, data: bytes, now: int) -> StoredFile:
        folder = self._files(tenant)
        folder.mkdir(parents=True, exist_ok=True)
        stored = StoredFile(new_file_id(), len(data), now, filename[:MAX_FILENAME_CHARS], purpose)
        write_atomically(folder / stored.id, data)
        write_atomically(folder / f"{stored.id}.json", json.dumps(asdict(stored)).encode())
        return stored

    def file(self, tenant: str, file_id: str) -> StoredFile:
        meta = self._files(tenant) / f"{file_id}.json"
        if not FILE_ID.fullmatch(file_id) or not meta.is_file():
            raise no_such("File", file_id)
        return StoredFile(**json.loads(meta.read_bytes()))

    def files(self, tenant: str) -> list[StoredFile]:
        folder = self._files(tenant)
        if not folder.is_dir():
            return []
        return [StoredFile(**json.loads(meta.read_bytes())) for meta in folder.glob("file-*.json")]

    def delete_file(self, tenant: str, file_id: str) -> None:
        self.file(tenant, file_id)
        folder = self._files(tenant)
        (folder / f"{file_id}.json").unlink()  # the metadata first: a file without it is never listed
        (folder / file_id).unlink(missing_ok=True)
        fsync_directory(folder)

    def publish(self, job: BatchJob, name: str, file_id: str, now: int) -> str | None:
        """A batch's result file (OUTPUT or ERRORS) moved into its tenant's files, once; its id, or None if empty.

        Idempotent: a publish cut short by a crash is finished by the next call.
        """
        source, folder = self.batch_dir(job.tenant_name, job.id) / name, self._files(job.tenant_name)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / file_id
        if source.exists():
            if source.stat().st_size == 0:
                source.unlink()
                return None
            os.replace(source, target)
            fsync_directory(folder)
        if not target.exists():
            return None
        meta = folder / f"{file_id}.json"
        if not meta.exists():
            filename = f"{job.id}_{'output' if name == OUTPUT else 'error'}.jsonl"
            stored = StoredFile(file_id, target.stat().st_size, now, filename, "batch_output")
            write_atomically(meta, json.dumps(asdict(stored)).encode())
        return file_id

    # Batches

    def add_batch(self, job: BatchJob) -> None:
        """The batch's folder with its own link to the input, so deleting the file does not stop the batch."""
        folder = self.batch_dir(job.tenant_name, job.id)
        folder.mkdir(parents=True)
        source, link = self.file_path(job.tenant_name, job.input_file_id), folder / INPUT
        try:
            os.link(source, link)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(source, link)
        self.save(job)

    def save(self, job: BatchJob) -> None:
        write_atomically(self.batch_dir(job.tenant_name, job.id) / STATE, job.state())

    def batches(self) -> list[BatchJob]:
        """Every tenant's batches, as last saved."""
        return [BatchJob.of_state(state.read_bytes()) for state in self.root.glob(f"*/batches/batch_*/{STATE}")]
