"""Outputs in a bucket: the dataset directory's promises kept with object-store primitives.

- A part is written to a local staging file, then uploaded as one object (one PUT, or a
  multipart upload that becomes visible only when completed): no reader ever sees half a part,
  and a killed run leaves only complete parts. Same for run summaries and single-file outputs.
- The lock is an object created with a conditional create (S3 `If-None-Match: *`): of two runs
  starting at once exactly one gets it. It holds a lease that its run renews while it works
  (a conditional `If-Match` overwrite of its own version). Each renewal writes a new body (a
  counter goes up), so its version changes: a run that read the lock before a renewal cannot
  take it over after it. A run killed with the lock leaves a lease that expires; the next run
  takes it over with the same conditional overwrite, so of two runs taking over, again exactly
  one wins.
- A lease's age is judged by the store's clock alone on S3 (the `Date` of the HEAD answer
  against the lock's `Last-Modified`), so no host's clock can make a live lease look expired.
  Elsewhere it is this host's clock against `Last-Modified`: hosts may disagree by less than
  the fifth of a lease that a holder keeps in hand (60 s at the default 300 s).
- The holder counts its lease from the moment a renewal was sent (not answered), and checks it
  before every attempt to upload a part: past 80% of a lease with no renewal landed, it stops
  committing, since another run may hold the lock by then. A renewal whose answer was lost
  but which landed (Azure and S3 answer the next one with 412) is recognised by reading the
  lock back: this run's token and counter mean it still holds it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from batchscore import storage
from batchscore.dataset import (
    LOCK_NAME,
    RUNS_DIR,
    DatasetWriter,
    attempt_prefix,
    part_files,
    read_summaries,
    summary_name,
    write_summary,
)
from batchscore.errors import BatchscoreError, LockHeld, OutputError, WriteFailed
from batchscore.files import process_alive
from batchscore.names import is_url, redact_url
from batchscore.output import FileSink
from batchscore.settings import DEFAULT_LEASE_S
from batchscore.storage import StorageOptions
from batchscore.summary import STATS_COLUMNS, RunStats

RENEWALS_PER_LEASE = 5  # a lease survives four renewals failing in a row
STORE_NOW = "batchscore_store_now"  # the store's own time, where it said it (S3's Date)
WAIT_POLL_S = 10.0


def is_part(relative: str) -> bool:
    """The rule readers use: a .parquet file with no name or folder starting with '.' or '_'."""
    names = relative.split("/")
    return names[-1].endswith(".parquet") and not any(n.startswith((".", "_")) for n in names)


def bucket_part_files(root: str, options: StorageOptions) -> list[str]:
    """The committed parts of a dataset in a bucket, as URLs, sorted."""
    root = root.rstrip("/")
    return [url for url, _ in _listed(root, options) if is_part(url[len(root) + 1 :])]


def _listed(url: str, options: StorageOptions) -> list[tuple[str, dict[str, Any]]]:
    """The objects below `url`; none when the prefix does not exist."""
    try:
        return list(storage.list_objects(url, options))
    except FileNotFoundError:
        return []


def read_bucket_summaries(root: str, options: StorageOptions) -> list[dict[str, Any]]:
    """All run summaries of a dataset in a bucket, oldest first (see `read_summaries`)."""
    root = root.rstrip("/")
    found = _listed(f"{root}/{RUNS_DIR}", options)
    if not found and not bucket_part_files(root, options):
        raise OutputError(f"no batchscore dataset at {redact_url(root)}")
    summaries = []
    for url, _ in found:
        if not url.endswith(".json"):
            continue
        try:
            summaries.append(json.loads(storage.read_object(url, options)))
        except (OSError, ValueError):
            name = url.rsplit("/", 1)[1].removesuffix(".json")
            summaries.append({"run_id": name, "status": "unreadable summary"})
    return sorted(summaries, key=lambda s: (str(s.get("started_at", "")), str(s["run_id"])))


def remove_stale_bucket_temporaries(root: str, options: StorageOptions) -> int:
    """Delete the hidden `.part-*.tmp` objects that a dead Dask run left (its token); call only
    while holding the lock."""
    stale = [
        url
        for url, _ in _listed(root.rstrip("/"), options)
        if url.rsplit("/", 1)[1].startswith(".part-")
    ]
    for url in stale:
        with suppress(FileNotFoundError):
            storage.delete_object(url, options)
    return len(stale)


@dataclass(frozen=True)
class Parts:
    """The Parquet files of a dataset (or one file), on disk or in a bucket, as one table."""

    paths: list[str]
    filesystem: Any = None  # None: local paths

    def dataset(self) -> ds.Dataset:
        return ds.dataset(self.paths, format="parquet", filesystem=self.filesystem)


def dataset_parts(location: str | Path, options: StorageOptions, below: str = "") -> Parts:
    """The committed parts of the dataset at `location` (a folder or a bucket URL), or of its
    sub-folder `below` (a partition, say), by the rule readers use."""
    if isinstance(location, str) and is_url(location):
        root = storage.join(location, below) if below else location
        return object_parts(bucket_part_files(root, options), options)
    return Parts([str(path) for path in part_files(Path(location) / below)])


def object_parts(urls: list[str], options: StorageOptions) -> Parts:
    """Objects read as one table through their store's filesystem."""
    if not urls:
        return Parts([])
    filesystem = storage.filesystem(urls[0], options)[0]
    return Parts([storage.filesystem(url, options)[1] for url in urls], filesystem)


