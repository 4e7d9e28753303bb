"""The scoring job: sources -> pipeline -> Parquet, with counts, progress and clean stops.

`score()` is the library entry point behind `batchscore score`; it is usable without the CLI.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pyarrow as pa
from tqdm import tqdm

from batchscore import __version__
from batchscore.dataset import (
    DatasetWriter,
    is_dataset_path,
    output_lock,
    remove_stale_temporaries,
    write_summary,
)
from batchscore.errors import (
    ConfigError,
    ErrorRateExceeded,
    Interrupted,
    OutputError,
    WriteFailed,
)
from batchscore.incremental import (
    DoneSet,
    SkipCounter,
    load_done,
    skip_done,
    with_fingerprints,
)
from batchscore.model import ModelSpec, load_model
from batchscore.names import has_surrogates, readable
from batchscore.output import (
    STATUS_OK,
    AtomicParquetFile,
    OutputLayout,
    chunk_to_batch,
    output_schema,
    remove_stale_file_temporaries,
)
from batchscore.pipeline import run_pipeline
from batchscore.settings import BASELINE_PREFIX, ENGINES, FINGERPRINTS, ScoreSettings
from batchscore.sources import ImageRef, Source, iter_refs, merged_extra_columns, open_sources

LOW_CONFIDENCE = 0.5  # top-1 probability below this counts as low-confidence (drift signal)


@dataclass
class RunStats:
    """Counts gathered while streaming; everything the summary needs, nothing per row."""

    n_ok: int = 0
    n_errors: int = 0
    error_reasons: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)
    top1_prob_sum: float = 0.0
    n_low_confidence: int = 0

    @property
    def n_images(self) -> int:
        return self.n_ok + self.n_errors

    def add(self, batch: pa.RecordBatch) -> None:
        status = batch.column("status").to_numpy(zero_copy_only=False)
        ok = status == STATUS_OK
        self.n_ok += int(ok.sum())
        self.n_errors += int((~ok).sum())
        for reason in batch.column("error").drop_null().to_pylist():
            self.error_reasons[reason_kind(reason)] += 1
        if ok.any():
            labels = batch.column("pred_label").drop_null().to_pylist()
            self.classes.update(labels)
            probs = batch.column("pred_prob").drop_null().to_numpy()
            self.top1_prob_sum += float(probs.sum())
            self.n_low_confidence += int((probs < LOW_CONFIDENCE).sum())

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_images": self.n_images,
            "n_ok": self.n_ok,
            "n_errors": self.n_errors,
            "error_reasons": dict(self.error_reasons.most_common()),
            "mean_top1_prob": self.top1_prob_sum / self.n_ok if self.n_ok else None,
            "low_confidence_share": self.n_low_confidence / self.n_ok if self.n_ok else None,
            "low_confidence_threshold": LOW_CONFIDENCE,
            "class_distribution": dict(self.classes.most_common()),
        }


def reason_kind(reason: str) -> str:
    """Group error reasons by kind: 'corrupt or truncated image: <details>' -> its prefix."""
    return reason.split(":", 1)[0]


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    output: str
    model_sha256: str
    stats: dict[str, Any]
    elapsed_s: float

    @property
    def images_per_s(self) -> float:
        return self.stats["n_images"] / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        s = self.stats
        skipped = s.get("n_skipped", 0)
        if s["n_images"] == 0:
            return f"nothing new to score ({skipped} images already scored) -> {self.output}"
        already = f" ({skipped} already scored by this model, skipped)" if skipped else ""
        noun = "image" if s["n_images"] == 1 else "images"
        return (
            f"{s['n_images']} {noun}: {s['n_ok']} ok, {s['n_errors']} errors{already},"
            f" {self.images_per_s:.1f} images/s, {self.elapsed_s:.1f} s -> {self.output}"
        )


def new_run_id() -> str:
    """Sortable and unique: UTC time first, then randomness."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


