"""A Parquet dataset as the output of many runs: parts, partitions, lock, summaries, in a
local folder or a bucket prefix alike (store.py keeps each store's promises).

Layout (Hive-style, so pandas, pyarrow.dataset, DuckDB and polars read it as one table)::

    DIR/
      run_date=2026-11-21/part-<run_id>-<attempt>-00000.parquet   committed parts
      _runs/<run_id>.<attempt>.json                                one summary per attempt
      _batchscore.lock                                             held while a run writes

A run id names a run and may be given again (a resumed run, a script's fixed name); the
attempt, drawn afresh each time a run starts, makes every part name and summary name unique,
so a rerun never overwrites what an earlier attempt committed.

Parts are committed as they fill (every `part_rows` rows or `part_seconds` seconds), each whole
or not at all, and only while the run's lock is provably its own. An attempt writes a
`running` summary before its first part; a run killed at any moment therefore leaves complete
parts and a summary that the next run, under the lock, settles as `killed` with what those
parts hold. Readers skip names starting with '.' or '_'; what dead runs left staged is removed
by the next run, under the lock.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from collections.abc import Mapping
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchscore.errors import BatchscoreError, OutputError, WriteFailed
from batchscore.files import write_errors
from batchscore.output import ParquetPart
from batchscore.settings import DEFAULT_PART_ROWS, DEFAULT_PART_SECONDS
from batchscore.storage import StorageOptions, failure
from batchscore.store import Fence, Parts, Store, open_store
from batchscore.summary import RunStats, stats_columns

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


def is_part(name: str) -> bool:
    """The rule readers use (pyarrow, pandas, DuckDB): a .parquet file with no name or folder
    starting with '.' or '_' (staged files, `_runs/`)."""
    folders = name.split("/")
    return folders[-1].endswith(".parquet") and not any(f.startswith((".", "_")) for f in folders)


def is_temporary(name: str) -> bool:
    """A file staged in place (`.NAME.<pid>-<rand>.tmp`) or a Dask run's token."""
    base = posixpath.basename(name)
    return base.startswith(".") and base.endswith(".tmp")