def dataset_summaries(location: str | Path, options: StorageOptions) -> list[dict[str, Any]]:
    """The run summaries of a dataset directory or of a dataset in a bucket, oldest first."""
    if isinstance(location, str) and is_url(location):
        storage.check_url(location)
        try:
            return read_bucket_summaries(location, options)
        except BatchscoreError:
            raise
        except Exception as exc:  # no credentials, refused, not answering: one line, exit 2
            raise OutputError(
                f"cannot read {redact_url(location)}: {storage.failure(exc)}"
            ) from exc
    return read_summaries(Path(location))


def settle_dead_attempts(location: str | Path, options: StorageOptions) -> int:
    """Summaries still `running` belong to attempts that died (this run holds the lock): each
    becomes `killed`, with what its parts hold (found by the attempt in their names), so that
    `batchscore runs` adds up to what the dataset holds. Call only while holding the lock."""
    try:
        summaries = dataset_summaries(location, options)
    except OutputError:  # a new dataset: nothing in it yet
        return 0
    dead = [s for s in summaries if s.get("status") == "running"]
    if not dead:
        return 0
    everything = dataset_parts(location, options)
    root = str(location).rstrip("/")
    for summary in dead:
        prefix = attempt_prefix(summary)
        mine = [p for p in everything.paths if p.rsplit("/", 1)[-1].startswith(prefix)]
        stats = RunStats()  # what the attempt's own summary would have counted
        if mine:
            for batch in (
                Parts(mine, everything.filesystem).dataset().to_batches(columns=list(STATS_COLUMNS))
            ):
                stats.add(batch)
        settled = {
            **summary,
            **stats.as_dict(),
            "status": "killed",
            "parts": sorted(p.split(f"{root}/", 1)[-1] for p in mine),
            "n_committed": stats.n_images,
        }
        _put_summary(location, settled, options)
    return len(dead)


def _put_summary(location: str | Path, summary: Mapping[str, Any], options: StorageOptions) -> None:
    if isinstance(location, Path) or not is_url(location):
        write_summary(Path(location), summary)
        return
    data = json.dumps(summary, indent=2, sort_keys=True, default=str).encode()
    storage.put_bytes(f"{location.rstrip('/')}/{RUNS_DIR}/{summary_name(summary)}", data, options)


