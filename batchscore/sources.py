"""Where images come from: image directories and manifests, read lazily.

A source yields `ImageRef`s one at a time, so a manifest of millions of rows is never held
in memory. Every entry becomes exactly one ref, even a broken one (a manifest line that is
not JSON, a row without a path, a path with a NUL byte): the pipeline turns those into error
rows instead of dropping them, so nothing is lost silently.

Manifests are read as UTF-8, and a byte that is not UTF-8 never stops a run: it is kept as
`os.fsdecode` keeps it (see `batchscore.names`). In a path it is part of the file name, so a
manifest written by `find` on a disk with non-UTF-8 names still finds its files; in any other
field it is written as `\\xNN` and the row gets a warning saying so.
"""

from __future__ import annotations

import atexit
import csv
import functools
import json
import math
import os
import posixpath
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from batchscore import storage
from batchscore.errors import ConfigError, SourceError, StoreUnavailable
from batchscore.names import has_surrogates, is_url, name_bytes, path_problem, readable, redact_url
from batchscore.storage import StorageOptions

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet", ".txt")
RESERVED_COLUMNS = ("path", "id", "label")
_BATCH_ROWS = 4096


@dataclass(frozen=True)
class ImageRef:
    """One input entry. `problem` is set when the entry itself is broken (no usable path)."""

    path: str | None
    image_id: str
    label: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
    # The problem is the store's or the network's, not the image's: never counted as done
    unavailable: bool = False
    fingerprint: str | None = None  # content fingerprint, see batchscore.incremental
    warning: str | None = None  # something the row's reader should know (not an error)
    data: bytes | None = field(default=None, repr=False)  # the object's bytes, once fetched

    @property
    def path_bytes(self) -> bytes | None:
        """The exact bytes of the file name (see `batchscore.names`)."""
        return None if self.path is None else name_bytes(self.path)


class Source:
    """Base class: a named, re-iterable stream of `ImageRef`s."""

    def __init__(self, location: Path, *, shown: str | None = None) -> None:
        self.location = location
        self.shown = shown or str(location)  # what messages and metadata call it (redacted)

    def __iter__(self) -> Iterator[ImageRef]:
        raise NotImplementedError

    def count(self) -> int:
        """Number of refs `__iter__` yields (used for the progress bar's total)."""
        return sum(1 for _ in self)

    def extra_columns(self) -> dict[str, pa.DataType]:
        """Columns that pass through from the manifest, with their Arrow types."""
        return {}

    @property
    def has_labels(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.shown


class DirectorySource(Source):
    """Image files below a folder, walked recursively in sorted order.

    A sub-folder that cannot be listed becomes an error entry instead of silently hiding the
    images inside it. Symbolic links to folders are not followed (no loops).
    """

    def __iter__(self) -> Iterator[ImageRef]:
        for path, problem in self._entries():
            yield ImageRef(path=path, image_id=path, problem=problem)

    def count(self) -> int:
        return sum(1 for _ in self._entries())

    def _walk(self) -> Iterator[str]:
        return (path for path, problem in self._entries() if problem is None)

    def _entries(self) -> Iterator[tuple[str, str | None]]:
        root = os.path.abspath(self.location)
        unreadable: list[OSError] = []
        for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable.append):
            while unreadable:
                error = unreadable.pop()
                yield str(error.filename), f"cannot list folder: {error.strerror}"
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    yield os.path.join(dirpath, name), None
        for error in unreadable:
            yield str(error.filename), f"cannot list folder: {error.strerror}"

    def check_not_empty(self) -> None:
        if next(self._walk(), None) is None:
            accepted = ", ".join(IMAGE_EXTENSIONS)
            raise SourceError(
                f"no images found under {self.location} (looked recursively for {accepted},"
                " any case)"
            )


class ImageFolderSource(DirectorySource):
    """A labelled set in ImageFolder layout: each sub-folder's name is its images' label."""

    def __iter__(self) -> Iterator[ImageRef]:
        root = os.path.abspath(self.location)
        for path, problem in self._entries():
            relative = os.path.relpath(path, root)
            label = relative.split(os.sep, 1)[0] if os.sep in relative else None
            yield ImageRef(path=path, image_id=path, label=label, problem=problem)

    @property
    def has_labels(self) -> bool:
        return True