class StopFlag:
    """Set by SIGINT/SIGTERM: the pipeline takes no new work and the run commits what it has.

    A second signal does not wait for work in flight (a decode stuck on a dead network mount,
    say): it raises Interrupted at once, the current file or part is dropped, and parts
    committed earlier stay.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: object) -> None:
            if self.signum is not None:
                raise Interrupted(f"stopped at once by a second signal {signum}", signum)
            self.signum = signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def load_models(settings: ScoreSettings) -> list[ModelSpec]:
    """The model to score and, when given, the baseline scored beside it."""
    locations = [settings.model]
    if settings.baseline_model is not None:
        locations.append(settings.baseline_model)
    return [
        load_model(
            location,
            preprocess_overrides=settings.preprocess_overrides,
            expected_sha256=settings.model_sha256 if i == 0 else None,
            providers=settings.providers,
        )
        for i, location in enumerate(locations)
    ]


def check_settings(settings: ScoreSettings) -> None:
    options = settings.pipeline
    if options.batch_size < 1:
        raise ConfigError("batch size must be at least 1")
    if options.top_k < 1:
        raise ConfigError("top-k must be at least 1")
    if options.workers < 0:
        raise ConfigError("workers must be 0 (score in this process) or more")
    if options.max_pixels < 1:
        raise ConfigError("max pixels must be positive")
    if settings.fingerprint not in FINGERPRINTS:
        raise ConfigError(f"fingerprint must be one of {FINGERPRINTS}")
    if settings.part_rows < 1 or settings.part_seconds <= 0:
        raise ConfigError("part rows and part seconds must be positive")
    rate = settings.max_error_rate
    if rate is not None and not 0 <= rate <= 1:
        raise ConfigError("max error rate must be between 0 and 1")


def run_metadata(
    spec: ModelSpec, sources: Sequence[Source], run_id: str, settings: ScoreSettings
) -> dict[str, Any]:
    """Provenance stored in every output file's key-value metadata."""
    return {
        "run_id": run_id,
        "model_sha256": spec.sha256,
        "model_file": spec.file_name,
        "class_map": list(spec.class_names),
        "preprocess": spec.preprocess.to_dict(),
        "top_k": settings.pipeline.top_k,
        "fast_jpeg": settings.pipeline.fast_jpeg,
        "sources": [str(source) for source in sources],
        "batchscore_version": __version__,
        "onnxruntime_version": ort.__version__,
    }


def open_output_file(
    path: Path, layout: OutputLayout, metadata: Mapping[str, Any]
) -> AtomicParquetFile:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return AtomicParquetFile(path, output_schema(layout), metadata)
    except OSError as exc:
        raise OutputError(f"cannot write output {path}: {exc.strerror or exc}") from exc


def score(
    sources: Sequence[str | Path], output: str | Path, settings: ScoreSettings | None = None
) -> RunSummary:
    """Score every image of `sources` into `output`; return the run's summary.

    `output` is a Parquet file, or a dataset directory (existing, or a path ending in '/' or
    without a suffix). A dataset run holds the directory's lock, skips images this model has
    already scored there (so re-running a killed run finishes it, and never duplicates a row),
    commits parts as they fill, and writes a summary JSON under DIR/_runs/.

    Raises ConfigError (nothing written) before any image is read when a source, the model or
    the output is unusable; LockHeld when another run writes the dataset; ErrorRateExceeded
    after writing when too many images failed; Interrupted after SIGINT/SIGTERM (a dataset
    keeps its committed parts and resumes on the next run; a file output is discarded).
    """
    settings = settings or ScoreSettings()
    check_settings(settings)
    dataset = check_output(output)
    if settings.incremental and not dataset:
        raise ConfigError("--incremental needs a dataset directory as output (-o DIR/)")
    if settings.fingerprint == "sha256" and not settings.incremental:
        raise ConfigError(
            "--fingerprint sha256 only tells --incremental how to spot changed files:"
            " add --incremental (and a dataset output), or leave it out"
        )
    if settings.engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}")
    if settings.engine == "dask" and not dataset:
        raise ConfigError("--engine dask writes one part per partition: -o must be a directory")
    if not dataset:
        opened = open_sources(sources, labelled_folders=settings.labelled_folders)
        specs = load_models(settings)
        remove_stale_file_temporaries(Path(output))
        return _run(opened, Path(output), specs, settings, done=None)
    root = Path(output)
    # The lock comes first: a second run of a nightly job must leave at once, before it
    # spends seconds loading and test-running the model.
    with output_lock(root, wait=settings.wait_lock):
        opened = open_sources(sources, labelled_folders=settings.labelled_folders)
        specs = load_models(settings)
        remove_stale_temporaries(root)
        done = load_done(
            root,
            specs[0].sha256,
            use_fingerprint=settings.incremental,
            include_errors=not settings.retry_errors,
        )
        return _run(opened, root, specs, settings, done=done)


def check_output(output: str | Path) -> bool:
    """Whether `output` is a dataset directory; raises OutputError when it is neither that
    nor a `.parquet` file name."""
    if not str(output).strip():
        raise OutputError("empty output path: give a .parquet file or a dataset directory")
    if has_surrogates(os.path.abspath(output)):
        raise OutputError(
            f"output path {readable(os.path.abspath(output))!r} is not valid UTF-8, which"
            " Parquet writers cannot open: choose a UTF-8 name (inputs may have any name)"
        )
    if is_dataset_path(output):
        return True
    if Path(output).suffix.lower() != ".parquet":
        raise OutputError(
            f"output {output} is neither a .parquet file name nor a directory:"
            " batchscore writes Parquet, to FILE.parquet or DIR/"
        )
    return False


