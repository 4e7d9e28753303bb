"""How rows are written: the column contract, Arrow conversion and atomic Parquet files.

Rows are converted chunk by chunk and written in row groups as they come; nothing waits for
the end of the run. A file is written under a temporary name beside its destination and
renamed only when complete, so a crashed or killed run never leaves a half file under the final
name, and readers never see one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchscore.files import output_errors, write_errors
from batchscore.names import readable, readable_or_none, written_name
from batchscore.store import Fence, Store

if TYPE_CHECKING:
    from batchscore.scorer import ChunkResult, ModelScores
    from batchscore.sources import ImageRef
    from batchscore.spec import ModelSpec

METADATA_PREFIX = "batchscore."
ROW_GROUP_ROWS = 2048
STATUS_OK = "ok"
STATUS_ERROR = "error"  # the image's own failure: --no-retry-errors counts it as done
STATUS_UNAVAILABLE = "unavailable"  # the store's or network's: every run tries it again
# How each image looked (see `preprocess.ImageStats`): what input-drift monitoring compares.
INPUT_STATS_FIELDS = (
    pa.field("format", pa.string()),
    pa.field("brightness", pa.float32()),
    pa.field("contrast", pa.float32()),
    pa.field("saturation", pa.float32()),
)
# Never a column: a dataset's partition key (readers add it from the folder name) and the
# column pandas keeps its index in.
RESERVED_NAMES = ("run_date", "__index_level_0__")


@dataclass(frozen=True)
class OutputLayout:
    """Which optional columns a run writes."""

    extra_columns: Mapping[str, pa.DataType]
    has_label: bool
    keep_probs: bool = True
    prefixes: Sequence[str] = ("",)  # one per model: "" = the model scored, then baselines
    # per model, its head (settings.HEADS) and, for an embedding, the vector's size
    heads: Sequence[tuple[str, int]] = (("softmax", 0),)


def prediction_fields(
    prefix: str, keep_probs: bool, head: str = "softmax", size: int = 0
) -> list[pa.Field]:
    """One model's columns: its top classes (and, for a multi-label head, every class at or
    above its threshold), or for an embedding head the vector alone."""
    if head == "embedding":
        return [pa.field(f"{prefix}embedding", pa.list_(pa.float32(), size))]
    fields = [
        pa.field(f"{prefix}pred_index", pa.int32()),
        pa.field(f"{prefix}pred_label", pa.string()),
        pa.field(f"{prefix}pred_prob", pa.float32()),
        pa.field(f"{prefix}topk_labels", pa.list_(pa.string())),
        pa.field(f"{prefix}topk_probs", pa.list_(pa.float32())),
    ]
    if head == "multi-label":
        fields.append(pa.field(f"{prefix}pred_labels", pa.list_(pa.string())))
    if keep_probs:
        fields.append(pa.field(f"{prefix}probs", pa.list_(pa.float32())))
    return fields


def output_schema(layout: OutputLayout) -> pa.Schema:
    fields = [
        pa.field("path", pa.string()),
        pa.field("path_bytes", pa.binary()),
        pa.field("image_id", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("warning", pa.string()),
    ]
    for prefix, (head, size) in zip(layout.prefixes, layout.heads, strict=True):
        fields += prediction_fields(prefix, layout.keep_probs, head, size)
    fields += [
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        *INPUT_STATS_FIELDS,
        pa.field("fingerprint", pa.string()),
    ]
    if layout.has_label:
        fields.append(pa.field("label", pa.string()))
        fields += [pa.field(f"{prefix}correct", pa.bool_()) for prefix in layout.prefixes]
    taken = {f.name for f in fields} | {
        "model_sha256",
        "setup_sha256",
        "run_id",
        "scored_at",
        *RESERVED_NAMES,
    }
    for name, dtype in layout.extra_columns.items():
        unique = passthrough_name(name, taken)
        taken.add(unique)
        fields.append(pa.field(unique, dtype))
    fields += [
        pa.field("model_sha256", pa.string()),
        pa.field("setup_sha256", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("scored_at", pa.timestamp("us", tz="UTC")),
    ]
    return pa.schema(fields)


def passthrough_name(name: str, taken: set[str]) -> str:
    """A manifest column named like a column already taken is kept as `manifest_<name>`
    (`manifest_manifest_<name>` if that is taken too, and so on), so names stay unique."""
    while name in taken:
        name = f"manifest_{name}"
    return name


def _list_array(flat: np.ndarray, valid: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """Rows of `flat` ([n_valid, width]) as a list array of n rows, null where not valid."""
    width = flat.shape[1] if flat.ndim == 2 else 0
    offsets = np.zeros(len(valid) + 1, dtype=np.int32)
    np.cumsum(np.where(valid, width, 0), out=offsets[1:])
    values = pa.array(flat.reshape(-1), type=dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~valid))


def prediction_columns(
    scores: ModelScores, spec: ModelSpec, valid: np.ndarray, keep_probs: bool
) -> list[pa.Array]:
    """Arrow columns of one model's predictions, in `prediction_fields` order."""
    if spec.head == "embedding":
        values = pa.array(scores.probs.reshape(-1), type=pa.float32())
        return [
            pa.FixedSizeListArray.from_arrays(values, spec.embedding_size, mask=pa.array(~valid))
        ]
    names = np.asarray(spec.class_names, dtype=object)
    topk = scores.topk.astype(np.int64)
    top1 = topk[:, 0]
    topk_probs = np.take_along_axis(scores.probs, topk, axis=1)
    invalid = ~valid
    columns = [
        pa.array(top1.astype(np.int32), type=pa.int32(), mask=invalid),
        pa.array(names[top1], type=pa.string(), mask=invalid),
        pa.array(topk_probs[:, 0], type=pa.float32(), mask=invalid),
        _list_array(names[topk[valid]], valid, pa.string()),
        _list_array(topk_probs[valid], valid, pa.float32()),
    ]
    if spec.head == "multi-label":
        present = scores.probs >= np.asarray(spec.thresholds, dtype=np.float32)
        chosen = [
            names[row].tolist() if ok else None
            for row, ok in zip(present, valid.tolist(), strict=True)
        ]
        columns.append(pa.array(chosen, type=pa.list_(pa.string())))
    if keep_probs:
        columns.append(_list_array(scores.probs[valid], valid, pa.float32()))
    return columns


