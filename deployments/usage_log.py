"""The usage log: one ingress replica's records, written durably without locks, never failing a request.

Writing: each ingress replica appends records to JSON-lines segments only it writes to, named
`<writer>-<incarnation>-<seq>.jsonl`, so writers share a directory (a shared filesystem across
nodes) without any file lock. A record is in the OS as soon as `write` returns; a background
thread fsyncs the open segment about once a second (group commit: one fsync per second, not per
request, bounds what a machine crash can lose to about a second), and later turns segments into
Parquet parts under `day=YYYY-MM-DD/`. A part is written under a unique temporary name, fsynced,
renamed onto a name derived from its segment and day, and the directory fsynced, all before
the segment is deleted: a crash at any point leaves the records in the segment or the part, and
converting the same segment twice yields the same part names, so no record is counted twice.

Failures: `write` never raises. A record that cannot be appended (disk full, EIO, directory gone)
waits in a bounded in-memory queue, in order, and the background thread retries until it is
written; each failure is logged and counted (`servegraph_usage_write_failures`).

Recovery: a live writer refreshes its heartbeat file (`writers/<writer>-<incarnation>`) every few
seconds. A segment whose heartbeat and own mtime are both older than `stale_after_s` belongs to a
dead writer and is converted by whichever replica sees it first; two replicas racing write the
same part names. Ages are measured against the recoverer's own freshly touched heartbeat, so
both timestamps come from the same (file server's) clock.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from servegraph.deployments.usage import (
    PART_PREFIX,
    SEGMENTS,
    USAGE_SCHEMA,
    UsageRecord,
    by_day,
    flat_parts,
    part_path,
    read_segment,
    records_table,
)
from servegraph.models.config import UsageConfig

logger = logging.getLogger("ray.serve.servegraph.usage")

WRITERS = "writers"  # one heartbeat file per live writer


WARN_EVERY_S = 30.0


@dataclass(frozen=True)
class UsageTiming:
    """How often the background thread syncs, beats and recovers; how big the retry queue may grow.

    A dead writer is recognised only after `stale_after_s` without a heartbeat, which must be many
    heartbeats long: a live writer taken for dead would have its open segment converted under it.
    """

    sync_interval_s: float = 1.0  # group fsync of the open segment, and retry of failed writes
    heartbeat_interval_s: float = 5.0
    stale_after_s: float = 30.0
    recover_interval_s: float = 5.0
    max_pending: int = 100_000  # records waiting for a failed disk; beyond it they are dropped, counted


class UsageCounters:
    """Counts usage-log failures. This one only tallies (tests, the CLI); RayUsageCounters exports them."""

    def __init__(self) -> None:
        self.tally: collections.Counter[str] = collections.Counter()

    def failed(self, stage: str, records: int = 1) -> None:
        """stage: append (a request's record), retry, rotate, recover or close."""
        self.tally[stage] += records

    def dropped(self, records: int = 1) -> None:
        self.tally["dropped"] += records


class RayUsageCounters(UsageCounters):
    """The tally, also exported as Ray metrics (Prometheus) from the replica."""

    def __init__(self) -> None:
        super().__init__()
        from ray.util import metrics

        self._failures = metrics.Counter(
            "servegraph_usage_write_failures",
            "Usage-log operations that failed (the records are kept and retried), by stage.",
            tag_keys=("stage",),
        )
        self._dropped = metrics.Counter(
            "servegraph_usage_records_dropped", "Usage records lost: the retry queue was full, or at shutdown."
        )

    def failed(self, stage: str, records: int = 1) -> None:
        super().failed(stage, records)
        self._failures.inc(records, {"stage": stage})

    def dropped(self, records: int = 1) -> None:
        super().dropped(records)
        self._dropped.inc(records)


def usage_counters() -> UsageCounters:
    """Ray metrics inside a Ray worker (the ingress replica); a plain tally anywhere else."""
    try:
        import ray

        if ray.is_initialized():
            return RayUsageCounters()
    except Exception:  # metrics are not worth failing the ingress for
        logger.exception("usage failure metrics unavailable; counting locally only")
    return UsageCounters()


def fsync_directory(directory: Path) -> None:
    """Makes a rename or a new entry in `directory` durable; some filesystems cannot, and say EINVAL."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def make_directory(directory: Path) -> None:
    """mkdir -p, and the new entry made durable in its parent."""
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        fsync_directory(directory.parent)


def write_part(path: Path, table: pa.Table) -> None:
    """Written whole under a unique name, fsynced, renamed into place, the rename fsynced.

    The unique temporary name keeps two replicas converting the same segment from writing into
    one file; the last rename wins, and both wrote the same records.
    """
    make_directory(path.parent)
    partial = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(partial, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_parts(directory: Path, stem: str, rows: list[dict]) -> None:
    """One part per UTC day the rows fall on: a segment spanning midnight becomes two."""
    for day, day_rows in sorted(by_day(rows).items()):
        write_part(part_path(directory, day, stem), records_table(day_rows))


def convert_segment(directory: Path, segment: Path) -> None:
    """segment -> durable Parquet parts, and only then is the segment removed."""
    write_parts(directory, segment.stem, read_segment(segment))
    os.unlink(segment)


def write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a disk filling up): the rest, or the error."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass
class Segment:
    """An open segment, and the lines fully written to it: the writer converts from these, so a
    failed fsync or a segment taken by another replica (see recover_orphans) loses nothing.
    (Encoded lines, not dicts: a few times less memory for a segment of rotate_bytes.)"""

    path: Path
    fd: int
    opened_at: float
    size: int = 0
    lines: list[bytes] = field(default_factory=list)
    synced: bool = True

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]


class UsageLog:
    """One writer's records: its open segment, the records waiting for a failed disk, and the
    background thread that syncs, retries, rotates segments into Parquet and recovers orphans."""

    def __init__(
        self,
        config: UsageConfig,
        writer: str,
        directory: Path | None = None,
        *,
        counters: UsageCounters | None = None,
        timing: UsageTiming = UsageTiming(),
    ) -> None:
        self.directory = directory or config.directory()
        self.counters = counters if counters is not None else usage_counters()
        self._segments = self.directory / SEGMENTS
        self._config = config
        self._timing = timing
        # The incarnation keeps a restarted writer with the same id from sharing names or a heartbeat.
        self._owner = f"{writer}-{uuid.uuid4().hex[:8]}"
        self._heartbeat = self.directory / WRITERS / self._owner
        self._sequence = 0
        self._lock = threading.Lock()  # the request path: open segment and pending queue
        self._maintenance = threading.Lock()  # the background work, and close()
        self._segment: Segment | None = None
        self._retired: list[Segment] = []  # rotated or abandoned, not yet converted
        self._pending: collections.deque[bytes] = collections.deque()  # encoded lines, in order
        self._last_warned: dict[str, float] = {}
        self._closed = False
        self._wake = threading.Event()
        self._rotator = threading.Thread(target=self._run, name="usage-rotation", daemon=True)
        self._rotator.start()

    @property
    def pending(self) -> int:
        """Records waiting to be written (the disk failed)."""
        with self._lock:
            return len(self._pending)

    def write(self, record: UsageRecord) -> None:
        """Appends, or queues the record for the background thread to retry; never raises."""
        line = (json.dumps(asdict(record)) + "\n").encode()
        with self._lock:
            if not self._pending:
                try:
                    self._append(line)
                    return
                except Exception as error:  # a request must never fail for its record
                    self._abandon_segment()
                    self._note_failure("append", error)
            self._enqueue(line)
        self._wake.set()

    def rotate(self) -> None:
        """The open segment becomes Parquet now; the next record starts a new segment."""
        with self._maintenance:
            self._retire_open_segment()
            self._convert_retired()

    def close(self) -> None:
        """Writes what waits, converts every segment and removes the heartbeat: a clean shutdown."""
        self._closed = True
        self._wake.set()
        self._rotator.join(timeout=30)
        with self._maintenance:
            # Each step on its own: a segment left unconverted is recovered once its mtime is stale.
            self._guard("retry", self._retry_pending)
            self._guard("rotate", self._retire_open_segment)
            self._guard("rotate", self._convert_retired)
            self._guard("close", lambda: self._heartbeat.unlink(missing_ok=True))
            with self._lock:
                lost = len(self._pending)
                self._pending.clear()
            if lost:
                logger.error("%d usage records could not be written before shutdown: lost", lost)
                self.counters.dropped(lost)

    # The request path, under self._lock.

    def _append(self, line: bytes) -> None:
        if self._segment is None:
            self._segment = self._open_segment()
        write_all(self._segment.fd, line)  # in the OS now: a killed process loses nothing
        self._segment.lines.append(line)
        self._segment.size += len(line)
        self._segment.synced = False
        if self._segment.size >= self._config.rotate_bytes:
            self._wake.set()  # converting is the background thread's work, off the request path

    def _open_segment(self) -> Segment:
        """A new file, never an existing one (O_EXCL): its records are exactly the ones kept in memory."""
        make_directory(self._segments)
        while True:
            self._sequence += 1
            path = self._segments / f"{self._owner}-{self._sequence:06d}.jsonl"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            except FileExistsError:
                continue
            return Segment(path, fd, time.monotonic(), synced=False)

    def _abandon_segment(self) -> None:
        """After a failed append the segment may end in a torn line: no record may follow it."""
        if self._segment is not None:
            self._retired.append(self._segment)
            self._segment = None

    def _enqueue(self, line: bytes) -> None:
        if len(self._pending) >= self._timing.max_pending:
            logger.error("usage retry queue full (%d records): dropping a record", len(self._pending))
            self.counters.dropped()
            return
        self._pending.append(line)

    def _note_failure(self, stage: str, error: BaseException) -> None:
        """Counted every time; logged at most every WARN_EVERY_S per stage, not once a second."""
        self.counters.failed(stage)
        now = time.monotonic()
        if now - self._last_warned.get(stage, float("-inf")) >= WARN_EVERY_S:
            self._last_warned[stage] = now
            logger.warning("usage log: %s failed (%s); the records are kept and retried", stage, error)

    # The background thread, under self._maintenance.

    def _run(self) -> None:
        """Every sync interval, or when woken (a full segment, a failed write): the maintenance."""
        last_beat = last_recovery = float("-inf")
        while not self._closed:
            with self._maintenance:
                if self._closed:
                    break
                now = time.monotonic()
                self._guard("retry", self._retry_pending)
                self._guard("rotate", self._sync_open_segment)
                if self._due():
                    self._guard("rotate", self._retire_open_segment)
                self._guard("rotate", self._convert_retired)
                if now - last_beat >= self._timing.heartbeat_interval_s:
                    last_beat = now
                    self._guard("recover", self._beat)
                if now - last_recovery >= self._timing.recover_interval_s:
                    last_recovery = now
                    self._guard("recover", self._recover)
            self._wake.wait(self._timing.sync_interval_s)
            self._wake.clear()

    def _guard(self, stage: str, work) -> None:
        """The background thread outlives every failure: logged and counted, tried again next time."""
        try:
            work()
        except Exception as error:
            self._note_failure(stage, error)

    def _retry_pending(self) -> None:
        """Writes waiting records in order, until one fails again.

        The lock is taken per record, not for the whole queue: a request's write waits for one
        append at most, however slow the disk that is coming back.
        """
        written = 0
        while True:
            with self._lock:
                if not self._pending:
                    break
                try:
                    self._append(self._pending[0])
                except Exception as error:
                    self._abandon_segment()
                    raise OSError(f"{len(self._pending)} usage records wait ({written} written): {error}") from error
                self._pending.popleft()
            written += 1
        if written:
            logger.info("usage log: writing again; %d waiting records written", written)

    def _sync_open_segment(self) -> None:
        """Group commit: one fsync a second covers every record appended since the last."""
        with self._lock:
            segment = self._segment
            if segment is None or segment.synced:
                return
            segment.synced = True  # appends from now on wait for the next sync
        os.fsync(segment.fd)  # only this thread closes segments: fd stays valid

    def _due(self) -> bool:
        with self._lock:
            segment = self._segment
            if segment is None:
                return False
            too_old = time.monotonic() - segment.opened_at >= self._config.rotate_interval_s
            return too_old or segment.size >= self._config.rotate_bytes

    def _retire_open_segment(self) -> None:
        with self._lock:
            self._abandon_segment()

    def _convert_retired(self) -> None:
        """Each retired segment -> Parquet parts from the records kept in memory, then removed."""
        with self._lock:
            retired = list(self._retired)
        for segment in retired:
            if not segment.synced:  # once: a conversion failing every second need not fsync again
                segment.synced = True
                try:
                    os.fsync(segment.fd)
                except OSError as error:  # the parts are written from memory, not from the file
                    logger.warning("usage log: fsync of %s failed (%s)", segment.path.name, error)
            write_parts(self.directory, segment.path.stem, segment.rows())
            segment.path.unlink(missing_ok=True)  # os.unlink: gone only once its parts are durable
            os.close(segment.fd)
            with self._lock:
                self._retired.remove(segment)

    def _beat(self) -> float:
        """Refreshes the heartbeat; its mtime, set by the file server, is 'now' on the server's clock."""
        make_directory(self._heartbeat.parent)
        self._heartbeat.touch()
        return self._heartbeat.stat().st_mtime

    def _recover(self) -> None:
        now = self._beat()
        own = {segment.path.name for segment in self._owned()}
        recover_orphans(self.directory, now=now, stale_after_s=self._timing.stale_after_s, skip=own)
        migrate_flat_parts(self.directory)

    def _owned(self) -> list[Segment]:
        with self._lock:
            return [*self._retired, *([self._segment] if self._segment else [])]


def owner_of(segment: Path) -> str:
    """`<writer>-<incarnation>-<seq>.jsonl` -> `<writer>-<incarnation>` (writer ids may contain '-')."""
    return segment.stem.rsplit("-", 1)[0]


def last_sign_of_life(path: Path) -> float:
    """mtime, read through open(): on NFS that revalidates the cached attributes (close-to-open)."""
    with open(path, "rb") as handle:
        return os.fstat(handle.fileno()).st_mtime


def is_alive(directory: Path, segment: Path, now: float, stale_after_s: float) -> bool:
    """Its writer beat, or wrote to it, within stale_after_s. FileNotFoundError: converted meanwhile."""
    last = last_sign_of_life(segment)
    try:
        last = max(last, last_sign_of_life(directory / WRITERS / owner_of(segment)))
    except FileNotFoundError:  # never beat, or shut down: the segment's own mtime decides
        pass
    return now - last < stale_after_s


def recover_orphans(
    directory: Path,
    *,
    now: float | None = None,
    stale_after_s: float = UsageTiming.stale_after_s,
    skip: frozenset[str] | set[str] = frozenset(),
) -> int:
    """Converts segments whose writer is dead (no sign of life for stale_after_s); how many it converted.

    Takes no lock: any number of replicas may race here, and all write the same part names.
    A failure is logged and left for the next pass; it never propagates.
    """
    now = time.time() if now is None else now
    converted = 0
    for segment in sorted((directory / SEGMENTS).glob("*.jsonl")):
        if segment.name in skip:
            continue
        try:
            if is_alive(directory, segment, now, stale_after_s):
                continue
            logger.warning("usage log: converting %s, whose writer is gone", segment.name)
            convert_segment(directory, segment)
            converted += 1
        except FileNotFoundError:  # another replica converted it first
            continue
        except OSError:
            logger.exception("usage log: could not recover %s; trying again later", segment.name)
    forget_dead_writers(directory, now, stale_after_s)
    return converted


def forget_dead_writers(directory: Path, now: float, stale_after_s: float) -> None:
    """Removes stale heartbeats whose writer left no segment, so the directory does not grow forever."""
    live_owners = {owner_of(segment) for segment in (directory / SEGMENTS).glob("*.jsonl")}
    for heartbeat in (directory / WRITERS).glob("*"):
        try:
            if heartbeat.name not in live_owners and now - last_sign_of_life(heartbeat) >= 2 * stale_after_s:
                heartbeat.unlink(missing_ok=True)
        except OSError:
            continue


def migrate_flat_parts(directory: Path) -> int:
    """Moves flat-layout files into day partitions (same part names: safe to race or repeat)."""
    migrated = 0
    for flat in flat_parts(directory):
        try:
            rows = pq.read_table(flat, schema=USAGE_SCHEMA).to_pylist()
            for row in rows:
                row["time"] = row["time"].timestamp()
            write_parts(directory, flat.stem.removeprefix(PART_PREFIX), rows)
            os.unlink(flat)
            migrated += 1
        except FileNotFoundError:
            continue
        except OSError:
            logger.exception("usage log: could not migrate %s; trying again later", flat.name)
    return migrated