class Lease:
    """The lock object of a dataset in a bucket, held and renewed by this run."""

    def __init__(self, root: str, options: StorageOptions, lease_s: float) -> None:
        self.url = f"{root.rstrip('/')}/{LOCK_NAME}"
        self.lease_s = lease_s
        self.options = options
        self.fs, self.path = storage.filesystem(self.url, options)
        # S3's If-Match, Azure's etag condition; gcsfs offers none through fsspec
        self.protocol = storage.SCHEMES[storage.scheme(self.url)][0]
        self.conditional_overwrite = self.protocol in ("s3", "abfs")
        self.version: str | None = None
        self.lost: str | None = None
        self.token = uuid.uuid4().hex  # this run's, so no other run's lock body is the same
        self.renewals = 0  # in the body: every renewal changes the lock's version
        self.renewed_at = 0.0  # time.monotonic() when the last write that landed was sent
        self._sent_at: dict[int, float] = {}  # renewal counter -> when that write was sent
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_namespace": _pid_namespace(),
            "lease_s": self.lease_s,
            "token": self.token,
            "renewals": self.renewals,
        }
        return json.dumps(holder).encode()

    def acquire(self, *, wait: bool) -> None:
        while True:
            sent = time.monotonic()
            try:
                self._create()
            except Exception as exc:
                if not isinstance(exc, FileExistsError) and storage.status_of(exc) != 409:
                    raise  # 409: S3's answer to two conditional creates at once
                held = self._held()
                if held is None:
                    continue  # released between our create and our look: try again
                info, holder = held
                if holder.get("token") == self.token:  # our create landed, its answer did not
                    self.version = str(info.get("ETag") or info.get("etag") or "") or None
                    self.renewed_at = sent
                    break
                if self._expired(info, holder) and self._take_over(info):
                    break
                if not wait:
                    raise LockHeld(
                        f"another batchscore run (host {holder.get('host')}, pid"
                        f" {holder.get('pid')}) is writing to"
                        f" {redact_url(self.url.rsplit('/', 1)[0])}; it was left alone (use"
                        " --wait-lock to wait for it; a dead run's lease expires"
                        f" {float(holder.get('lease_s', self.lease_s)):.0f} s after its last"
                        " renewal)"
                    ) from None
                time.sleep(min(WAIT_POLL_S, self.lease_s / RENEWALS_PER_LEASE))
                continue
            break
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True)
        self._renewer.start()

    def _create(self) -> None:
        sent = time.monotonic()
        response = storage.retried(
            lambda: self.fs.pipe_file(self.path, self._body(), mode="create"), self.url, "PUT"
        )
        self.version = _etag(response) or self._version()
        self.renewed_at = sent

    def _version(self) -> str | None:
        info = storage.stat_object(self.url, self.options)
        return str(info.get("ETag") or info.get("etag") or info.get("generation") or "") or None

    def _held(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        try:
            info = self._stat_with_store_time()
            holder = json.loads(storage.read_object(self.url, self.options))
        except FileNotFoundError:
            return None
        except ValueError:
            holder = {}
        return info, holder if isinstance(holder, dict) else {}

    def _expired(self, info: Mapping[str, Any], holder: Mapping[str, Any]) -> bool:
        """Whether the holder's own lease (as it wrote it) ran out since its last renewal, or
        the holder was a process of this machine that is gone (as a flock is dropped)."""
        pid = holder.get("pid")
        here = holder.get("host") == socket.gethostname()
        same_pids = holder.get("pid_namespace") == _pid_namespace()  # not another container's
        if here and same_pids and isinstance(pid, int) and not process_alive(pid):
            return True
        modified = next(
            (info[k] for k in ("LastModified", "last_modified", "mtime", "updated") if info.get(k)),
            None,
        )
        if isinstance(modified, str):  # GCS's `updated`: RFC 3339 text
            with suppress(ValueError):
                modified = datetime.fromisoformat(modified.replace("Z", "+00:00"))
        if not isinstance(modified, datetime):
            return False  # no time to judge by: never take a lock over
        lease = holder.get("lease_s", self.lease_s)
        lease_s = float(lease) if isinstance(lease, (int, float)) else self.lease_s
        now = info.get(STORE_NOW) or datetime.now(timezone.utc)  # the store's clock if it told
        return bool((now - modified).total_seconds() > lease_s)

    def _stat_with_store_time(self) -> dict[str, Any]:
        """The lock's metadata; on S3 with the store's own time of the answer (`STORE_NOW`,
        from its `Date` header), so that expiry is judged by one clock, the store's."""
        if self.protocol != "s3":
            return storage.stat_object(self.url, self.options)
        from fsspec.asyn import sync  # noqa: PLC0415  (an extra's dependency, loaded on use)

        bucket, _, key = self.path.partition("/")
        answer = storage.retried(
            lambda: sync(self.fs.loop, self.fs._call_s3, "head_object", Bucket=bucket, Key=key),
            self.url,
            "HEAD",
        )
        info = dict(answer)
        date = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        with suppress(TypeError, ValueError):
            info[STORE_NOW] = parsedate_to_datetime(date)
        return info

    def _take_over(self, info: Mapping[str, Any]) -> bool:
        """Overwrite an expired lock only if it is still the version we saw."""
        sent = time.monotonic()
        try:
            if not self.conditional_overwrite:
                self.fs.rm_file(self.path)  # then race for the create like a fresh start
                self._create()
                return True
            response = self._overwrite_if(str(info.get("ETag") or info.get("etag")))
        except Exception as exc:
            if storage.is_transient(exc):
                raise
            return False  # another run took it over first (the precondition failed)
        self.version = _etag(response) or self._version()
        self.renewed_at = sent
        return True

    def _overwrite_if(self, version: str) -> Any:
        """Replace the lock only while it is still `version` (S3 If-Match, Azure's etag
        condition); a store without one overwrites it plainly."""
        if self.protocol == "s3":
            return self.fs.pipe_file(self.path, self._body(), IfMatch=version)
        if self.protocol == "abfs":
            from azure.core import MatchConditions  # noqa: PLC0415  (the azure extra's)

            condition = MatchConditions.IfNotModified
            return self.fs.pipe_file(
                self.path, self._body(), etag=version, match_condition=condition
            )
        return self.fs.pipe_file(self.path, self._body())

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / RENEWALS_PER_LEASE):
            self.renew()

    def renew(self) -> None:
        sent = time.monotonic()
        self.renewals += 1
        self._sent_at = {n: t for n, t in self._sent_at.items() if sent - t < self.lease_s}
        self._sent_at[self.renewals] = sent
        try:
            response = self._overwrite_if(str(self.version))
            self.version = _etag(response) or self._version()
            self.renewed_at = sent
        except Exception as exc:
            if storage.is_transient(exc):
                return  # tried again at the next renewal, well within the lease
            if not self._adopt_own_write():
                self.lost = "another run took over this run's lock (its lease had expired)"

    def _adopt_own_write(self) -> bool:
        """Whether the lock holds a renewal of this run whose answer was lost on the way (it
        landed, so the next If-Match failed): then the lease counts from when that one was
        sent, and its version is the one to renew."""
        try:
            held = self._held()
        except Exception:
            return False
        if held is None:
            return False
        info, holder = held
        sent = self._sent_at.get(holder.get("renewals", -1))
        version = str(info.get("ETag") or info.get("etag") or "")
        if holder.get("token") != self.token or sent is None or not version:
            return False
        self.version, self.renewed_at = version, sent
        return True

    def check(self) -> None:
        """Raise before committing anything once the lock is no longer this run's, or may not
        be: renewals that kept failing for most of a lease (another run may hold it now)."""
        if self.lost is None and time.monotonic() - self.renewed_at > 0.8 * self.lease_s:
            self.lost = "could not renew this run's lock for most of its lease"
        if self.lost is not None:
            raise WriteFailed(f"{redact_url(self.url)}: {self.lost}; nothing more was written")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.lost is None:
            with suppress(Exception):  # best effort: an unreleased lease expires by itself
                if self._version() == self.version:
                    storage.delete_object(self.url, self.options)