def _run(
    opened: Sequence[Source],
    output: Path,
    specs: list[ModelSpec],
    settings: ScoreSettings,
    *,
    done: DoneSet | None,
) -> RunSummary:
    spec = specs[0]
    run_id = settings.run_id or new_run_id()
    layout = OutputLayout(
        extra_columns=merged_extra_columns(opened),
        has_label=any(source.has_labels for source in opened),
        keep_probs=settings.keep_probs,
        prefixes=("", BASELINE_PREFIX)[: len(specs)],
    )
    metadata = run_metadata(spec, opened, run_id, settings)
    if len(specs) > 1:
        metadata["baseline_model_sha256"] = specs[1].sha256
        metadata["baseline_model_file"] = specs[1].file_name
    sink: AtomicParquetFile | DatasetWriter
    if done is None:
        sink = open_output_file(output, layout, metadata)
    else:
        sink = DatasetWriter(
            output,
            output_schema(layout),
            metadata,
            run_id=run_id,
            part_rows=settings.part_rows,
            part_seconds=settings.part_seconds,
        )
    stats = RunStats()
    skips = SkipCounter()
    stop = StopFlag()
    started_at = datetime.now(timezone.utc)
    started = time.perf_counter()
    refs = with_fingerprints(iter_refs(opened), settings.fingerprint, stop)
    if done is not None:
        refs = skip_done(refs, done, skips)

    def summarize(status: str) -> RunSummary:
        elapsed = time.perf_counter() - started
        details = {**stats.as_dict(), "n_skipped": skips.skipped}
        summary = RunSummary(run_id, str(output), spec.sha256, details, elapsed)
        if isinstance(sink, DatasetWriter):
            record = {
                **metadata,
                **details,
                "status": status,
                "output": str(output),
                "started_at": started_at.isoformat(),
                "finished_at": datetime.now(timezone.utc).isoformat(),
                "elapsed_s": elapsed,
                "images_per_s": summary.images_per_s,
                "incremental": settings.incremental,
                "fingerprint": settings.fingerprint,
                "parts": sink.parts,
            }
            record.pop("class_map", None)  # in every part already; keeps summaries small
            write_summary(output, record)
        return summary

    try:
        with stop.installed(), _progress(opened, settings.progress) as bar:
            context = RunContext(specs, settings, layout, run_id)
            for batch in _scored_batches(refs, context, sink, stop):
                stats.add(batch)
                bar.update(stats.n_images + skips.skipped - bar.n)
        if stop.signum is not None:
            if isinstance(sink, DatasetWriter):
                sink.commit({})
                summarize("interrupted")
                kept = f"{stats.n_images} images scored and committed"
            else:
                sink.abort()
                kept = f"partial output discarded after {stats.n_images} images"
            raise Interrupted(
                f"stopped by signal {stop.signum}: {kept}; run the same command again to finish",
                stop.signum,
            )
        sink.commit({**stats.as_dict(), "n_skipped": skips.skipped})
        summary = summarize("complete")
    except Interrupted:
        raise
    except BaseException:
        sink.abort()
        if isinstance(sink, DatasetWriter):
            with suppress(WriteFailed):  # best effort: the disk may be what failed
                summarize("failed")
        raise
    _check_error_rate(summary, settings.max_error_rate)
    return summary


@dataclass(frozen=True)
class RunContext:
    """What every part of one run shares, whichever engine scores it."""

    specs: list[ModelSpec]
    settings: ScoreSettings
    layout: OutputLayout
    run_id: str


def _scored_batches(
    refs: Iterator[ImageRef],
    context: RunContext,
    sink: AtomicParquetFile | DatasetWriter,
    stop: StopFlag,
) -> Iterator[pa.RecordBatch]:
    """Score and write; yield what was written (at least the columns RunStats reads)."""
    if context.settings.engine == "dask":
        assert isinstance(sink, DatasetWriter)  # score() allows dask for datasets only
        yield from _dask_batches(refs, context, sink, stop)
        return
    for result in run_pipeline(refs, context.specs, context.settings.pipeline, stop):
        batch = chunk_to_batch(result, context.specs, sink.schema, context.layout, context.run_id)
        sink.write(batch)
        yield batch


def _dask_batches(
    refs: Iterator[ImageRef], context: RunContext, sink: DatasetWriter, stop: StopFlag
) -> Iterator[pa.RecordBatch]:
    """The Dask engine, imported only when asked for (it is an optional extra)."""
    try:
        from batchscore.dask_engine import score_on_dask  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(
            f"--engine dask needs Dask: pip install 'batchscore[dask]' ({exc})"
        ) from exc
    yield from score_on_dask(refs, context, sink, stop)


def _check_error_rate(summary: RunSummary, max_error_rate: float | None) -> None:
    n = summary.stats["n_images"]
    if max_error_rate is None or n == 0:
        return
    rate = summary.stats["n_errors"] / n
    if rate > max_error_rate:
        raise ErrorRateExceeded(
            summary,
            f"{summary.stats['n_errors']} of {n} images failed ({rate:.1%}), more than"
            f" --max-error-rate {max_error_rate:.1%}; output written to {summary.output}",
        )


@contextmanager
def _progress(sources: Sequence[Source], enabled: bool) -> Iterator[tqdm[Any]]:
    show = enabled and sys.stderr.isatty()
    total = sum(source.count() for source in sources) if show else None
    with tqdm(total=total, unit="img", disable=not show, file=sys.stderr) as bar:
        yield bar
