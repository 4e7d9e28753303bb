"""A Parquet dataset directory as the output of many runs: parts, partitions, lock, summaries.

Layout (Hive-style, so pandas, pyarrow.dataset, DuckDB and polars read DIR as one table)::

    DIR/
      run_date=2026-11-21/part-<run_id>-<attempt>-00000.parquet   committed parts
      run_date=2026-11-21/.part-<run_id>-<attempt>-00001.parquet.<rand>.tmp   being written
      _runs/<run_id>.<attempt>.json                                  one summary per attempt
      _batchscore.lock                                     held (flock) while a run writes

A run id names a run and may be given again (a resumed run, a script's fixed name); the
attempt, drawn afresh each time a run starts, makes every part name and summary name unique,
so a rerun never overwrites what an earlier attempt committed.

Parts are committed as they fill (every `part_rows` rows or `part_seconds` seconds): written
under a hidden temporary name, fsynced, renamed. A run killed at any moment therefore leaves
only complete parts; readers skip names starting with '.' or '_'. Temporaries of dead runs are
removed by the next run, under the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchscore.errors import LockHeld, OutputError, WriteFailed
from batchscore.files import atomic_write_text, output_errors, write_errors
from batchscore.output import AtomicParquetFile
from batchscore.settings import DEFAULT_PART_ROWS, DEFAULT_PART_SECONDS

LOCK_NAME = "_batchscore.lock"
RUNS_DIR = "_runs"
PARTITION = "run_date"


def new_attempt() -> str:
    """A token unique to one start of one run: what keeps its parts' names apart from those of
    any other start, with the same run id or not."""
    return uuid.uuid4().hex[:8]


def is_dataset_path(path: str | Path) -> bool:
    """A directory (existing, or named with a trailing slash or without a suffix)."""
    text = str(path)
    candidate = Path(text)
    if candidate.is_dir() or text.endswith(("/", os.sep)):
        return True
    return not candidate.exists() and candidate.suffix == ""


@contextmanager
def output_lock(root: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold DIR's lock for the run. The kernel drops a flock when its process dies, so a lock
    left by a killed run never blocks the next one. The file holds the holder's pid, written
    unbuffered so that a full disk fails here, once, and not again at close."""
    with output_errors(root):
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeld(
                f"another batchscore run (pid {holder}) is writing to {root};"
                " it was left alone (use --wait-lock to wait for it)"
            ) from None
        with write_errors(root / LOCK_NAME):
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            with suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # also releases the lock


def remove_stale_temporaries(root: Path) -> int:
    """Delete temporaries of runs that died; call only while holding the lock."""
    removed = 0
    stale = [*root.glob(f"{PARTITION}=*/.part-*.tmp"), *root.glob(f"{RUNS_DIR}/.*.tmp")]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def part_files(root: Path) -> list[Path]:
    """The files that make up a dataset, by the rule readers use (pyarrow, pandas, DuckDB):
    every `.parquet` below `root` whose name and folders do not start with '.' or '_'
    (temporaries, `_runs/`)."""
    found = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith((".", "_")))
        found += [
            Path(folder) / name
            for name in sorted(names)
            if name.endswith(".parquet") and not name.startswith((".", "_"))
        ]
    return found


