"""The usage log's durability without Ray: fsync order, lock-free recovery of dead writers' segments,
write failures that never fail a request, and day partitions that a query reads only as needed."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from dataclasses import asdict
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow.parquet as pq

from servegraph.deployments import usage_log
from servegraph.deployments.telemetry import RequestRecord
from servegraph.deployments.usage import SEGMENTS, UsageRecord, read_usage, records_table
from servegraph.deployments.usage_log import (
    WRITERS,
    UsageCounters,
    UsageLog,
    UsageTiming,
    migrate_flat_parts,
    recover_orphans,
    write_parts,
)
from servegraph.models.config import UsageConfig

DAY1, DAY2 = date(2026, 11, 20), date(2026, 11, 21)
BEFORE_MIDNIGHT = datetime(2026, 11, 20, 23, 59, tzinfo=UTC).timestamp()
AFTER_MIDNIGHT = datetime(2026, 11, 21, 0, 1, tzinfo=UTC).timestamp()
QUIET = UsageTiming(sync_interval_s=3600, heartbeat_interval_s=3600, recover_interval_s=3600)  # one pass at start


def usage_record(request_id: str, when: float | None = None) -> UsageRecord:
    request = RequestRecord(request_id, "llm", "tiny", "v1", 200, False, 0.5, "a", "tiny@v1", 7, 3)
    return UsageRecord.of(request, now=when)


def request_ids(directory: Path, **days: date) -> list[str]:
    return read_usage(directory, **days)["request_id"].to_pylist()


def segments(directory: Path) -> list[Path]:
    return sorted((directory / SEGMENTS).glob("*.jsonl"))


def parts(directory: Path) -> list[Path]:
    return sorted(directory.glob("day=*/usage-*.parquet"))


def poll_until(check, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def open_log(directory: Path, timing: UsageTiming = QUIET, **config) -> tuple[UsageLog, UsageCounters]:
    counters = UsageCounters()
    return UsageLog(UsageConfig(**config), "w", directory, counters=counters, timing=timing), counters


def orphan(directory: Path, owner: str, rows: list[UsageRecord], age_s: float) -> Path:
    """A segment and heartbeat as a writer killed age_s ago leaves them."""
    (directory / SEGMENTS).mkdir(parents=True, exist_ok=True)
    (directory / WRITERS).mkdir(parents=True, exist_ok=True)
    segment = directory / SEGMENTS / f"{owner}-000001.jsonl"
    segment.write_text("".join(json.dumps(asdict(row)) + "\n" for row in rows))
    heartbeat = directory / WRITERS / owner
    heartbeat.touch()
    then = time.time() - age_s
    for path in (segment, heartbeat):
        os.utime(path, (then, then))
    return segment


# 1. fsync before a segment counts as written


def traced_io(monkeypatch) -> list[tuple[str, str]]:
    """Every fsync (by the path its fd names) and unlink, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_unlink = os.fsync, os.unlink

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def unlink(path, *args, **kwargs) -> None:
        events.append(("unlink", str(path)))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "unlink", unlink)
    return events


def test_part_file_and_directory_are_fsynced_before_the_segment_is_removed(tmp_path, monkeypatch):
    log, _ = open_log(tmp_path)
    poll_until(lambda: list((tmp_path / WRITERS).glob("*")), "the start-up pass, which syncs no segment yet")
    log.write(usage_record("r1", BEFORE_MIDNIGHT))
    (segment,) = segments(tmp_path)
    events = traced_io(monkeypatch)
    log.rotate()
    day_directory = str(tmp_path / "day=2026-11-20")
    part_synced = next(i for i, (op, path) in enumerate(events) if op == "fsync" and f".usage-{segment.stem}" in path)
    directory_synced = events.index(("fsync", day_directory))
    removed = events.index(("unlink", str(segment)))
    assert events[part_synced][1].startswith(day_directory + "/")
    assert part_synced < directory_synced < removed, events
    assert ("fsync", str(segment)) in events[:removed], "the segment itself is synced before it is converted"
    log.close()


