"""Where an output lives, a local folder or a bucket prefix, seen through the few operations
batchscore's commit protocol needs. The protocol itself (parts, summaries, the lock, what dead
runs left behind) is written once, on this interface, in dataset.py and output.py; each store
keeps the same promises with its own primitives:

- `stage` + `commit`: LocalStore (a folder) writes a hidden temporary beside the target,
  fsyncs it and renames it into place; BucketStore (an S3, GCS or Azure prefix) writes a local
  staging file and uploads it as one object (one PUT, or a multipart upload that becomes
  visible only when completed). `put` does the same from bytes.
- `lock`: a folder's is a `flock` on `_batchscore.lock`, which the kernel drops when its
  process dies; a bucket's is a lock object under a lease, taken and renewed with
  conditional writes (lease.py).
- the lock's `check`, run before every commit: nothing can take a flock from a live process;
  a lease raises once it may be another run's.

So no reader ever sees half a file, and a run killed at any moment leaves only whole ones.
Names are relative to the store's root, with '/' between folders.
"""

from __future__ import annotations

import fcntl
import glob
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow.dataset as ds

from batchscore import storage
from batchscore.errors import LockHeld
from batchscore.files import output_errors, process_alive, write_errors
from batchscore.lease import held_lease
from batchscore.names import is_url, redact_url
from batchscore.storage import StorageOptions

LOCK_NAME = "_batchscore.lock"
STAGING_PREFIX = "batchscore-staging-"

Fence = Callable[[], None]


class Held(Protocol):
    """A store's lock while this run holds it."""

    def check(self) -> None:
        """Raise WriteFailed when this run may no longer commit (the lock may be another's)."""


@dataclass(frozen=True)
class Parts:
    """Parquet files of a store, read as one table (through the store's filesystem)."""

    paths: list[str]
    filesystem: Any = None  # None: local paths

    def dataset(self) -> ds.Dataset:
        return ds.dataset(self.paths, format="parquet", filesystem=self.filesystem)


class Store(Protocol):
    """A local folder or a bucket prefix, as the commit protocol uses it."""

    def location(self, name: str = "") -> str:
        """The absolute path or URL of `name` (the root itself for "")."""

    def shown(self, name: str = "") -> str:
        """`location(name)` as messages show it (a URL's credentials redacted)."""

    def prepare(self) -> None:
        """Make sure the root can be written to, before any work (OutputError, ConfigError)."""

    def stage(self, name: str) -> Path:
        """A local file to write `name` into, for `commit` to make visible; its writer deletes
        it if it is not committed (OSError when even that cannot be made)."""

    def commit(self, staged: Path, name: str, fence: Fence | None = None) -> None:
        """Make the staged file `name`, whole or not at all. `fence` runs right before, and
        before every retry: it raises when the write may no longer land."""

    def put(self, name: str, data: bytes) -> None:
        """Write `name` whole or not at all."""

    def get(self, name: str) -> bytes:
        """The bytes of `name` (FileNotFoundError when there is none)."""

    def exists(self, name: str) -> bool: ...

    def delete(self, name: str) -> None:
        """Remove `name`; one that is gone already is fine."""

    def names(self, below: str = "") -> list[str]:
        """Every file below the folder `below`, hidden ones too, sorted; none when it is
        missing."""

    def parts(self, names: Sequence[str]) -> Parts:
        """`names` as Parquet files that pyarrow reads as one table."""

    def lock(self, *, wait: bool, lease_s: float) -> AbstractContextManager[Held]:
        """Hold the root's lock for a run: LockHeld at once when another run holds it, unless
        `wait`."""

    def remove_dead_temporaries(self, name: str) -> int:
        """Delete what writers of `name` that died left staged (their process is gone)."""

    def close(self) -> None:
        """Remove this process's staging area, once nothing more is written."""


def open_store(location: str | Path, options: StorageOptions) -> Store:
    """The store of a folder, or of a bucket prefix when `location` is a URL."""
    if isinstance(location, str) and is_url(location):
        return BucketStore(location, options)
    return LocalStore(Path(location))


def split(location: str | Path, options: StorageOptions) -> tuple[Store, str]:
    """The store of the folder that holds the file `location`, and the file's name there."""
    if isinstance(location, str) and is_url(location):
        folder, name = posixpath.split(location)
        return BucketStore(folder, options), name
    path = Path(location)
    return LocalStore(path.parent), path.name


