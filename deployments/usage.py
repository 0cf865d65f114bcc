"""Usage records: what one finished request is billed as, where records live, and how they are read.

A record is a UsageRecord; its Parquet schema (USAGE_SCHEMA) is derived from it. Records live
under the usage directory: JSON-lines segments being written (`segments/`, see usage_log.py for
the writer) and Parquet parts partitioned by UTC day (`day=YYYY-MM-DD/usage-<segment>.parquet`).
`read_usage` reads only the day partitions asked for, plus the segments not converted yet, plus
Parquet files of the earlier flat layout (`usage-*.parquet`, migrated into partitions by the
writer), each record once; `summarize` turns them into requests and tokens per tenant, model and day.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, fields
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from servegraph.deployments.telemetry import CLIENT_CLOSED_REQUEST, RequestRecord

logger = logging.getLogger("ray.serve.servegraph.usage")

SEGMENTS = "segments"


DAY_PREFIX = "day="


PART_PREFIX = "usage-"


UsageStatus = Literal["success", "error", "cancelled"]


def status_class(http_status: int) -> UsageStatus:
    if http_status == CLIENT_CLOSED_REQUEST:
        return "cancelled"
    return "success" if http_status < 400 else "error"


@dataclass(frozen=True)
class UsageRecord:
    """One request as billed: the fields of its RequestRecord that usage keeps, with an id and a time.

    The one definition of the record: USAGE_SCHEMA (Parquet) is derived from these fields.
    """

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
    cached: bool = False  # answered from the ingress's response cache; parts written before it read as False

    @classmethod
    def of(cls, record: RequestRecord, now: float | None = None) -> UsageRecord:
        """Fields named alike are copied; `status` becomes its class, the HTTP status `http_status`."""
        copied = {name: getattr(record, name) for name in COPIED_FIELDS}
        return cls(
            record_id=uuid.uuid4().hex,
            time=time.time() if now is None else now,
            status=status_class(record.status),
            http_status=record.status,
            **copied,
        )


COPIED_FIELDS = ({f.name for f in fields(UsageRecord)} & {f.name for f in fields(RequestRecord)}) - {"status"}


# Arrow types by annotation; two columns are stored otherwise: time as a UTC timestamp, HTTP status narrower.
ARROW_TYPES = {
    "str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "UsageStatus": pa.string(),
}  # fmt: skip


STORED_AS = {"time": pa.timestamp("ms", tz="UTC"), "http_status": pa.int32()}


USAGE_SCHEMA = pa.schema([(f.name, STORED_AS.get(f.name, ARROW_TYPES.get(f.type))) for f in fields(UsageRecord)])


# Columns added after records were first written: a row or part without one takes its default.
LATER_COLUMNS = {f.name: f.default for f in fields(UsageRecord) if f.default is not MISSING}


def records_table(rows: list[dict]) -> pa.Table:
    columns = {name: [row.get(name, LATER_COLUMNS.get(name)) for row in rows] for name in USAGE_SCHEMA.names}
    for name, default in LATER_COLUMNS.items():
        columns[name] = [default if value is None else value for value in columns[name]]
    columns["time"] = [datetime.fromtimestamp(t, UTC) for t in columns["time"]]
    return pa.Table.from_pydict(columns, schema=USAGE_SCHEMA)


def read_part(path: Path) -> pa.Table:
    """A Parquet part in USAGE_SCHEMA; a part written before a column existed gets its default."""
    table = pq.read_table(path, schema=USAGE_SCHEMA)
    for name, default in LATER_COLUMNS.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pc.fill_null(table[name], default))
    return table


def day_of(row: dict) -> date:
    return datetime.fromtimestamp(row["time"], UTC).date()


def by_day(rows: Iterable[dict]) -> dict[date, list[dict]]:
    days: dict[date, list[dict]] = {}
    for row in rows:
        days.setdefault(day_of(row), []).append(row)
    return days


def read_segment(path: Path) -> list[dict]:
    """Its records. A line counts once its newline is written: a torn tail (the writer died or
    failed mid-write) is skipped, even when it happens to parse."""
    *lines, tail = path.read_bytes().split(b"\n")
    if tail:
        logger.warning("skipping a torn usage line in %s", path.name)
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping an unreadable usage line in %s", path.name)
    return rows


def partition(directory: Path, day: date) -> Path:
    return directory / f"{DAY_PREFIX}{day.isoformat()}"


def part_path(directory: Path, day: date, stem: str) -> Path:
    """Derived from the segment and day only, so converting a segment again replaces, never adds."""
    return partition(directory, day) / f"{PART_PREFIX}{stem}.parquet"


def flat_parts(directory: Path) -> list[Path]:
    """Parquet files of the layout before day partitions: usage-<segment>.parquet at the top."""
    return sorted(directory.glob(f"{PART_PREFIX}*.parquet"))


def partitions(directory: Path, since: date | None, until: date | None) -> list[Path]:
    """The day directories in [since, until], found from their names alone."""
    days = []
    for path in directory.glob(f"{DAY_PREFIX}*"):
        try:
            day = date.fromisoformat(path.name.removeprefix(DAY_PREFIX))
        except ValueError:
            continue
        if in_range(day, since, until):
            days.append((day, path))
    return [path for _, path in sorted(days)]


def in_range(day: date, since: date | None, until: date | None) -> bool:
    return (since is None or day >= since) and (until is None or day <= until)


def read_usage(directory: Path, *, since: date | None = None, until: date | None = None) -> pa.Table:
    """The records of days since..until (UTC, both included; None: unbounded), each once.

    Reads only those days' partitions, plus segments not converted yet and flat-layout files not
    migrated yet. A segment or flat file whose records for a day are already in that day's part
    (converted or migrated meanwhile, or half-way when its converter died) is skipped for that day.
    Segments are listed before parts, so one converted in between is found as a part.
    """
    segment_rows: dict[str, list[dict]] = {}
    for segment in sorted((directory / SEGMENTS).glob("*.jsonl")):
        try:
            segment_rows[segment.stem] = read_segment(segment)
        except FileNotFoundError:  # converted meanwhile: its parts are listed below
            continue
    flat_tables = {}
    for flat in flat_parts(directory):
        try:
            flat_tables[flat.stem.removeprefix(PART_PREFIX)] = read_part(flat)
        except FileNotFoundError:  # migrated meanwhile
            continue
    tables, converted = [], set()
    for day_directory in partitions(directory, since, until):
        day = date.fromisoformat(day_directory.name.removeprefix(DAY_PREFIX))
        for part in sorted(day_directory.glob(f"{PART_PREFIX}*.parquet")):
            try:
                tables.append(read_part(part))
            except FileNotFoundError:
                continue
            converted.add((part.stem.removeprefix(PART_PREFIX), day))
    pending = [
        row
        for stem, rows in segment_rows.items()
        for row in rows
        if in_range(day := day_of(row), since, until) and (stem, day) not in converted
    ]
    tables.append(records_table(pending))
    tables.extend(unconverted_flat(table, stem, converted, since, until) for stem, table in flat_tables.items())
    return pa.concat_tables(tables)


def unconverted_flat(
    table: pa.Table, stem: str, converted: set[tuple[str, date]], since: date | None, until: date | None
) -> pa.Table:
    """A flat-layout file's rows in range whose day has no migrated part yet."""
    days = pc.cast(table["time"], pa.date32())
    wanted = pc.invert(pc.is_in(days, pa.array([d for s, d in converted if s == stem], pa.date32())))
    if since is not None:
        wanted = pc.and_(wanted, pc.greater_equal(days, pa.scalar(since, pa.date32())))
    if until is not None:
        wanted = pc.and_(wanted, pc.less_equal(days, pa.scalar(until, pa.date32())))
    return table.filter(wanted)


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
