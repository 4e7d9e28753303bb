"""Files written so that no reader ever sees half of one, files hashed with a bound, and the
one way each kind of write failure becomes an error: before the run starts, a configuration
error (exit 2); once it has started, a failed write (exit 1)."""

from __future__ import annotations

import hashlib
import os
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from batchscore.errors import OutputError, WriteFailed

_READ_BLOCK = 1 << 20


@contextmanager
def output_errors(path: str | Path) -> Iterator[None]:
    """An output that cannot be created, before any work: one line, exit 2."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write output {path}: {exc.strerror or exc}") from exc


@contextmanager
def write_errors(path: str | Path) -> Iterator[None]:
    """A write that fails mid-run (disk full, I/O error): one line, exit 1."""
    try:
        yield
    except OSError as exc:
        raise WriteFailed(f"cannot write {path}: {exc.strerror or exc}") from exc


def atomic_write_text(path: Path, text: str) -> None:
    """`text` at `path`, written under a hidden temporary name and renamed into place."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with write_errors(path):
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def file_sha256(path: str | Path, should_stop: Callable[[], bool] = lambda: False) -> str | None:
    """The hex SHA-256 of a regular file's bytes; None for anything else (a FIFO, a device),
    or when `should_stop()` turns true while reading. Never reads past the size stat() gave,
    and never waits for a FIFO's writer (O_NONBLOCK). Raises OSError when it cannot open."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        digest = hashlib.sha256()
        left = info.st_size  # a file that grows while it is read is hashed as stat() saw it
        while left > 0:
            if should_stop():
                return None
            block = handle.read(min(_READ_BLOCK, left))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
