"""What a dataset already holds, so a run scores only what is missing.

A scored row's key is (image_id, the exact bytes of its path, model SHA-256) and, with
`--incremental`, its content fingerprint too. Keys count: a manifest that lists the same
(id, path) twice gets two rows, and a resumed run skips exactly as many as the dataset holds,
so a kill at any moment followed by a rerun leaves what an uninterrupted run leaves. Two rows
that share an `id` but name different files are two different images.

Fingerprints:

- `size-mtime` (default): file size and modification time in nanoseconds, from one stat() per
  file. A file replaced or rewritten in place gets a new mtime, so it is rescored.
- `sha256`: the SHA-256 of the bytes. Survives copies that reset mtimes, costs a full read.
  Only regular files are hashed (a FIFO or a device gets no fingerprint and fails as an
  image), never more bytes than stat() reported, and the read stops when the run is told to.

Reading the state touches only a few columns of the dataset with a filter pushed into the
Parquet scan, and keeps one 64-bit hash and one count per done key in sorted NumPy arrays:
about 16 MB for a million images.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from batchscore import storage
from batchscore.dataset import dataset_parts
from batchscore.errors import OutputError, StoreUnavailable
from batchscore.files import file_sha256
from batchscore.names import is_url, readable, written_name
from batchscore.output import STATUS_ERROR, STATUS_OK
from batchscore.sources import ImageRef
from batchscore.storage import StorageOptions
from batchscore.store import Parts

_CHUNK = 4096
_HEADS_AT_ONCE = 32


def fingerprint(
    path: str | None, kind: str, should_stop: Callable[[], bool] = lambda: False
) -> str | None:
    """The content fingerprint of a file, or None when it cannot be read (it will fail)."""
    if path is None:
        return None
    try:
        if kind == "sha256":
            digest = file_sha256(path, should_stop)
            return None if digest is None else f"sha256:{digest}"
        info = os.stat(path)
    except (OSError, ValueError, UnicodeEncodeError):  # ValueError: a NUL byte in the path
        return None
    return f"{info.st_size}-{info.st_mtime_ns}"


def _keys(
    image_ids: Iterable[str | None],
    paths: Iterable[bytes | None],
    fingerprints: Iterable[str | None] | None,
) -> np.ndarray:
    """One 64-bit hash per row of (image_id as written, path bytes[, fingerprint])."""
    parts = [
        # latin-1 maps each byte to one character: lossless, and always valid text
        f"{readable(image_id or '')}\x00{(path or b'').decode('latin-1')}"
        for image_id, path in zip(image_ids, paths, strict=True)
    ]
    if fingerprints is not None:
        parts = [f"{key}\x00{print_}" for key, print_ in zip(parts, fingerprints, strict=True)]
    if not parts:
        return np.empty(0, dtype=np.uint64)
    return np.asarray(pd.util.hash_array(np.asarray(parts, dtype=object)), dtype=np.uint64)


class DoneSet:
    """How many rows of each key a dataset already holds for one model."""

    def __init__(self, hashes: np.ndarray, use_fingerprint: bool) -> None:
        self.hashes, counts = np.unique(hashes, return_counts=True)
        self.remaining = counts.astype(np.int64)
        self.use_fingerprint = use_fingerprint

    def __len__(self) -> int:
        return len(self.hashes)

    def take(self, refs: list[ImageRef]) -> np.ndarray:
        """Which refs are already done; each one found uses up one stored row of its key."""
        prints = [ref.fingerprint for ref in refs] if self.use_fingerprint else None
        keys = _keys([ref.image_id for ref in refs], [ref.path_bytes for ref in refs], prints)
        index = np.searchsorted(self.hashes, keys)
        index[index == len(self.hashes)] = 0
        done: np.ndarray = self.hashes[index] == keys
        rows = np.flatnonzero(done)
        slots = index[rows]
        # The n-th ref of a key in this chunk is done while the key has n rows left.
        order = np.argsort(slots, kind="stable")
        ordered = slots[order]
        new_group = np.r_[True, ordered[1:] != ordered[:-1]]
        starts = np.flatnonzero(new_group)
        rank = np.empty(len(rows), dtype=np.int64)
        rank[order] = np.arange(len(rows)) - starts[np.cumsum(new_group) - 1]
        kept = rank < self.remaining[slots]
        done[rows[~kept]] = False
        np.subtract.at(self.remaining, slots[kept], 1)
        return done


def load_done(
    root: str | Path,
    model_sha256: str | None,
    *,
    use_fingerprint: bool,
    include_errors: bool,
    setup_sha256: str | None = None,
    storage_options: StorageOptions | None = None,
) -> DoneSet:
    """Rows of this model (of any model when `model_sha256` is None) already in the dataset
    (ok rows; with `include_errors`, the rows of
    images that failed in themselves too, never those the store failed: `done_condition`). With
    `setup_sha256`, only rows scored with the same class names and preprocessing count (rows
    written before batchscore recorded it count as the same). `root` may be a bucket URL.
    A dataset that cannot be read is one line, exit 2, before any image is scored."""
    condition = done_condition(include_errors)
    if model_sha256 is not None:
        condition = (pc.field("model_sha256") == model_sha256) & condition
    # In a bucket the parts are read through pyarrow and the store's fsspec client, outside
    # `storage.retried`, and s3fs reports a throttled HEAD (503) as a missing object: a part
    # listed a moment ago, which no other run may delete while this one holds the lock, is
    # read again after a backoff, like every other request, before the run gives up.
    attempts = storage.ATTEMPTS if is_url(str(root)) else 1
    for attempt in range(attempts):
        try:
            files = dataset_parts(root, storage_options or {})
            hashes = _done_keys(files, condition, use_fingerprint, setup_sha256)
            return DoneSet(hashes, use_fingerprint)
        except (OSError, pa.ArrowException, StoreUnavailable) as exc:
            if attempt == attempts - 1:
                shown = written_name(str(root))
                failed = storage.failure(exc)
                raise OutputError(f"cannot read what {shown} holds: {failed}") from exc
            time.sleep(storage.BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


# What rows written before the `unavailable` status said when the store, not the image, failed.
_LEGACY_STORE_FAILURES = ("no answer after ", "access denied (403)")


def done_condition(include_errors: bool) -> pc.Expression:
    """Which rows count as done: ok rows, and with `include_errors` the error rows of images
    that failed in themselves. `unavailable` rows (the store or the network failed) never count,
    nor do error rows that older versions wrote for a store's failure."""
    ok = pc.field("status") == STATUS_OK
    if not include_errors:
        return ok
    image_error = pc.field("status") == STATUS_ERROR
    for prefix in _LEGACY_STORE_FAILURES:
        image_error = image_error & ~pc.starts_with(pc.field("error"), pattern=prefix)
    return ok | image_error