def test_recovered_orphans_are_fsynced_before_removal(tmp_path, monkeypatch):
    segment = orphan(tmp_path, "dead-00000000", [usage_record("d1", AFTER_MIDNIGHT)], age_s=3600)
    events = traced_io(monkeypatch)
    assert recover_orphans(tmp_path) == 1
    removed = events.index(("unlink", str(segment)))
    assert ("fsync", str(tmp_path / "day=2026-11-21")) in events[:removed]
    assert any(op == "fsync" and ".usage-dead" in path for op, path in events[:removed])


def test_appends_are_fsynced_by_the_background_thread(tmp_path, monkeypatch):
    events = traced_io(monkeypatch)
    log, _ = open_log(tmp_path, UsageTiming(sync_interval_s=0.02))
    log.write(usage_record("r1"))
    (segment,) = segments(tmp_path)
    poll_until(lambda: ("fsync", str(segment)) in events, "a group fsync of the open segment")
    log.close()


# 2. no lock across writers: heartbeats decide which segments are orphans


def test_a_dead_writers_segment_is_recovered_once_its_heartbeat_is_stale(tmp_path):
    segment = orphan(tmp_path, "dead-00000000", [usage_record("d1"), usage_record("d2")], age_s=0)
    last_beat = segment.stat().st_mtime
    assert recover_orphans(tmp_path, now=last_beat + 10, stale_after_s=30) == 0, "fresh: its writer may be alive"
    assert segments(tmp_path) == [segment]
    assert recover_orphans(tmp_path, now=last_beat + 31, stale_after_s=30) == 1
    assert not segments(tmp_path) and len(parts(tmp_path)) == 1
    assert sorted(request_ids(tmp_path)) == ["d1", "d2"]


def test_a_live_writers_segment_is_not_taken_however_old(tmp_path):
    log, _ = open_log(tmp_path, UsageTiming(heartbeat_interval_s=0.02))
    log.write(usage_record("l1"))
    (segment,) = segments(tmp_path)
    long_ago = time.time() - 3600
    os.utime(segment, (long_ago, long_ago))  # idle for an hour, but its writer beats
    poll_until(lambda: list((tmp_path / WRITERS).glob("w-*")), "the writer's first heartbeat")
    assert recover_orphans(tmp_path) == 0 and segments(tmp_path) == [segment]
    log.write(usage_record("l2"))
    log.close()
    assert request_ids(tmp_path) == ["l1", "l2"]


def test_a_segment_of_the_flock_layout_is_recovered_by_its_mtime(tmp_path):
    """Segments from before heartbeats (`<replica>-<seq>.jsonl`) have none: their mtime decides."""
    (tmp_path / SEGMENTS).mkdir()
    segment = tmp_path / SEGMENTS / "oldreplica-000003.jsonl"
    segment.write_text(json.dumps(asdict(usage_record("o1"))) + "\n")
    assert recover_orphans(tmp_path, now=segment.stat().st_mtime + 1) == 0
    assert recover_orphans(tmp_path, now=segment.stat().st_mtime + 3600) == 1
    assert request_ids(tmp_path) == ["o1"]


def test_the_live_writer_recovers_orphans_without_any_lock(tmp_path, monkeypatch):
    def no_flock(*args) -> None:
        raise OSError(errno.EBADF, "flock on NFS")

    monkeypatch.setattr(usage_log, "fcntl", type("fcntl", (), {"flock": no_flock}), raising=False)
    orphan(tmp_path, "dead-00000000", [usage_record("d1")], age_s=3600)
    log, counters = open_log(tmp_path, UsageTiming(recover_interval_s=0.02, sync_interval_s=0.02))
    poll_until(lambda: not segments(tmp_path), "the live writer to convert the orphan")
    log.close()
    assert request_ids(tmp_path) == ["d1"] and not counters.tally