class LocalStore:
    """A folder on a local or shared disk."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def location(self, name: str = "") -> str:
        return os.path.abspath(self.root / name if name else self.root)

    def shown(self, name: str = "") -> str:
        return str(self.root / name if name else self.root)

    def prepare(self) -> None:
        with output_errors(self.root):
            self.root.mkdir(parents=True, exist_ok=True)

    def stage(self, name: str) -> Path:
        """A hidden temporary beside the target, named after this process so that a run that
        finds it after this one died knows it is garbage (`remove_dead_temporaries`)."""
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")

    def commit(self, staged: Path, name: str, fence: Fence | None = None) -> None:
        target = self.root / name
        try:
            with write_errors(target):
                with open(staged, "rb") as handle:
                    os.fsync(handle.fileno())
                if fence is not None:
                    fence()
                os.replace(staged, target)
                _fsync_dir(target.parent)
        finally:
            staged.unlink(missing_ok=True)

    def put(self, name: str, data: bytes) -> None:
        with write_errors(self.root / name):
            staged = self.stage(name)
            try:
                staged.write_bytes(data)
            except BaseException:
                staged.unlink(missing_ok=True)
                raise
        self.commit(staged, name)

    def get(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def names(self, below: str = "") -> list[str]:
        top = self.root / below if below else self.root
        found = []
        for folder, subdirs, files in os.walk(top):
            subdirs.sort()
            relative = Path(folder).relative_to(self.root).as_posix()
            prefix = "" if relative == "." else f"{relative}/"
            found += [f"{prefix}{file}" for file in sorted(files)]
        return found

    def parts(self, names: Sequence[str]) -> Parts:
        return Parts([str(self.root / name) for name in names])

    @contextmanager
    def lock(self, *, wait: bool, lease_s: float) -> Iterator[Held]:
        """A flock: the kernel drops it when its process dies, so a lock left by a killed run
        never blocks the next one, and no lease is needed. The file holds the holder's pid,
        written unbuffered so that a full disk fails here, once, and not again at close."""
        del lease_s
        self.prepare()
        with output_errors(self.root):
            fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise LockHeld(
                    f"another batchscore run (pid {holder}) is writing to {self.root};"
                    " it was left alone (use --wait-lock to wait for it)"
                ) from None
            with write_errors(self.root / LOCK_NAME):
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            try:
                yield _Flock()
            finally:
                with suppress(OSError):
                    os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # also releases the lock

    def remove_dead_temporaries(self, name: str) -> int:
        target = self.root / name
        removed = 0
        for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
            pid = tmp.name.removeprefix(f".{target.name}.").split("-", 1)[0]
            if pid.isdigit() and not process_alive(int(pid)):
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    def close(self) -> None:
        """Nothing to remove: temporaries sit beside their targets and are renamed away."""


class _Flock:
    def check(self) -> None:
        """A flock holds until its process dies: nothing can take it from a live run."""


class BucketStore:
    """A prefix in an S3, GCS or Azure bucket, written through its fsspec backend."""

    def __init__(self, root: str, options: StorageOptions) -> None:
        storage.check_url(root)  # a scheme batchscore knows, a bucket, no credentials in it
        self.root = root.rstrip("/")
        self.options = dict(options)
        self._staging: Path | None = None

    def __getstate__(self) -> dict[str, Any]:
        """What a Dask worker gets: the place, not this process's staging folder."""
        return {**self.__dict__, "_staging": None}

    def location(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root

    def shown(self, name: str = "") -> str:
        return redact_url(self.location(name))

    def prepare(self) -> None:
        storage.check_reachable(self.root, self.options)

    def stage(self, name: str) -> Path:
        if self._staging is None or not self._staging.is_dir():
            self._staging = new_staging()
        return self._staging / f"{uuid.uuid4().hex[:8]}-{posixpath.basename(name)}"

    def commit(self, staged: Path, name: str, fence: Fence | None = None) -> None:
        try:
            storage.put_file(str(staged), self.location(name), self.options, fence=fence)
        finally:
            staged.unlink(missing_ok=True)

    def put(self, name: str, data: bytes) -> None:
        storage.put_bytes(self.location(name), data, self.options)

    def get(self, name: str) -> bytes:
        return storage.read_object(self.location(name), self.options)

    def exists(self, name: str) -> bool:
        try:
            storage.stat_object(self.location(name), self.options)
        except FileNotFoundError:
            return False
        return True

    def delete(self, name: str) -> None:
        with suppress(FileNotFoundError):
            storage.delete_object(self.location(name), self.options)

    def names(self, below: str = "") -> list[str]:
        try:
            listed = list(storage.list_objects(self.location(below), self.options))
        except FileNotFoundError:
            return []
        return [url[len(self.root) + 1 :] for url, _ in listed]

    def parts(self, names: Sequence[str]) -> Parts:
        return object_parts([self.location(name) for name in names], self.options)

    def lock(self, *, wait: bool, lease_s: float) -> AbstractContextManager[Held]:
        return held_lease(self.location(LOCK_NAME), self.options, wait=wait, lease_s=lease_s)

    def remove_dead_temporaries(self, name: str) -> int:
        del name  # staged files are local, in folders named after their process
        return remove_dead_staging()

    def close(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def object_parts(urls: list[str], options: StorageOptions) -> Parts:
    """Objects read as one table through their store's filesystem."""
    if not urls:
        return Parts([])
    filesystem = storage.filesystem(urls[0], options)[0]
    return Parts([storage.filesystem(url, options)[1] for url in urls], filesystem)


def new_staging() -> Path:
    """A local folder for files on their way to a bucket, named after this process, after
    removing those of processes that are gone (a `kill -9` leaves its folder behind)."""
    remove_dead_staging()
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-"))


def remove_dead_staging() -> int:
    """Delete the staging folders whose process no longer runs on this machine."""
    removed = 0
    for folder in Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*"):
        pid = folder.name.removeprefix(STAGING_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