class DatasetWriter:
    """A run written into a dataset: parts committed as they fill (a `Sink`)."""

    def __init__(
        self,
        store: Store,
        schema: pa.Schema,
        metadata: Mapping[str, Any],
        *,
        run_id: str,
        fence: Fence | None = None,
        part_rows: int = DEFAULT_PART_ROWS,
        part_seconds: float = DEFAULT_PART_SECONDS,
    ) -> None:
        self.store = store
        self.schema = schema
        self.metadata = dict(metadata)
        self.run_id = run_id
        self.attempt = new_attempt()
        self.committed_rows = 0
        self.part_rows = part_rows
        self.part_seconds = part_seconds
        self.partition = f"{PARTITION}={datetime.now(timezone.utc):%Y-%m-%d}"
        self.parts: list[str] = []
        self._fence = fence
        self._current: ParquetPart | None = None
        self._opened_at = 0.0

    def begin(self, record: Mapping[str, Any]) -> None:
        """Record the attempt as `running` before any part: if it is killed, the next run
        finds this summary and counts what the attempt committed (`settle_dead_attempts`)."""
        self._write_summary(record)

    def write(self, batch: pa.RecordBatch) -> None:
        if self._current is None:
            name = self.part_name(len(self.parts))
            shown = self.store.shown(name)
            with write_errors(shown):
                self._current = ParquetPart(
                    self.store.stage(name), self.schema, self.metadata, shown=shown
                )
            self._opened_at = time.monotonic()
        self._current.write(batch)
        full = self._current.rows >= self.part_rows
        if full or time.monotonic() - self._opened_at >= self.part_seconds:
            self._commit_part()

    def _commit_part(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            name = self.part_name(len(self.parts))
            current.commit(self.store, name, {"part_rows": current.rows}, fence=self.fence)
            self.parts.append(name)
            self.committed_rows += current.rows

    def finish(self, record: Mapping[str, Any]) -> None:
        """Commit the last part, then the run's summary (its totals are not in the parts)."""
        try:
            self._commit_part()
            self._write_summary(record)
        finally:
            self.store.close()

    def stop(self, record: Mapping[str, Any]) -> str:
        """Commit what was written: the next run resumes after it."""
        self.finish(record)
        return f"{record['n_images']} images scored and committed"

    def abort(self, record: Mapping[str, Any]) -> None:
        """Drop the part being written; parts committed earlier stay valid and are kept."""
        try:
            if self._current is not None:
                self._current.abort()
                self._current = None
            with suppress(WriteFailed, OutputError):  # the disk or store may be what failed
                self._write_summary(record)
        finally:
            self.store.close()

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
        write_summary(self.store, self.summary(record))

    def part_name(self, index: int) -> str:
        """Where part `index` of this attempt goes. The name depends only on (run_id, attempt,
        index), so an engine that retries a partition replaces its part instead of adding rows
        twice, and no other attempt, even with the same run id, can replace it."""
        return f"{self.partition}/part-{self.run_id}-{self.attempt}-{index:05d}.parquet"

    def fence(self) -> None:
        """Raise WriteFailed when this run may no longer commit (its lock's `check`)."""
        if self._fence is not None:
            self._fence()

    def add_part(self, index: int, rows: int) -> None:
        """Record part `index` of `rows` rows, committed by another process (a Dask worker)."""
        self.parts.append(self.part_name(index))
        self.committed_rows += rows


def attempt_prefix(summary: Mapping[str, Any]) -> str:
    """How the names of an attempt's parts start."""
    return f"part-{summary['run_id']}-{summary['attempt']}-"


def summary_name(summary: Mapping[str, Any]) -> str:
    """`_runs/<run_id>.<attempt>.json`: one per attempt, so a reused run id keeps its history."""
    return f"{RUNS_DIR}/{summary['run_id']}.{summary['attempt']}.json"


def write_summary(store: Store, summary: Mapping[str, Any]) -> None:
    """The attempt's summary JSON, written whole beside the parts."""
    text = json.dumps(summary, indent=2, sort_keys=True, default=str)
    store.put(summary_name(summary), text.encode())


def read_summaries(store: Store) -> list[dict[str, Any]]:
    """All run summaries of a dataset, oldest first."""
    names = [n for n in store.names(RUNS_DIR) if n.endswith(".json") and not is_temporary(n)]
    if not names and not store.names():
        raise OutputError(f"no batchscore dataset at {store.shown()}")
    summaries = []
    for name in names:
        try:
            summaries.append(json.loads(store.get(name)))
        except (OSError, ValueError):
            stem = posixpath.basename(name).removesuffix(".json")
            summaries.append({"run_id": stem, "status": "unreadable summary"})
    # Run ids sort by second only; two runs in the same second are ordered by start time.
    return sorted(summaries, key=lambda s: (str(s.get("started_at", "")), str(s["run_id"])))


def dataset_summaries(location: str | Path, options: StorageOptions) -> list[dict[str, Any]]:
    """The run summaries of the dataset at `location` (a folder or a bucket URL), oldest
    first; a store that cannot be read is one line (OutputError, exit 2)."""
    store = open_store(location, options)
    try:
        return read_summaries(store)
    except BatchscoreError:
        raise
    except Exception as exc:  # no credentials, refused, not answering, unreadable
        raise OutputError(f"cannot read {store.shown()}: {failure(exc)}") from exc


def remove_stale_temporaries(store: Store) -> int:
    """Delete what runs that died left staged in the dataset; call only while holding the
    lock (no other run writes then)."""
    stale = [name for name in store.names() if is_temporary(name)]
    for name in stale:
        store.delete(name)
    return len(stale)


def dataset_parts(location: str | Path, options: StorageOptions, below: str = "") -> Parts:
    """The committed parts of the dataset at `location` (a folder or a bucket URL), or of its
    sub-folder `below` (a partition, say), by the rule readers use."""
    store = open_store(location, options)
    return store.parts([name for name in store.names(below) if is_part(name)])


def part_files(root: Path) -> list[Path]:
    """The committed parts of a dataset folder, as paths."""
    return [Path(path) for path in dataset_parts(root, {}).paths]


def settle_dead_attempts(store: Store) -> int:
    """Summaries still `running` belong to attempts that died (this run holds the lock): each
    becomes `killed`, with what its parts hold (found by the attempt in their names), so that
    `batchscore runs` adds up to what the dataset holds. Call only while holding the lock."""
    try:
        summaries = read_summaries(store)
    except OutputError:  # a new dataset: nothing in it yet
        return 0
    dead = [s for s in summaries if s.get("status") == "running"]
    if not dead:
        return 0
    parts = [name for name in store.names() if is_part(name)]
    for summary in dead:
        prefix = attempt_prefix(summary)
        mine = [name for name in parts if posixpath.basename(name).startswith(prefix)]
        stats = RunStats()  # what the attempt's own summary would have counted
        if mine:
            parts = store.parts(mine).dataset()
            for batch in parts.to_batches(columns=stats_columns(parts.schema.names)):
                stats.add(batch)
        settled = {
            **summary,
            **stats.as_dict(),
            "status": "killed",
            "parts": mine,
            "n_committed": stats.n_images,
        }
        write_summary(store, settled)
    return len(dead)