def test_two_recoverers_racing_count_each_record_once(tmp_path, monkeypatch):
    for writer in range(3):
        rows = [usage_record(f"w{writer}-{i}", BEFORE_MIDNIGHT + 60 * i) for i in range(3)]  # spans midnight
        orphan(tmp_path, f"dead{writer}-00000000", rows, age_s=3600)
    both_read = threading.Barrier(2, timeout=10)
    real_read = usage_log.read_segment

    def read_together(path: Path) -> list[dict]:
        rows = real_read(path)
        both_read.wait()  # each recoverer has read every segment before either removes it
        return rows

    monkeypatch.setattr(usage_log, "read_segment", read_together)
    converted: list[int] = []
    racers = [threading.Thread(target=lambda: converted.append(recover_orphans(tmp_path))) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(30)
    assert sum(converted) >= 3 and not segments(tmp_path)
    assert len(parts(tmp_path)) == 6, "one part per segment and day, whoever wrote it"
    assert not list(tmp_path.rglob("*.tmp")), "no temporary file left behind"
    monkeypatch.undo()
    ids = request_ids(tmp_path)
    assert sorted(ids) == sorted(f"w{w}-{i}" for w in range(3) for i in range(3))


def test_a_half_converted_segment_is_read_once_and_finished_by_recovery(tmp_path):
    rows = [usage_record("before", BEFORE_MIDNIGHT), usage_record("after", AFTER_MIDNIGHT)]
    segment = orphan(tmp_path, "dead-00000000", rows, age_s=3600)
    write_parts(tmp_path, segment.stem, [asdict(rows[0])])  # its converter died after the first day
    assert sorted(request_ids(tmp_path)) == ["after", "before"]
    assert recover_orphans(tmp_path) == 1
    assert sorted(request_ids(tmp_path)) == ["after", "before"]


def test_startup_never_fails_on_an_unusable_directory(tmp_path):
    blocker = tmp_path / "usage"
    blocker.write_text("a file where the directory should be")
    log, counters = open_log(blocker, UsageTiming(sync_interval_s=0.02, recover_interval_s=0.02))
    log.write(usage_record("r1"))
    poll_until(lambda: counters.tally["recover"] >= 1, "the failed recovery to be counted")
    assert counters.tally["append"] == 1 and log.pending == 1
    blocker.unlink()
    poll_until(lambda: log.pending == 0, "the record to be written once the directory can be made")
    log.close()
    assert request_ids(blocker) == ["r1"]


# 3. a failed write never fails the request: queued, counted, retried in order


class Fault:
    """write_all that, while on, writes half the line (a torn tail) and then fails as a full disk."""

    def __init__(self) -> None:
        self.on = False
        self.real = usage_log.write_all

    def __call__(self, fd: int, data: bytes) -> None:
        if self.on:
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        self.real(fd, data)


def test_a_failed_write_is_counted_and_retried_in_order(tmp_path, monkeypatch):
    fault = Fault()
    monkeypatch.setattr(usage_log, "write_all", fault)
    log, counters = open_log(tmp_path, UsageTiming(sync_interval_s=0.02))
    log.write(usage_record("r0"))
    fault.on = True
    for i in range(1, 4):
        log.write(usage_record(f"r{i}"))  # never raises
    assert counters.tally["append"] == 1, "the first failure is counted; the rest queue behind it"
    assert log.pending == 3
    poll_until(lambda: counters.tally["retry"] >= 2, "the background thread to keep retrying")
    assert request_ids(tmp_path) == ["r0"], "the torn line is not a record"
    fault.on = False
    poll_until(lambda: log.pending == 0, "the waiting records to be written")
    log.write(usage_record("r4"))
    assert request_ids(tmp_path) == ["r0", "r1", "r2", "r3", "r4"]
    log.close()
    assert request_ids(tmp_path) == ["r0", "r1", "r2", "r3", "r4"], "each once, in order, after conversion"


def test_the_retry_queue_is_bounded_and_drops_are_counted(tmp_path, monkeypatch):
    fault = Fault()
    fault.on = True
    monkeypatch.setattr(usage_log, "write_all", fault)
    log, counters = open_log(tmp_path, UsageTiming(sync_interval_s=3600, max_pending=2))
    for i in range(4):
        log.write(usage_record(f"r{i}"))
    assert log.pending == 2 and counters.tally["dropped"] == 2
    fault.on = False
    log.close()
    assert request_ids(tmp_path) == ["r0", "r1"]


def test_records_survive_their_directory_being_removed(tmp_path):
    directory = tmp_path / "usage"
    log, _ = open_log(directory)
    log.write(usage_record("r1"))
    for path in sorted(directory.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    log.write(usage_record("r2"))  # into the open (now unlinked) segment: kept in memory too
    log.close()
    assert request_ids(directory) == ["r1", "r2"]


# 4. day partitions: a query reads only its days


def test_a_segment_spanning_midnight_becomes_one_part_per_day(tmp_path):
    log, _ = open_log(tmp_path)
    log.write(usage_record("late", BEFORE_MIDNIGHT))
    log.write(usage_record("early", AFTER_MIDNIGHT))
    (segment,) = segments(tmp_path)
    log.close()
    assert [p.relative_to(tmp_path).as_posix() for p in parts(tmp_path)] == [
        f"day=2026-11-20/usage-{segment.stem}.parquet",
        f"day=2026-11-21/usage-{segment.stem}.parquet",
    ]
    assert [pq.read_table(p)["request_id"].to_pylist() for p in parts(tmp_path)] == [["late"], ["early"]]


def test_read_usage_reads_only_the_days_asked_for(tmp_path, monkeypatch):
    log, _ = open_log(tmp_path)
    log.write(usage_record("d1", BEFORE_MIDNIGHT))
    log.write(usage_record("d2", AFTER_MIDNIGHT))
    log.close()
    read: list[str] = []
    real_read = pq.read_table

    def spy(source, *args, **kwargs):
        read.append(Path(source).parent.name)
        return real_read(source, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", spy)
    assert request_ids(tmp_path, since=DAY2) == ["d2"] and read == ["day=2026-11-21"]
    read.clear()
    assert request_ids(tmp_path, until=DAY1) == ["d1"] and read == ["day=2026-11-20"]
    read.clear()
    assert request_ids(tmp_path, since=DAY1, until=DAY2) == ["d1", "d2"] and len(read) == 2
    assert request_ids(tmp_path) == ["d1", "d2"], "no range: every day"


def test_pending_segments_are_filtered_by_day_too(tmp_path):
    log, _ = open_log(tmp_path)
    log.write(usage_record("d1", BEFORE_MIDNIGHT))
    log.write(usage_record("d2", AFTER_MIDNIGHT))
    assert segments(tmp_path) and not parts(tmp_path)
    assert request_ids(tmp_path, since=DAY2) == ["d2"]
    assert request_ids(tmp_path, until=DAY1) == ["d1"]
    log.close()


def test_flat_layout_files_are_read_and_migrated_into_days(tmp_path):
    rows = [asdict(usage_record("old1", BEFORE_MIDNIGHT)), asdict(usage_record("old2", AFTER_MIDNIGHT))]
    pq.write_table(records_table(rows), tmp_path / "usage-oldreplica-000001.parquet")
    assert request_ids(tmp_path) == ["old1", "old2"], "an upgrade loses nothing"
    assert request_ids(tmp_path, since=DAY2) == ["old2"]
    write_parts(tmp_path, "oldreplica-000001", rows[:1])  # a migration that died half-way
    assert sorted(request_ids(tmp_path)) == ["old1", "old2"], "each once while half-migrated"
    assert migrate_flat_parts(tmp_path) == 1
    assert not list(tmp_path.glob("usage-*.parquet")) and len(parts(tmp_path)) == 2
    assert sorted(request_ids(tmp_path)) == ["old1", "old2"]
    assert request_ids(tmp_path, until=DAY1) == ["old1"]


def test_the_live_writer_migrates_flat_files(tmp_path):
    pq.write_table(records_table([asdict(usage_record("old"))]), tmp_path / "usage-x-000001.parquet")
    log, _ = open_log(tmp_path)
    poll_until(lambda: not list(tmp_path.glob("usage-*.parquet")), "the start-up pass to migrate")
    log.close()
    assert request_ids(tmp_path) == ["old"]