def _done_keys(
    files: Parts, condition: pc.Expression, use_fingerprint: bool, setup_sha256: str | None
) -> np.ndarray:
    """The key hash of every row of `files` that `condition` keeps."""
    parts = [np.empty(0, dtype=np.uint64)]
    for fragment in files.dataset().get_fragments() if files.paths else []:
        # Parts written before `path_bytes` existed hold only UTF-8 paths: those bytes.
        has_bytes = "path_bytes" in fragment.physical_schema.names
        columns = ["image_id", "path_bytes" if has_bytes else "path"]
        if use_fingerprint:
            columns.append("fingerprint")
        same = condition
        if setup_sha256 is not None and "setup_sha256" in fragment.physical_schema.names:
            same = same & (pc.field("setup_sha256") == setup_sha256)
        for batch in fragment.to_batches(
            columns=columns, filter=same, schema=fragment.physical_schema
        ):
            paths = batch.column(1)
            if not has_bytes:
                paths = pc.cast(paths, pa.binary())
            prints = batch.column("fingerprint").to_pylist() if use_fingerprint else None
            parts.append(_keys(batch.column(0).to_pylist(), paths.to_pylist(), prints))
    return np.concatenate(parts)


class SkipCounter:
    """How many refs were skipped as already done."""

    def __init__(self) -> None:
        self.skipped = 0


def with_fingerprints(
    refs: Iterable[ImageRef],
    kind: str,
    should_stop: Callable[[], bool] = lambda: False,
    *,
    storage_options: StorageOptions | None = None,
) -> Iterator[ImageRef]:
    """Each ref with its fingerprint. An object listed from a bucket prefix has one already,
    from the listing. Other objects (listed in a manifest) are asked for theirs (a HEAD each,
    `_HEADS_AT_ONCE` at a time) only when `storage_options` is given, i.e. on incremental
    runs: elsewhere the fingerprint is only recorded, and a request per image would not pay.
    A HEAD that still fails after every retry makes an error row (never a row without its
    fingerprint, which the next run would take for changed content), or stops the run when
    its store went down mid-run (`storage.StoreHealth`)."""
    health = storage.StoreHealth()
    iterator = iter(refs)
    while chunk := list(islice(iterator, _CHUNK)):
        remote = [
            i
            for i, ref in enumerate(chunk)
            if ref.fingerprint is None
            and ref.problem is None
            and ref.path is not None
            and is_url(ref.path)
        ]
        asked: dict[int, tuple[str | None, str | None]] = {}  # (fingerprint, unanswered)
        if remote and storage_options is not None:
            with ThreadPoolExecutor(_HEADS_AT_ONCE) as pool:
                found = pool.map(
                    lambda i: _object_print(str(chunk[i].path), storage_options), remote
                )
                for i, (print_, failure) in zip(remote, found, strict=True):
                    store = storage.authority(str(chunk[i].path))
                    if isinstance(failure, StoreUnavailable):
                        asked[i] = (None, health.left_unanswered(store, failure))
                    else:
                        health.answer(store)
                        asked[i] = (print_, None)
        for i, ref in enumerate(chunk):
            if ref.fingerprint is not None or ref.problem is not None:
                yield ref
            elif i in asked:
                print_, problem = asked[i]
                yield replace(ref, fingerprint=print_, problem=problem, unavailable=bool(problem))
            elif ref.path is not None and is_url(ref.path):
                yield ref
            else:
                yield replace(ref, fingerprint=fingerprint(ref.path, kind, should_stop))


def _object_print(url: str, options: StorageOptions) -> tuple[str | None, Exception | None]:
    """An object's fingerprint, or None when it has none to give (missing, forbidden: the read
    says why), with the store's failure when it did not answer."""
    try:
        return storage.object_fingerprint(storage.stat_object(url, options)), None
    except StoreUnavailable as exc:
        return None, exc
    except Exception:
        return None, None


def skip_done(refs: Iterable[ImageRef], done: DoneSet, counter: SkipCounter) -> Iterator[ImageRef]:
    """Drop refs already in `done`, in chunks so hashing stays vectorised."""
    iterator = iter(refs)
    while chunk := list(islice(iterator, _CHUNK)):
        if not len(done):
            yield from chunk
            continue
        seen = done.take(chunk)
        counter.skipped += int(seen.sum())
        yield from (ref for ref, is_done in zip(chunk, seen, strict=True) if not is_done)