class DatasetWriter:
    """A run written into a dataset directory: parts committed as they fill (a `Sink`)."""

    def __init__(
        self,
        root: Path,
        schema: pa.Schema,
        metadata: Mapping[str, Any],
        *,
        run_id: str,
        part_rows: int = DEFAULT_PART_ROWS,
        part_seconds: float = DEFAULT_PART_SECONDS,
    ) -> None:
        self.root = root
        self.schema = schema
        self.metadata = dict(metadata)
        self.run_id = run_id
        self.attempt = new_attempt()
        self.committed_rows = 0
        self.part_rows = part_rows
        self.part_seconds = part_seconds
        self.partition = root / f"{PARTITION}={datetime.now(timezone.utc):%Y-%m-%d}"
        self.parts: list[str] = []
        self._current: AtomicParquetFile | None = None
        self._opened_at = 0.0
        with output_errors(root):
            self.partition.mkdir(parents=True, exist_ok=True)

    def begin(self, record: Mapping[str, Any]) -> None:
        """Record the attempt as `running` before any part: if it is killed, the next run
        finds this summary and counts what the attempt committed (`bucket.settle_dead_attempts`)."""
        self._write_summary(record)

    def write(self, batch: pa.RecordBatch) -> None:
        if self._current is None:
            path = self.part_path(len(self.parts))
            with write_errors(path):
                self._current = AtomicParquetFile(path, self.schema, self.metadata)
            self._opened_at = time.monotonic()
        self._current.write(batch)
        full = self._current.rows >= self.part_rows
        if full or time.monotonic() - self._opened_at >= self.part_seconds:
            self._commit_part()

    def _commit_part(self) -> None:
        if self._current is not None:
            self._current.commit({"part_rows": self._current.rows})
            self.parts.append(str(self._current.path.relative_to(self.root)))
            self.committed_rows += self._current.rows
            self._current = None

    def finish(self, record: Mapping[str, Any]) -> None:
        """Commit the last part, then the run's summary (its totals are not in the parts)."""
        self._commit_part()
        self._write_summary(record)

    def stop(self, record: Mapping[str, Any]) -> str:
        """Commit what was written: the next run resumes after it."""
        self._commit_part()
        self._write_summary(record)
        return f"{record['n_images']} images scored and committed"

    def abort(self, record: Mapping[str, Any]) -> None:
        """Drop the part being written; parts committed earlier stay valid and are kept."""
        if self._current is not None:
            self._current.abort()
            self._current = None
        with suppress(WriteFailed):  # best effort: the disk may be what failed
            self._write_summary(record)

    def summary(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """What `_runs/` keeps of this attempt: its provenance, its record, and what it
        committed (`n_committed`, which a run that failed mid-way has fewer of than scored)."""
        summary = {
            **self.metadata,
            **record,
            "attempt": self.attempt,
            "parts": self.parts,
            "n_committed": self.committed_rows,
        }
        summary.pop("class_map", None)  # in every part already; keeps summaries small
        return summary

    def _write_summary(self, record: Mapping[str, Any]) -> None:
        write_summary(self.root, self.summary(record))

    def part_path(self, index: int) -> Path:
        """Where part `index` of this attempt goes. The name depends only on (run_id, attempt,
        index), so an engine that retries a partition replaces its part instead of adding rows
        twice, and no other attempt, even with the same run id, can replace it."""
        return self.partition / f"part-{self.run_id}-{self.attempt}-{index:05d}.parquet"

    def part_location(self, index: int) -> str:
        """Where another process (a Dask worker) writes part `index`: an absolute path."""
        return os.path.abspath(self.part_path(index))

    def fence(self) -> None:
        """Raise WriteFailed when this run may no longer commit. A local dataset's flock holds
        until the process dies, so nothing to check here; a bucket's lease may run out."""

    def add_part(self, index: int, rows: int) -> None:
        """Record part `index` of `rows` rows, committed by another process (a Dask worker)."""
        self.parts.append(self.part_path(index).relative_to(self.root).as_posix())
        self.committed_rows += rows


def attempt_prefix(summary: Mapping[str, Any]) -> str:
    """How the names of an attempt's parts start."""
    return f"part-{summary['run_id']}-{summary['attempt']}-"


def summary_name(summary: Mapping[str, Any]) -> str:
    """`<run_id>.<attempt>.json`: one file per attempt, so a reused run id keeps its history."""
    return f"{summary['run_id']}.{summary['attempt']}.json"


def write_summary(root: Path, summary: Mapping[str, Any]) -> Path:
    """The attempt's summary JSON, written atomically beside the parts."""
    folder = root / RUNS_DIR
    path = folder / summary_name(summary)
    with write_errors(path):
        folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=True, default=str))
    return path


def read_summaries(root: Path) -> list[dict[str, Any]]:
    """All run summaries of a dataset, oldest first."""
    folder = root / RUNS_DIR
    if not root.is_dir():
        raise OutputError(f"no batchscore dataset at {root}")
    summaries = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            summaries.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            summaries.append({"run_id": path.stem, "status": "unreadable summary"})
    # Run ids sort by second only; two runs in the same second are ordered by start time.
    return sorted(summaries, key=lambda s: (str(s.get("started_at", "")), str(s["run_id"])))