def chunk_to_batch(
    result: ChunkResult,
    specs: Sequence[ModelSpec],
    schema: pa.Schema,
    layout: OutputLayout,
    run_id: str,
) -> pa.RecordBatch:
    """One chunk of results as a record batch matching `schema`."""
    refs, output = result.refs, result.output
    n = len(refs)
    valid = np.array([error is None for error in output.errors], dtype=bool)
    columns: list[pa.Array] = [
        pa.array(
            [None if ref.path is None else readable(written_name(ref.path)) for ref in refs],
            type=pa.string(),
        ),
        pa.array([ref.path_bytes for ref in refs], type=pa.binary()),
        pa.array([readable(ref.image_id) for ref in refs], type=pa.string()),
        pa.array([_status(ref, ok) for ref, ok in zip(refs, valid, strict=True)], pa.string()),
        pa.array([readable_or_none(e) for e in output.errors], type=pa.string()),
        pa.array(
            [_joined(ref.warning, w) for ref, w in zip(refs, output.warnings, strict=True)],
            type=pa.string(),
        ),
    ]
    for spec, scores in zip(specs, output.scores, strict=True):
        columns += prediction_columns(scores, spec, valid, layout.keep_probs)
    columns += [
        pa.array(output.widths, type=pa.int32()),
        pa.array(output.heights, type=pa.int32()),
        *_stats_columns(output.stats),
        pa.array([ref.fingerprint for ref in refs], type=pa.string()),
    ]
    if layout.has_label:
        labels = np.array([readable_or_none(ref.label) for ref in refs], dtype=object)
        columns.append(pa.array(labels, type=pa.string()))
        for spec, scores in zip(specs, output.scores, strict=True):
            if spec.head in ("embedding", "multi-label"):  # no one class to be right about
                columns.append(pa.nulls(n, type=pa.bool_()))
                continue
            predicted = np.asarray(spec.class_names, dtype=object)[scores.topk[:, 0]]
            columns.append(pa.array(predicted == labels, type=pa.bool_(), mask=~valid))
    for name, dtype in layout.extra_columns.items():
        columns.append(_extra_column([ref.extras.get(name) for ref in refs], dtype))
    columns += [
        pa.array([specs[0].sha256] * n, type=pa.string()),
        pa.array([specs[0].setup_sha256] * n, type=pa.string()),
        pa.array([run_id] * n, type=pa.string()),
        pa.array([result.finished_at] * n, type=pa.timestamp("us", tz="UTC")),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _status(ref: ImageRef, ok: bool) -> str:
    if ok:
        return STATUS_OK
    return STATUS_UNAVAILABLE if ref.unavailable else STATUS_ERROR


def _stats_columns(stats: list[Any]) -> list[pa.Array]:
    """format, brightness, contrast, saturation (see `preprocess.ImageStats`); null in errors."""
    return [pa.array([None if s is None else s.format for s in stats], type=pa.string())] + [
        pa.array([None if s is None else getattr(s, name) for s in stats], type=pa.float32())
        for name in ("brightness", "contrast", "saturation")
    ]


def _extra_column(values: list[Any], dtype: pa.DataType) -> pa.Array:
    if pa.types.is_string(dtype):
        values = [v if v is None else readable(v if isinstance(v, str) else str(v)) for v in values]
    return pa.array(values, type=dtype)


def _joined(*warnings: str | None) -> str | None:
    found = [readable(w) for w in warnings if w]
    return "; ".join(found) if found else None


def file_metadata(values: Mapping[str, Any]) -> dict[bytes, bytes]:
    """Key-value metadata: strings as they are, anything else as JSON."""
    return {
        f"{METADATA_PREFIX}{key}".encode(): (
            value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        ).encode()
        for key, value in values.items()
    }


def read_metadata(path: str | Path) -> dict[str, Any]:
    """batchscore's key-value metadata of a Parquet file, JSON values decoded."""
    raw = pq.ParquetFile(path).metadata.metadata or {}
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.decode()
        if not name.startswith(METADATA_PREFIX):
            continue
        text = value.decode()
        try:
            decoded[name[len(METADATA_PREFIX) :]] = json.loads(text)
        except json.JSONDecodeError:
            decoded[name[len(METADATA_PREFIX) :]] = text
    return decoded


class Sink(Protocol):
    """Where a run's rows go, whichever engine scores them: one file, or a dataset directory.

    `record` is the run's summary so far (counts, status, times): a sink keeps what it can of it.
    """

    schema: pa.Schema

    def write(self, batch: pa.RecordBatch) -> None:
        """Add rows, in input order."""

    def finish(self, record: Mapping[str, Any]) -> None:
        """The run is complete: make every row durable and visible."""

    def stop(self, record: Mapping[str, Any]) -> str:
        """The run was interrupted: keep what can be kept; say what happened to the rows."""

    def abort(self, record: Mapping[str, Any]) -> None:
        """The run failed: leave nothing half-written (best effort, the disk may be gone)."""


class FileSink:
    """A run written to one Parquet file, visible only once complete: staged, then committed
    whole by its store (a folder or a bucket prefix)."""

    def __init__(
        self, store: Store, name: str, schema: pa.Schema, metadata: Mapping[str, Any]
    ) -> None:
        self.store = store
        self.name = name
        store.remove_dead_temporaries(name)
        shown = store.shown(name)
        with output_errors(shown):
            self.file = ParquetPart(store.stage(name), schema, metadata, shown=shown)
        self.schema = self.file.schema
        self.metadata = metadata

    def write(self, batch: pa.RecordBatch) -> None:
        self.file.write(batch)

    def finish(self, record: Mapping[str, Any]) -> None:
        final = {k: v for k, v in record.items() if k not in self.metadata}
        try:
            self.file.commit(self.store, self.name, final)
        finally:
            self.store.close()

    def stop(self, record: Mapping[str, Any]) -> str:
        self.abort(record)
        return f"partial output discarded after {record['n_images']} images"

    def abort(self, record: Mapping[str, Any]) -> None:
        del record  # a file that never completes leaves no trace to record it in
        try:
            self.file.abort()
        finally:
            self.store.close()


class ParquetPart:
    """A Parquet file written at a staging path (`Store.stage`), committed whole by its store
    once closed. `shown` names its destination in messages."""

    def __init__(
        self, path: Path, schema: pa.Schema, metadata: Mapping[str, Any], *, shown: str
    ) -> None:
        self.path = path
        self.shown = shown
        self.schema = schema.with_metadata(file_metadata(metadata))
        self.rows = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        try:
            self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        except BaseException:  # a full disk can fail the header: leave nothing behind
            path.unlink(missing_ok=True)
            raise

    def write(self, batch: pa.RecordBatch) -> None:
        with write_errors(self.shown):
            self._pending.append(batch)
            self._pending_rows += batch.num_rows
            self.rows += batch.num_rows
            if self._pending_rows >= ROW_GROUP_ROWS:
                self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending, schema=self.schema))
            self._pending, self._pending_rows = [], 0

    def commit(
        self,
        store: Store,
        name: str,
        final_metadata: Mapping[str, Any],
        fence: Fence | None = None,
    ) -> None:
        """Close the file with `final_metadata` in its footer and have `store` make it
        `name`; `fence` runs right before (see `Store.commit`)."""
        try:
            with write_errors(self.shown):
                self._flush()
                self._writer.add_key_value_metadata(file_metadata(final_metadata))
                self._writer.close()
        except BaseException:
            self.abort()  # closes the file too, or a full disk keeps its space
            raise
        store.commit(self.path, name, fence)

    def abort(self) -> None:
        try:
            self._writer.close()
        except OSError:
            pass  # the file is being thrown away; a close error changes nothing
        finally:
            self.path.unlink(missing_ok=True)
