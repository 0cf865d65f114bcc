"""Usage metering: one record per finished request, kept durably as Parquet.

Each ingress replica appends records to its own JSON-lines segment, one write per record,
so a killed replica loses nothing the OS has (only a machine crash loses what was not yet
written back to disk). A background thread turns segments into Parquet files once they are
big or old enough, off the request path; shutdown converts the last one. A segment whose
writer died is found by its released file lock and converted by the next replica to start.
Readers take the Parquet files plus the segments not yet converted, so what is read is
never stale.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from servegraph.deployments.telemetry import CLIENT_CLOSED_REQUEST, RequestRecord
from servegraph.models.config import UsageConfig

logger = logging.getLogger("ray.serve.servegraph.usage")

SEGMENTS = "segments"
UsageStatus = Literal["success", "error", "cancelled"]

USAGE_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("time", pa.timestamp("ms", tz="UTC")),
        ("request_id", pa.string()),
        ("application", pa.string()),
        ("tenant", pa.string()),
        ("model", pa.string()),
        ("version", pa.string()),
        ("served_by", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("latency_s", pa.float64()),
        ("status", pa.string()),
        ("http_status", pa.int32()),
    ]
)


def status_class(http_status: int) -> UsageStatus:
    if http_status == CLIENT_CLOSED_REQUEST:
        return "cancelled"
    return "success" if http_status < 400 else "error"


@dataclass(frozen=True)
class UsageRecord:
    record_id: str
    time: float  # Unix seconds
    request_id: str
    application: str
    tenant: str
    model: str
    version: str
    served_by: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    status: UsageStatus
    http_status: int

    @classmethod
    def of(cls, record: RequestRecord, now: float | None = None) -> UsageRecord:
        return cls(
            record_id=uuid.uuid4().hex,
            time=time.time() if now is None else now,
            request_id=record.request_id,
            application=record.application,
            tenant=record.tenant,
            model=record.model,
            version=record.version,
            served_by=record.served_by,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            latency_s=record.latency_s,
            status=status_class(record.status),
            http_status=record.status,
        )


def records_table(rows: list[dict]) -> pa.Table:
    columns = {name: [row[name] for row in rows] for name in USAGE_SCHEMA.names}
    columns["time"] = [datetime.fromtimestamp(t, UTC) for t in columns["time"]]
    return pa.Table.from_pydict(columns, schema=USAGE_SCHEMA)


def read_segment(path: Path) -> list[dict]:
    """Its records; a torn last line (the writer died mid-write) is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping a torn usage line in %s", path.name)
    return rows


def part_path(directory: Path, segment: Path) -> Path:
    return directory / f"usage-{segment.stem}.parquet"


def convert_segment(directory: Path, segment: Path) -> None:
    """segment -> Parquet (written whole, then renamed into place), then the segment is removed."""
    rows = read_segment(segment)
    if rows:
        target = part_path(directory, segment)
        partial = target.with_suffix(".parquet.tmp")
        pq.write_table(records_table(rows), partial)
        os.replace(partial, target)
    segment.unlink(missing_ok=True)


def try_lock(handle: IO) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class UsageLog:
    """One writer's records: the open segment it appends to, and its rotation into Parquet."""

    def __init__(self, config: UsageConfig, writer: str, directory: Path | None = None) -> None:
        self.directory = directory or config.directory()
        self._segments = self.directory / SEGMENTS
        self._segments.mkdir(parents=True, exist_ok=True)
        self._config = config
        self._writer = writer
        self._sequence = 0
        self._lock = threading.Lock()
        self._segment: IO[str] | None = None
        self._opened_at = 0.0
        self._closed = False
        self._wake = threading.Event()
        recover_orphans(self.directory)
        self._rotator = threading.Thread(target=self._rotate_periodically, name="usage-rotation", daemon=True)
        self._rotator.start()

    def write(self, record: UsageRecord) -> None:
        line = json.dumps(asdict(record)) + "\n"
        with self._lock:
            if self._segment is None:
                self._open_segment()
            self._segment.write(line)
            self._segment.flush()  # in the OS now: a killed process loses nothing
            if self._segment.tell() >= self._config.rotate_bytes:
                self._wake.set()  # converting is the rotation thread's work, off the request path

    def rotate(self) -> None:
        """The open segment becomes a Parquet file; the next record starts a new segment."""
        with self._lock:
            segment, self._segment = self._segment, None
        if segment is not None:
            convert_segment(self.directory, Path(segment.name))
            segment.close()  # releases the lock only once converted

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.rotate()

    def _open_segment(self) -> None:
        self._sequence += 1
        path = self._segments / f"{self._writer}-{self._sequence:06d}.jsonl"
        self._segment = path.open("a")
        try_lock(self._segment)
        self._opened_at = time.monotonic()

    def _due(self) -> bool:
        with self._lock:
            if self._segment is None:
                return False
            too_old = time.monotonic() - self._opened_at >= self._config.rotate_interval_s
            return too_old or self._segment.tell() >= self._config.rotate_bytes

    def _rotate_periodically(self) -> None:
        """Wakes every few seconds, or when a segment is full; also converts orphaned segments."""
        interval = min(self._config.rotate_interval_s, 5.0)
        while not self._closed:
            self._wake.wait(interval)
            self._wake.clear()
            try:
                if not self._closed and self._due():
                    self.rotate()
                recover_orphans(self.directory)
            except OSError:
                logger.exception("usage rotation failed; records stay in their segment")


