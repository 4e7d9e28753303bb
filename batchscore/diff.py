"""What changed between two scorings of the same images, for `batchscore diff`.

Rescoring after a model change writes new rows under the new model's SHA-256 beside the old
ones; nothing is overwritten. A side of a diff is therefore an output (a Parquet file or a
dataset directory) *and* one model in it. Per side, an image's state is its latest row (by
`scored_at`): an image rescored after a content change, or retried after an error, counts once,
as it is now. Images are matched on `image_id`; only those whose latest row is `ok` on both
sides are compared, and error rows are counted per side.

Memory: each side is read with a column projection (five or six narrow columns, never the
probability vectors) and, for a dataset holding several models, a filter on `model_sha256`
pushed into the Parquet scan. The join holds one row per image per side: O(N); for embeddings,
with each side's vector: O(N x size).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from batchscore.dataset import part_files
from batchscore.errors import ConfigError, GateFailed
from batchscore.names import is_url, redact_url
from batchscore.output import STATUS_OK, FileSink
from batchscore.settings import DEFAULT_MIN_COSINE
from batchscore.store import LocalStore
from batchscore.summary import reason_kind

REQUIRED_COLUMNS = ("image_id", "status", "error", "model_sha256")
PREDICTION_COLUMNS = ("pred_label", "pred_prob")  # a classifier's; an encoder's: "embedding"
EMBEDDING_COLUMN = "embedding"
LABELS_COLUMN = "pred_labels"  # a multi-label model's; compared as sets
LABEL_JOIN = "|"
CHANGED_EMBEDDING_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("cosine", pa.float32()),
        pa.field("a_model_sha256", pa.string()),
        pa.field("b_model_sha256", pa.string()),
    ]
)
CHANGED_COLUMNS = (
    "image_id",
    "path",
    "a_pred_label",
    "a_pred_prob",
    "b_pred_label",
    "b_pred_prob",
    "a_model_sha256",
    "b_model_sha256",
)


@dataclass(frozen=True)
class Side:
    """One side of a diff: which rows, and how many images they hold by status."""

    source: str
    model_sha256: str
    n_images: int
    n_ok: int
    n_errors: int
    error_reasons: Mapping[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "model_sha256": self.model_sha256,
            "n_images": self.n_images,
            "n_ok": self.n_ok,
            "n_errors": self.n_errors,
            "error_reasons": dict(self.error_reasons),
        }


@dataclass(frozen=True)
class Flip:
    """Images whose top-1 label went from `old` (A) to `new` (B)."""

    old: str
    new: str
    count: int


@dataclass(frozen=True)
class DiffReport:
    """The answer of `diff_outputs`; `changed` holds the changed images side by side."""

    a: Side
    b: Side
    n_in_both: int
    n_compared: int  # ok on both sides
    n_changed: int  # compared, and the top-1 label differs
    mean_prob_delta: float | None  # B's top-1 probability minus A's, over compared images
    mean_abs_prob_delta: float | None
    flips: tuple[Flip, ...]  # most frequent first
    changed: pa.Table  # CHANGED_COLUMNS (or CHANGED_EMBEDDING_SCHEMA), sorted by image_id
    # Embeddings: the cosine similarity of each image's two vectors (mean, median, p01, min),
    # and the similarity below which an image counts as changed
    cosine: Mapping[str, float] | None = None
    min_cosine: float | None = None
    # Multi-label: changed means the set of predicted labels changed; how alike the sets are
    mean_jaccard: float | None = None

    @property
    def only_in_a(self) -> int:
        return self.a.n_images - self.n_in_both

    @property
    def only_in_b(self) -> int:
        return self.b.n_images - self.n_in_both

    @property
    def changed_share(self) -> float | None:
        return self.n_changed / self.n_compared if self.n_compared else None

    def as_dict(self, top: int | None = None) -> dict[str, Any]:
        """The report as plain data; `top` keeps only the most frequent flips."""
        shown = self.flips if top is None else self.flips[:top]
        return {
            "a": self.a.as_dict(),
            "b": self.b.as_dict(),
            "n_in_both": self.n_in_both,
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "n_compared": self.n_compared,
            "n_changed": self.n_changed,
            "changed_share": self.changed_share,
            "mean_prob_delta": self.mean_prob_delta,
            "mean_abs_prob_delta": self.mean_abs_prob_delta,
            "n_flip_pairs": len(self.flips),
            "flips": [{"old": f.old, "new": f.new, "count": f.count} for f in shown],
            "cosine": None if self.cosine is None else dict(self.cosine),
            "mean_jaccard": self.mean_jaccard,
            "min_cosine": self.min_cosine,
        }


def diff_outputs(
    a: str | Path,
    b: str | Path | None = None,
    *,
    model_a: str | None = None,
    model_b: str | None = None,
    min_cosine: float | None = None,
) -> DiffReport:
    """Compare the top-1 predictions of two outputs, or of two models in one dataset (b=None);
    for an embedding model's outputs, each image's two vectors by cosine similarity (changed:
    below `min_cosine`).

    `model_a` and `model_b` are SHA-256 prefixes; each may be left out when its output holds a
    single model. Raises ConfigError (exit 2) for a missing or unreadable output, and for a
    prefix that matches no model or several, listing the models present.
    """
    if b is None:
        if model_a is None or model_b is None:
            raise ConfigError("diffing one dataset needs --model-a and --model-b")
        b = a
    same_output = Path(a).resolve() == Path(b).resolve()
    data_a = _open(a)
    data_b = data_a if same_output else _open(b)
    rows_a = _rows_per_model(data_a)
    rows_b = rows_a if same_output else _rows_per_model(data_b)
    sha_a = _pick_model(a, rows_a, model_a, "--model-a")
    sha_b = _pick_model(b, rows_b, model_b, "--model-b")
    if sha_a == sha_b and same_output:
        raise ConfigError(f"both sides are model {sha_a} of {a}: nothing to compare")
    embeddings = [EMBEDDING_COLUMN in data.schema.names for data in (data_a, data_b)]
    if embeddings[0] != embeddings[1]:
        raise ConfigError(
            f"{a if embeddings[0] else b} holds embeddings and {b if embeddings[0] else a} class"
            " predictions: a diff compares two scorings of the same kind"
        )
    if min_cosine is not None and not embeddings[0]:
        raise ConfigError(
            "--min-cosine compares embeddings; these outputs hold class predictions, compared by"
            " top-1 label"
        )
    scores = [EMBEDDING_COLUMN] if embeddings[0] else list(PREDICTION_COLUMNS)
    multi_label = all(LABELS_COLUMN in data.schema.names for data in (data_a, data_b))
    if multi_label:
        scores.append(LABELS_COLUMN)
    latest_a = _latest_rows(data_a, sha_a, scores, with_path=False)
    latest_b = _latest_rows(data_b, sha_b, scores, with_path=True)
    side_a, side_b = _side(str(a), sha_a, latest_a), _side(str(b), sha_b, latest_b)
    vectors = None
    if embeddings[0]:  # Arrow joins no list columns: the vectors are taken by row after
        vectors = (latest_a.column(EMBEDDING_COLUMN), latest_b.column(EMBEDDING_COLUMN))
        latest_a, latest_b = (
            t.drop_columns([EMBEDDING_COLUMN]).append_column("row", pa.array(range(len(t))))
            for t in (latest_a, latest_b)
        )
    joined = _prefixed(latest_a, "a_").join(
        _prefixed(latest_b, "b_"), keys="image_id", join_type="inner"
    )
    ok = pc.and_(
        pc.equal(joined.column("a_status"), STATUS_OK),
        pc.equal(joined.column("b_status"), STATUS_OK),
    )
    compared = joined.filter(ok)
    if vectors is not None:
        return _embedding_report(
            side_a,
            side_b,
            joined.num_rows,
            compared,
            vectors,
            min_cosine=DEFAULT_MIN_COSINE if min_cosine is None else min_cosine,
        )
    delta = pc.subtract(
        compared.column("b_pred_prob").cast(pa.float64()),
        compared.column("a_pred_prob").cast(pa.float64()),
    )
    key = "labels" if multi_label else "pred_label"
    changed = compared.filter(
        pc.not_equal(compared.column(f"a_{key}"), compared.column(f"b_{key}"))
    )
    return DiffReport(
        a=side_a,
        b=side_b,
        n_in_both=joined.num_rows,
        n_compared=compared.num_rows,
        n_changed=changed.num_rows,
        mean_prob_delta=pc.mean(delta).as_py(),
        mean_abs_prob_delta=pc.mean(pc.abs(delta)).as_py(),
        flips=_flips(changed),
        changed=_side_by_side(changed, sha_a, sha_b, multi_label=multi_label),
        mean_jaccard=_mean_jaccard(compared) if multi_label else None,
    )


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row by row; two all-zero vectors are alike (1), one all-zero vector is not (0)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    both_zero = ~a.any(axis=1) & ~b.any(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        similarity = np.where(norms > 0, dots / norms, np.where(both_zero, 1.0, 0.0))
    return np.asarray(similarity)


def _embedding_report(
    side_a: Side,
    side_b: Side,
    n_in_both: int,
    compared: pa.Table,
    latest_vectors: tuple[pa.ChunkedArray, pa.ChunkedArray],
    *,
    min_cosine: float,
) -> DiffReport:
    n = compared.num_rows
    if n == 0:  # nothing in common, or nothing ok on both sides: nothing to compare
        empty = CHANGED_EMBEDDING_SCHEMA.empty_table()
        return DiffReport(side_a, side_b, n_in_both, 0, 0, None, None, (), empty,
                          cosine=None, min_cosine=min_cosine)  # fmt: skip
    vectors = [
        np.asarray(pc.take(column, compared.column(f"{side}_row")).combine_chunks().flatten())
        for column, side in zip(latest_vectors, ("a", "b"), strict=True)
    ]
    if vectors[0].size != vectors[1].size:
        raise ConfigError(
            f"the two sides' embeddings differ in size ({vectors[0].size // max(n, 1)} and"
            f" {vectors[1].size // max(n, 1)}): vectors of two encoders cannot be compared"
        )
    similarity = cosine_similarity(vectors[0].reshape(n, -1), vectors[1].reshape(n, -1))
    changed = similarity < min_cosine
    table = compared.select(["image_id", "path"]).append_column(
        "cosine", pa.array(similarity.astype(np.float32))
    )
    table = table.filter(pa.array(changed))
    table = table.append_column("a_model_sha256", pa.array([side_a.model_sha256] * len(table)))
    table = table.append_column("b_model_sha256", pa.array([side_b.model_sha256] * len(table)))
    cosine = None
    if n:
        cosine = {
            "mean": float(similarity.mean()),
            "median": float(np.median(similarity)),
            "p01": float(np.quantile(similarity, 0.01)),
            "min": float(similarity.min()),
        }
    return DiffReport(
        a=side_a,
        b=side_b,
        n_in_both=n_in_both,
        n_compared=n,
        n_changed=int(changed.sum()),
        mean_prob_delta=None,
        mean_abs_prob_delta=None,
        flips=(),
        changed=table.select(CHANGED_EMBEDDING_SCHEMA.names).sort_by("image_id"),
        cosine=cosine,
        min_cosine=min_cosine,
    )


def check_changed_share(report: DiffReport, max_share: float) -> None:
    """The rescoring guard: GateFailed (exit 3) when more than `max_share` changed top-1.

    It fails closed: with no image scored ok by both models there is nothing to vouch for.
    """
    share = report.changed_share
    if share is None:
        raise GateFailed(
            "no image was scored ok on both sides, so --max-changed-share cannot be checked"
        )
    if share > max_share:
        what = (
            f"(cosine below {report.min_cosine:g})"
            if report.cosine is not None
            else "labels"
            if report.mean_jaccard is not None
            else "top-1"
        )
        raise GateFailed(
            f"{report.n_changed} of {report.n_compared} compared images changed {what}"
            f" ({share:.1%}), more than --max-changed-share {max_share:.1%}"
        )


def write_changed(report: DiffReport, path: str | Path) -> Path:
    """Write the changed images side by side, atomically like every batchscore output."""
    target = Path(path)
    metadata = {
        "a_source": report.a.source,
        "a_model_sha256": report.a.model_sha256,
        "b_source": report.b.source,
        "b_model_sha256": report.b.model_sha256,
        "n_compared": report.n_compared,
        "n_changed": report.n_changed,
    }
    sink = FileSink(LocalStore(target.parent), target.name, report.changed.schema, metadata)
    try:
        for batch in report.changed.to_batches():
            sink.write(batch)
        sink.finish({})
    except BaseException:
        sink.abort({})
        raise
    return target


def _open(output: str | Path) -> ds.Dataset:
    if isinstance(output, str) and is_url(output):
        raise ConfigError(f"batchscore diff reads local outputs only, not {redact_url(output)}")
    path = Path(output)
    if path.is_dir():
        files = [str(part) for part in part_files(path)]
    elif path.is_file():
        files = [str(path)]
    else:
        raise ConfigError(f"no output at {output}")
    if not files:
        raise ConfigError(f"no Parquet files in {output}")
    try:
        dataset = ds.dataset(files, format="parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"cannot read {output}: {exc}") from exc
    names = dataset.schema.names
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if EMBEDDING_COLUMN not in names:
        missing += [name for name in PREDICTION_COLUMNS if name not in names]
    if missing:
        raise ConfigError(f"{output} is not a batchscore output: no column {missing[0]!r}")
    return dataset


def _rows_per_model(dataset: ds.Dataset) -> Counter[str]:
    rows: Counter[str] = Counter()
    for batch in dataset.to_batches(columns=["model_sha256"]):
        counts = pc.value_counts(batch.column("model_sha256")).to_pylist()
        rows.update({entry["values"]: entry["counts"] for entry in counts})
    return rows


def _pick_model(output: str | Path, rows: Counter[str], prefix: str | None, option: str) -> str:
    """The one model of `output` whose SHA-256 starts with `prefix` (any, if it holds one)."""
    matches = [sha for sha in rows if prefix is None or sha.startswith(prefix.lower())]
    if len(matches) == 1:
        return matches[0]
    present = ", ".join(f"{sha} ({n} rows)" for sha, n in sorted(rows.items()))
    if prefix is None:
        problem = f"{output} holds {len(rows)} models; choose one with {option}"
    else:
        kind = "several models" if matches else "no model"
        problem = f"{option} {prefix} matches {kind} in {output}"
    raise ConfigError(f"{problem}; models present: {present or 'none'}")


def _latest_rows(dataset: ds.Dataset, sha: str, scores: list[str], *, with_path: bool) -> pa.Table:
    """One row per image_id: the latest scored, whatever its status, with its `scores`."""
    columns = ["image_id", "status", "error", *scores, "scored_at"]
    if with_path:
        columns.append("path")
    table = dataset.to_table(columns=columns, filter=pc.field("model_sha256") == sha)
    table = table.sort_by([("image_id", "ascending"), ("scored_at", "descending")])
    if LABELS_COLUMN in scores:
        joined = pc.binary_join(table.column(LABELS_COLUMN), LABEL_JOIN)
        table = table.drop_columns([LABELS_COLUMN]).append_column("labels", joined)
    n = table.num_rows
    if n < 2:
        return table
    ids = table.column("image_id").combine_chunks()
    first = pc.not_equal(ids.slice(1), ids.slice(0, n - 1))
    return table.filter(pa.concat_arrays([pa.array([True]), first]))


def _side(source: str, sha: str, latest: pa.Table) -> Side:
    errors = latest.filter(pc.not_equal(latest.column("status"), STATUS_OK))
    reasons = Counter(reason_kind(r or "") for r in errors.column("error").to_pylist())
    return Side(
        source=source,
        model_sha256=sha,
        n_images=latest.num_rows,
        n_ok=latest.num_rows - errors.num_rows,
        n_errors=errors.num_rows,
        error_reasons=dict(reasons.most_common()),
    )


def _prefixed(latest: pa.Table, prefix: str) -> pa.Table:
    keep = ["image_id", "path", "status", *PREDICTION_COLUMNS, "labels", "row"]
    table = latest.select([name for name in keep if name in latest.column_names])
    return table.rename_columns(
        [name if name in ("image_id", "path") else prefix + name for name in table.column_names]
    )


def _flips(changed: pa.Table) -> tuple[Flip, ...]:
    counts = changed.group_by(["a_pred_label", "b_pred_label"]).aggregate([("image_id", "count")])
    flips = [
        Flip(row["a_pred_label"], row["b_pred_label"], row["image_id_count"])
        for row in counts.to_pylist()
        if row["a_pred_label"] != row["b_pred_label"]  # a multi-label row may keep its top-1
    ]
    return tuple(sorted(flips, key=lambda f: (-f.count, f.old, f.new)))


def _side_by_side(changed: pa.Table, sha_a: str, sha_b: str, *, multi_label: bool) -> pa.Table:
    n = changed.num_rows
    table = changed.append_column("a_model_sha256", pa.array([sha_a] * n, pa.string()))
    table = table.append_column("b_model_sha256", pa.array([sha_b] * n, pa.string()))
    labels = ["a_labels", "b_labels"] if multi_label else []  # "cat|sofa": class-map order
    return table.select([*CHANGED_COLUMNS, *labels]).sort_by("image_id")


def _mean_jaccard(compared: pa.Table) -> float | None:
    """How alike each image's two sets of predicted labels are, on average: |A & B| / |A | B|
    (two empty sets are alike)."""
    pairs = zip(
        compared.column("a_labels").to_pylist(),
        compared.column("b_labels").to_pylist(),
        strict=True,
    )
    scores = []
    for a, b in pairs:
        left, right = set(filter(None, a.split(LABEL_JOIN))), set(filter(None, b.split(LABEL_JOIN)))
        union = left | right
        scores.append(len(left & right) / len(union) if union else 1.0)
    return float(np.mean(scores)) if scores else None