class ImageFileSource(Source):
    """A single image file given directly on the command line."""

    def __iter__(self) -> Iterator[ImageRef]:
        path = os.path.abspath(self.location)
        yield ImageRef(path=path, image_id=path)

    def count(self) -> int:
        return 1


class ObjectPrefixSource(Source):
    """The image objects below a bucket prefix (or any fsspec URL), sorted by key, with the
    same extension rule as folders. Each ref carries its fingerprint (size + ETag or
    generation) from the listing itself, so an incremental run costs no request per object.

    With `labelled`, a key's first part below the prefix is its label (ImageFolder layout)."""

    def __init__(self, url: str, options: StorageOptions, *, labelled: bool = False) -> None:
        super().__init__(Path(), shown=redact_url(url))
        self.url = url.rstrip("/")
        self.options = options
        self.labelled = labelled

    def _objects(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """The image objects, listed lazily (a page at a time on S3): memory stays flat."""
        try:
            for url, info in storage.list_objects(self.url, self.options):
                if url.lower().endswith(IMAGE_EXTENSIONS):
                    yield url, info
        except (ConfigError, StoreUnavailable):
            raise
        except Exception as exc:
            raise SourceError(f"cannot list {self}: {storage.reason(exc)}") from exc

    def check_not_empty(self) -> None:
        if next(self._objects(), None) is None:
            accepted = ", ".join(IMAGE_EXTENSIONS)
            raise SourceError(f"no images found under {self} (looked for {accepted}, any case)")

    def __iter__(self) -> Iterator[ImageRef]:
        for url, info in self._objects():
            relative = url[len(self.url) + 1 :]
            label = relative.split("/", 1)[0] if self.labelled and "/" in relative else None
            yield ImageRef(
                path=url,
                image_id=redact_url(url),
                label=label,
                fingerprint=storage.object_fingerprint(info),
            )

    def count(self) -> int:
        """Lists the prefix once more: asked for only by a progress bar on a terminal."""
        return sum(1 for _ in self._objects())

    @property
    def has_labels(self) -> bool:
        return self.labelled


class ManifestSource(Source):
    """Common handling of manifest rows: `path`, optional `id` and `label`, extras.

    A path is a URL, or relative to where the manifest itself lives: its folder, or for a
    manifest read from a bucket or web server, the URL of that folder. A manifest from an
    object store is downloaded once, to a temporary file, and read from there."""

    def __init__(self, location: Path, *, url: str | None = None) -> None:
        super().__init__(location, shown=None if url is None else redact_url(url))
        self.base = posixpath.dirname(url) if url else os.fsdecode(location.parent)
        self.name = posixpath.basename(redact_url(url)) if url else location.name

    def _resolve(self, raw: object) -> str | None:
        if raw is None or (isinstance(raw, float) and math.isnan(raw)):
            return None
        text = _text(raw).strip()
        if not text:
            return None
        if is_url(text):
            return text
        if not is_url(self.base) or text.startswith("/"):  # an absolute path is a local file
            return os.path.abspath(os.path.join(self.base, text))
        scheme, _, rest = self.base.partition("://")
        store, _, folder = rest.partition("/")
        key = posixpath.normpath(posixpath.join(folder, text)).lstrip("/")
        return f"{scheme}://{store}/{key}"

    def _ref(self, row: dict[str, Any], where: str) -> ImageRef:
        path = self._resolve(row.get("path"))
        raw_id = row.get("id")
        image_id = (
            _text(raw_id)
            if raw_id not in (None, "", b"")
            else (redact_url(path) if path and is_url(path) else path or where)
        )
        raw_label = row.get("label")
        label = _label_text(raw_label)
        extras = {
            readable(key): value
            for key, value in row.items()
            if isinstance(key, str) and key not in RESERVED_COLUMNS
        }
        unavailable = False
        if path is None:
            problem: str | None = f"{where}: empty or missing 'path'"
        else:
            reason = storage.url_problem(path) if is_url(path) else path_problem(path)
            problem = f"{where}: {reason}" if reason else None
            unavailable = reason is not None and is_url(path) and storage.missing_extra(path)
        not_utf8 = [
            name
            for name, value in (("id", raw_id), ("label", raw_label), *extras.items())
            if isinstance(value, str) and has_surrogates(value)
        ]
        warning = (
            f"{where}: bytes that are not UTF-8 in {', '.join(not_utf8)}, written as \\xNN"
            if not_utf8
            else None
        )
        return ImageRef(
            path=path,
            image_id=image_id,
            label=label,
            extras=extras,
            problem=problem,
            unavailable=unavailable,
            warning=warning,
        )


def _label_text(value: object) -> str | None:
    """A manifest's label as text: a list (a multi-label image's labels, in JSONL or a Parquet
    list column) as its JSON, `[]` included (an image with none of the labels)."""
    if isinstance(value, (list, tuple)):
        return json.dumps([_text(item) for item in value], ensure_ascii=False)
    return _text(value) if value not in (None, "", b"") else None


def _text(value: object) -> str:
    """A manifest value as text; bytes (a Parquet binary column) decode like file names."""
    return os.fsdecode(value) if isinstance(value, bytes) else str(value)


def _check_regular(location: Path) -> None:
    """A FIFO or device named like a manifest would block the run before it starts."""
    try:
        mode = location.stat().st_mode
    except OSError as exc:
        raise SourceError(f"cannot read manifest {location}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        raise SourceError(f"manifest {location} is not a regular file")


class CsvSource(ManifestSource):
    """A CSV manifest with a header row. Extra columns pass through as strings.

    A row the csv module cannot parse (a field over its size limit, say) becomes an error row
    of its own; the rows after it are still read."""

    def _open(self) -> TextIO:
        return self.location.open(newline="", encoding="utf-8-sig", errors="surrogateescape")

    @functools.cached_property
    def _header(self) -> list[str]:
        _check_regular(self.location)
        try:
            with self._open() as handle:
                header = next(csv.reader(handle), None)
        except (OSError, csv.Error) as exc:
            raise SourceError(f"cannot read manifest {self}: {exc}") from exc
        if not header or "path" not in header:
            shown = [readable(name) for name in header or []]
            raise SourceError(f"manifest {self} has no 'path' column (header: {shown})")
        return header

    def extra_columns(self) -> dict[str, pa.DataType]:
        return {
            readable(name): pa.string() for name in self._header if name not in RESERVED_COLUMNS
        }

    @property
    def has_labels(self) -> bool:
        return "label" in self._header

    def __iter__(self) -> Iterator[ImageRef]:
        header = self._header
        with self._open() as handle:
            reader = csv.reader(handle)
            next(reader, None)
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    where = f"{self.name} line {reader.line_num}"
                    yield ImageRef(None, where, problem=f"{where}: unreadable CSV row ({exc})")
                    continue
                if not values:
                    continue  # a blank line, as csv.DictReader skips it
                row: dict[str, Any] = dict.fromkeys(header)
                row.update((k, v or None) for k, v in zip(header, values, strict=False))
                yield self._ref(row, f"{self.name} line {reader.line_num}")


class JsonlSource(ManifestSource):
    """A JSON-lines manifest. Extra keys pass through as strings (non-strings JSON-encoded)."""

    def _rows(self) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
        _check_regular(self.location)
        try:
            handle = self.location.open(encoding="utf-8", errors="surrogateescape")
        except OSError as exc:
            raise SourceError(f"cannot read manifest {self}: {exc}") from exc
        with handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield line_no, None, f"invalid JSON ({exc.msg})"
                    continue
                if not isinstance(row, dict):
                    yield line_no, None, "line is not a JSON object"
                    continue
                yield line_no, row, None

    @functools.cached_property
    def _scan(self) -> tuple[list[str], int]:
        """All keys in first-seen order and the row count: one pass over the file, however
        often the columns, labels and count are asked for."""
        keys: dict[str, None] = {}
        rows = 0
        for _, row, _ in self._rows():
            rows += 1
            keys.update(dict.fromkeys(row or ()))
        return list(keys), rows

    def extra_columns(self) -> dict[str, pa.DataType]:
        keys = self._scan[0]
        return {key: pa.string() for key in keys if key not in RESERVED_COLUMNS}

    @property
    def has_labels(self) -> bool:
        return "label" in self._scan[0]

    def count(self) -> int:
        return self._scan[1]

    def __iter__(self) -> Iterator[ImageRef]:
        for line_no, row, problem in self._rows():
            where = f"{self.name} line {line_no}"
            if row is None:
                yield ImageRef(path=None, image_id=where, problem=f"{where}: {problem}")
                continue
            extras = {
                key: value if value is None or isinstance(value, str) else json.dumps(value)
                for key, value in row.items()
            }
            yield self._ref(extras, where)


class TextSource(ManifestSource):
    """One path per line; blank lines and lines starting with '#' are skipped.

    Lines are read as bytes and decoded like file names, so any name a disk holds can be listed.
    """

    def _lines(self) -> Iterator[tuple[int, str]]:
        _check_regular(self.location)
        try:
            handle = self.location.open("rb")
        except OSError as exc:
            raise SourceError(f"cannot read manifest {self}: {exc}") from exc
        with handle:
            for line_no, line in enumerate(handle, start=1):
                raw = line.removeprefix(b"\xef\xbb\xbf") if line_no == 1 else line
                text = os.fsdecode(raw.strip())
                if text and not text.startswith("#"):
                    yield line_no, text

    def count(self) -> int:
        return sum(1 for _ in self._lines())

    def __iter__(self) -> Iterator[ImageRef]:
        for line_no, text in self._lines():
            yield self._ref({"path": text}, f"{self.name} line {line_no}")


class ParquetSource(ManifestSource):
    """A Parquet manifest, read in record batches; extra columns keep their types."""

    def _file(self) -> pq.ParquetFile:
        _check_regular(self.location)
        try:
            parquet = pq.ParquetFile(self.location)
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"cannot read manifest {self}: {exc}") from exc
        if "path" not in parquet.schema_arrow.names:
            raise SourceError(
                f"manifest {self} has no 'path' column (columns: {parquet.schema_arrow.names})"
            )
        return parquet

    def extra_columns(self) -> dict[str, pa.DataType]:
        schema = self._file().schema_arrow
        return {f.name: f.type for f in schema if f.name not in RESERVED_COLUMNS}

    @property
    def has_labels(self) -> bool:
        return "label" in self._file().schema_arrow.names

    def count(self) -> int:
        return int(self._file().metadata.num_rows)

    def __iter__(self) -> Iterator[ImageRef]:
        row_no = 0
        for batch in self._file().iter_batches(batch_size=_BATCH_ROWS):
            for row in batch.to_pylist():
                row_no += 1
                yield self._ref(row, f"{self.name} row {row_no}")


_MANIFESTS: dict[str, type[ManifestSource]] = {
    ".csv": CsvSource,
    ".jsonl": JsonlSource,
    ".ndjson": JsonlSource,
    ".parquet": ParquetSource,
    ".txt": TextSource,
}


def open_source(
    location: str | Path,
    *,
    labelled_folders: bool = False,
    storage_options: StorageOptions | None = None,
    allow_empty: bool = False,
) -> Source:
    """Pick the source type for a path or URL: a folder (or prefix), a manifest, an image.

    With `labelled_folders`, a folder is read in ImageFolder layout (label = sub-folder). An
    empty folder or prefix is an error (a wrong path, most likely), unless `allow_empty`: for
    an incremental run it is a night with no uploads.
    """
    if not str(location).strip():
        raise SourceError("empty source path: pass an image folder, an image or a manifest")
    if isinstance(location, str) and is_url(location):
        return _open_url(location, labelled_folders, storage_options or {}, allow_empty)
    path = Path(location)
    if path.is_dir():
        directory = ImageFolderSource(path) if labelled_folders else DirectorySource(path)
        if not allow_empty:
            directory.check_not_empty()
        return directory
    if not path.exists():
        raise SourceError(f"source not found: {path}")
    suffix = path.suffix.lower()
    if suffix in _MANIFESTS:
        manifest = _MANIFESTS[suffix](path)
        manifest.extra_columns()  # validates the header / schema up front
        return manifest
    if suffix in IMAGE_EXTENSIONS:
        return ImageFileSource(path)
    raise SourceError(
        f"{path} is not a folder, an image or a manifest ({', '.join(MANIFEST_SUFFIXES)})"
    )


def _open_url(url: str, labelled: bool, options: StorageOptions, allow_empty: bool) -> Source:
    storage.check_url(url)
    web = storage.scheme(url) in ("http", "https")  # elsewhere a '?' is part of the key
    suffix = posixpath.splitext(url.split("?", 1)[0] if web else url)[1].lower()
    if suffix in _MANIFESTS:
        manifest = _MANIFESTS[suffix](_downloaded(url, suffix, options), url=url)
        manifest.extra_columns()
        return manifest
    if suffix in IMAGE_EXTENSIONS:
        try:
            storage.stat_object(url, options)
        except FileNotFoundError:
            raise SourceError(f"source not found: {redact_url(url)}") from None
        except (OSError, StoreUnavailable) as exc:
            raise SourceError(f"cannot read {redact_url(url)}: {storage.reason(exc)}") from exc
        return ObjectListSource([url])
    if web and "?" in url:
        raise SourceError(
            f"{redact_url(url)}: a web folder URL cannot carry a query (the file names would"
            " be added after it): list the files in a manifest instead"
        )
    storage.check_reachable(url, options)
    prefix = ObjectPrefixSource(url, options, labelled=labelled)
    if not allow_empty:
        prefix.check_not_empty()  # an empty or unreadable prefix fails before any work
    return prefix


def _downloaded(url: str, suffix: str, options: StorageOptions) -> Path:
    """A manifest object copied to a temporary file that lives as long as the process."""
    folder = tempfile.mkdtemp(prefix="batchscore-manifest-")
    atexit.register(shutil.rmtree, folder, True)
    local = Path(folder) / f"manifest{suffix}"
    try:
        local.write_bytes(storage.read_object(url, options))
    except ConfigError:
        raise
    except Exception as exc:
        raise SourceError(f"cannot read manifest {redact_url(url)}: {storage.reason(exc)}") from exc
    return local


class ObjectListSource(Source):
    """Objects named one by one on the command line."""

    def __init__(self, urls: Sequence[str]) -> None:
        super().__init__(Path(), shown=", ".join(redact_url(url) for url in urls))
        self.urls = list(urls)

    def __iter__(self) -> Iterator[ImageRef]:
        for url in self.urls:
            yield ImageRef(path=url, image_id=redact_url(url))

    def count(self) -> int:
        return len(self.urls)


def open_sources(
    locations: Sequence[str | Path],
    *,
    labelled_folders: bool = False,
    storage_options: StorageOptions | None = None,
    allow_empty: bool = False,
) -> list[Source]:
    if not locations:
        raise SourceError("no source given: pass an image folder or a manifest")
    return [
        open_source(
            loc,
            labelled_folders=labelled_folders,
            storage_options=storage_options,
            allow_empty=allow_empty,
        )
        for loc in locations
    ]


def merged_extra_columns(sources: Sequence[Source]) -> dict[str, pa.DataType]:
    """Union of all sources' extra columns; a name typed differently becomes a string."""
    merged: dict[str, pa.DataType] = {}
    for source in sources:
        for name, dtype in source.extra_columns().items():
            if name in merged and merged[name] != dtype:
                merged[name] = pa.string()
            else:
                merged.setdefault(name, dtype)
    return merged


def iter_refs(sources: Sequence[Source]) -> Iterator[ImageRef]:
    for source in sources:
        yield from source