def recover_orphans(directory: Path) -> int:
    """Converts segments no live writer holds (their writer died); how many it converted."""
    converted = 0
    for segment in sorted((directory / SEGMENTS).glob("*.jsonl")):
        try:
            handle = segment.open("r")
        except FileNotFoundError:
            continue
        with handle:
            if try_lock(handle) and segment.exists():
                convert_segment(directory, segment)
                converted += 1
    return converted


def read_usage(directory: Path) -> pa.Table:
    """Every record: Parquet files, plus segments not converted yet (each record once)."""
    segment_rows: dict[str, list[dict]] = {}
    for segment in sorted((directory / SEGMENTS).glob("*.jsonl")):
        try:
            segment_rows[segment.stem] = read_segment(segment)
        except FileNotFoundError:  # converted meanwhile: its Parquet file is listed below
            continue
    parts = sorted(directory.glob("usage-*.parquet"))
    converted = {part.stem.removeprefix("usage-") for part in parts}
    tables = [pq.read_table(part, schema=USAGE_SCHEMA) for part in parts]
    pending = [row for stem, rows in segment_rows.items() if stem not in converted for row in rows]
    tables.append(records_table(pending))
    return pa.concat_tables(tables)


class UsageDay(BaseModel):
    """One tenant's use of one model on one (UTC) day."""

    object: Literal["usage.day"] = "usage.day"
    day: date
    tenant: str
    model: str
    requests: int
    succeeded: int
    failed: int
    cancelled: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageReport(BaseModel):
    object: Literal["list"] = "list"
    data: list[UsageDay]


def summarize(
    table: pa.Table,
    *,
    tenant: str | None = None,
    application: str | None = None,
    since: date | None = None,
    until: date | None = None,
) -> UsageReport:
    """Per tenant, model and day: requests by outcome and tokens."""
    table = table.append_column("day", pc.cast(table["time"], pa.date32()))
    wanted = pc.scalar(True)
    if tenant is not None:
        wanted &= pc.field("tenant") == tenant
    if application is not None:
        wanted &= pc.field("application") == application
    if since is not None:
        wanted &= pc.field("day") >= pa.scalar(since, pa.date32())
    if until is not None:
        wanted &= pc.field("day") <= pa.scalar(until, pa.date32())
    table = table.filter(wanted)
    for status in ("success", "error", "cancelled"):
        table = table.append_column(status, pc.cast(pc.equal(table["status"], status), pa.int64()))
    grouped = table.group_by(["tenant", "model", "day"]).aggregate(
        [
            ("record_id", "count"),
            ("success", "sum"),
            ("error", "sum"),
            ("cancelled", "sum"),
            ("prompt_tokens", "sum"),
            ("completion_tokens", "sum"),
        ]
    )
    days = [
        UsageDay(
            day=row["day"],
            tenant=row["tenant"],
            model=row["model"],
            requests=row["record_id_count"],
            succeeded=row["success_sum"],
            failed=row["error_sum"],
            cancelled=row["cancelled_sum"],
            prompt_tokens=row["prompt_tokens_sum"],
            completion_tokens=row["completion_tokens_sum"],
            total_tokens=row["prompt_tokens_sum"] + row["completion_tokens_sum"],
        )
        for row in grouped.to_pylist()
    ]
    return UsageReport(data=sorted(days, key=lambda d: (d.day, d.tenant, d.model)))
