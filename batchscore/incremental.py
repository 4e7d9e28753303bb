"""What a dataset already holds, so a run scores only what is missing.

The key of a scored image is (image_id, model SHA-256) and, with `--incremental`, its content
fingerprint too:

- `size-mtime` (default): file size and modification time in nanoseconds, from one stat() per
  file. A file replaced or rewritten in place gets a new mtime, so it is rescored.
- `sha256`: the SHA-256 of the bytes. Survives copies that reset mtimes, costs a full read.

Reading the state touches only four columns of the dataset (image_id, fingerprint, status,
model_sha256) with a filter pushed into the Parquet scan, and keeps one 64-bit hash per done
image in a sorted NumPy array: 8 bytes per row, about 8 MB for a million images.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as ds

from batchscore.dataset import part_files
from batchscore.sources import ImageRef

FINGERPRINTS = ("size-mtime", "sha256")
_CHUNK = 4096


def fingerprint(path: str | None, kind: str) -> str | None:
    """The content fingerprint of a file, or None when it cannot be read (it will fail)."""
    if path is None:
        return None
    try:
        if kind == "sha256":
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            return f"sha256:{digest.hexdigest()}"
        info = os.stat(path)
    except OSError:
        return None
    return f"{info.st_size}-{info.st_mtime_ns}"


def _keys(image_ids: Iterable[object], fingerprints: Iterable[object] | None) -> np.ndarray:
    ids = np.asarray(list(image_ids), dtype=object)
    if fingerprints is not None:
        prints = np.asarray([str(f) for f in fingerprints], dtype=object)
        ids = ids.astype(str) + "\x00" + prints
    if len(ids) == 0:
        return np.empty(0, dtype=np.uint64)
    return np.asarray(pd.util.hash_array(ids.astype(object)), dtype=np.uint64)


class DoneSet:
    """Hashes of the images a dataset already holds for one model."""

    def __init__(self, hashes: np.ndarray, use_fingerprint: bool) -> None:
        self.hashes = np.unique(hashes)
        self.use_fingerprint = use_fingerprint

    def __len__(self) -> int:
        return len(self.hashes)

    def contains(self, refs: list[ImageRef]) -> np.ndarray:
        prints = [ref.fingerprint for ref in refs] if self.use_fingerprint else None
        keys = _keys([ref.image_id for ref in refs], prints)
        return np.isin(keys, self.hashes)


def load_done(
    root: Path, model_sha256: str, *, use_fingerprint: bool, include_errors: bool
) -> DoneSet:
    """Images of this model already in the dataset (ok rows; error rows too if asked)."""
    files = part_files(root)
    if not files:
        return DoneSet(np.empty(0, dtype=np.uint64), use_fingerprint)
    dataset = ds.dataset([str(f) for f in files], format="parquet")
    condition = pc.field("model_sha256") == model_sha256
    if not include_errors:
        condition = condition & (pc.field("status") == "ok")
    columns = ["image_id", "fingerprint"] if use_fingerprint else ["image_id"]
    parts = []
    for batch in dataset.to_batches(columns=columns, filter=condition):
        prints = batch.column("fingerprint").to_pylist() if use_fingerprint else None
        parts.append(_keys(batch.column("image_id").to_pylist(), prints))
    hashes = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
    return DoneSet(hashes, use_fingerprint)


class SkipCounter:
    """How many refs were skipped as already done."""

    def __init__(self) -> None:
        self.skipped = 0


def with_fingerprints(refs: Iterable[ImageRef], kind: str) -> Iterator[ImageRef]:
    for ref in refs:
        yield replace(ref, fingerprint=fingerprint(ref.path, kind))


def skip_done(refs: Iterable[ImageRef], done: DoneSet, counter: SkipCounter) -> Iterator[ImageRef]:
    """Drop refs already in `done`, in chunks so hashing stays vectorised."""
    iterator = iter(refs)
    while chunk := list(islice(iterator, _CHUNK)):
        if not len(done):
            yield from chunk
            continue
        seen = done.contains(chunk)
        counter.skipped += int(seen.sum())
        yield from (ref for ref, is_done in zip(chunk, seen, strict=True) if not is_done)