def _pid_namespace() -> str:
    """Which pid namespace this process lives in: two containers may share a hostname, and
    their pids then name different processes."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _etag(response: object) -> str | None:
    """The new version a PUT answered with (S3 `ETag`, Azure `etag`)."""
    if isinstance(response, dict):
        version = response.get("ETag") or response.get("etag")
        return None if version is None else str(version)
    return None


@contextmanager
def bucket_lock(
    root: str, options: StorageOptions, *, wait: bool = False, lease_s: float = DEFAULT_LEASE_S
) -> Iterator[Lease]:
    """Hold the dataset's lock in the bucket for the run (see the module's docstring)."""
    storage.check_reachable(root, options)
    lease = Lease(root, options, lease_s)
    try:
        lease.acquire(wait=wait)
    except (LockHeld, OutputError):
        raise
    except Exception as exc:  # the store refused (no write permission...) or is not answering
        shown = redact_url(root)
        raise OutputError(f"cannot take the lock of {shown}: {storage.failure(exc)}") from exc
    try:
        yield lease
    finally:
        lease.release()


class BucketDatasetWriter(DatasetWriter):
    """A run written into a dataset in a bucket: parts staged locally, uploaded whole."""

    def __init__(
        self,
        root: str,
        schema: pa.Schema,
        metadata: Mapping[str, Any],
        *,
        run_id: str,
        options: StorageOptions,
        lease: Lease,
        part_rows: int,
        part_seconds: float,
    ) -> None:
        self.staging = new_staging("parts")
        super().__init__(
            self.staging,
            schema,
            metadata,
            run_id=run_id,
            part_rows=part_rows,
            part_seconds=part_seconds,
        )
        self.url = root.rstrip("/")
        self.options = options
        self.lease = lease

    def _commit_part(self) -> None:
        current = self._current
        if current is None:
            return
        current.commit({"part_rows": current.rows})
        self._current = None
        relative = current.path.relative_to(self.root).as_posix()
        try:
            storage.put_file(
                str(current.path), f"{self.url}/{relative}", self.options, fence=self.lease.check
            )
        finally:
            current.path.unlink(missing_ok=True)
        self.parts.append(relative)
        self.committed_rows += current.rows

    def fence(self) -> None:
        self.lease.check()

    def part_location(self, index: int) -> str:
        """Where a Dask worker uploads part `index`: its URL."""
        return f"{self.url}/{self.part_path(index).relative_to(self.root).as_posix()}"

    @property
    def partition_url(self) -> str:
        return f"{self.url}/{self.partition.relative_to(self.root).as_posix()}"

    def _write_summary(self, record: Mapping[str, Any]) -> None:
        _put_summary(self.url, self.summary(record), self.options)

    def finish(self, record: Mapping[str, Any]) -> None:
        with _removed_after(self.staging):
            super().finish(record)

    def stop(self, record: Mapping[str, Any]) -> str:
        with _removed_after(self.staging):
            return super().stop(record)

    def abort(self, record: Mapping[str, Any]) -> None:
        with _removed_after(self.staging):
            super().abort(record)


class BucketFileSink(FileSink):
    """A single Parquet file in a bucket: written locally, uploaded only once complete."""

    def __init__(
        self, url: str, schema: pa.Schema, metadata: Mapping[str, Any], options: StorageOptions
    ) -> None:
        self.staging = new_staging("output")
        super().__init__(self.staging / "output.parquet", schema, metadata)
        self.url = url
        self.options = options

    def finish(self, record: Mapping[str, Any]) -> None:
        with _removed_after(self.staging):
            super().finish(record)
            storage.put_file(str(self.file.path), self.url, self.options)

    def stop(self, record: Mapping[str, Any]) -> str:
        with _removed_after(self.staging):
            return super().stop(record)

    def abort(self, record: Mapping[str, Any]) -> None:
        with _removed_after(self.staging):
            super().abort(record)


STAGING_PREFIX = "batchscore-staging-"


def new_staging(kind: str) -> Path:
    """A local folder for files on their way to a bucket, named after this process, after
    removing those of processes that are gone (a `kill -9` leaves its folder behind)."""
    remove_dead_staging()
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-{kind}-"))


def remove_dead_staging() -> int:
    """Delete the staging folders whose process no longer runs on this machine."""
    removed = 0
    for folder in Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*"):
        pid = folder.name.removeprefix(STAGING_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


@contextmanager
def _removed_after(staging: Path) -> Iterator[None]:
    """The local staging folder of a sink in a bucket goes when the run ends, however."""
    try:
        yield
    finally:
        shutil.rmtree(staging, ignore_errors=True)
