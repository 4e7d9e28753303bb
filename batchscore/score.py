"""The scoring job: sources -> an engine -> a sink, with counts, progress and clean stops.

`score()` is the library entry point behind `batchscore score`; it is usable without the CLI.
"""

from __future__ import annotations

import multiprocessing
import os
import posixpath
import re
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pyarrow as pa
from tqdm import tqdm

from batchscore import __version__, storage
from batchscore.dataset import (
    DatasetWriter,
    is_dataset_path,
    remove_stale_temporaries,
    settle_dead_attempts,
)
from batchscore.engines import RunContext, engine
from batchscore.errors import ConfigError, ErrorRateExceeded, Interrupted, OutputError
from batchscore.incremental import DoneSet, SkipCounter, load_done, skip_done, with_fingerprints
from batchscore.model import load_model
from batchscore.names import has_surrogates, is_url, readable, redact_url, written_name
from batchscore.output import FileSink, OutputLayout, Sink, output_schema
from batchscore.settings import BASELINE_PREFIX, FINGERPRINTS, ScoreSettings
from batchscore.signals import StopFlag
from batchscore.sources import Source, iter_refs, merged_extra_columns, open_sources
from batchscore.spec import ModelSpec
from batchscore.store import Held, open_store, split
from batchscore.summary import RunStats, RunSummary

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def new_run_id() -> str:
    """Sortable and unique: UTC time first, then randomness."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


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
            labels=settings.labels if i == 0 else None,
            output_name=settings.output_name if i == 0 else None,
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
    if settings.lock_lease_s <= 0:
        raise ConfigError("the lock lease must be positive")
    if settings.part_rows < 1 or settings.part_seconds <= 0:
        raise ConfigError("part rows and part seconds must be positive")
    rate = settings.max_error_rate
    if rate is not None and not 0 <= rate <= 1:
        raise ConfigError("max error rate must be between 0 and 1")
    if settings.run_id is not None and not RUN_ID.fullmatch(settings.run_id):
        raise ConfigError(
            f"run id {settings.run_id!r} may hold only letters, digits, '.', '_' and '-'"
            " (it names files), and must start with a letter or digit"
        )


def run_metadata(
    specs: Sequence[ModelSpec], sources: Sequence[Source], run_id: str, settings: ScoreSettings
) -> dict[str, Any]:
    """Provenance stored in every output file's key-value metadata (and in run summaries).

    With a baseline model, its SHA-256, file and class names are recorded too, so a reader
    (the canary) never has to load the baseline again to interpret its columns."""
    spec = specs[0]
    metadata = {
        "run_id": run_id,
        "model_sha256": spec.sha256,
        "setup_sha256": spec.setup_sha256,
        "model_file": spec.file_name,
        "class_map": list(spec.class_names),
        "head": spec.head,
        "preprocess": spec.preprocess.to_dict(),
        "top_k": settings.pipeline.top_k,
        "fast_jpeg": settings.pipeline.fast_jpeg,
        "sources": [str(source) for source in sources],
        "batchscore_version": __version__,
        "onnxruntime_version": ort.__version__,
        "model_notes": list(spec.notes),
    }
    if spec.head == "multi-label":
        metadata["thresholds"] = dict(zip(spec.class_names, spec.thresholds, strict=True))
    if spec.head == "embedding":
        metadata["embedding_size"] = spec.embedding_size
    if len(specs) > 1:
        metadata["baseline_model_sha256"] = specs[1].sha256
        metadata["baseline_model_file"] = specs[1].file_name
        metadata["baseline_class_map"] = list(specs[1].class_names)
        metadata["baseline_model_notes"] = list(specs[1].notes)
        metadata["baseline_head"] = specs[1].head
        if specs[1].head == "multi-label":
            thresholds = zip(specs[1].class_names, specs[1].thresholds, strict=True)
            metadata["baseline_thresholds"] = dict(thresholds)
    return metadata


def score(
    sources: Sequence[str | Path], output: str | Path, settings: ScoreSettings | None = None
) -> RunSummary:
    """Score every image of `sources` into `output`; return the run's summary.

    `output` is a Parquet file, or a dataset directory (existing, or a path ending in '/' or
    without a suffix); either may be a bucket URL (s3://, gs://, az://), and sources may be
    URLs too (docs/object-storage.md). A dataset run holds the directory's lock, skips images
    this model has already scored there (so re-running a killed run finishes it, and never
    duplicates a row), commits parts as they fill, and writes a summary JSON under DIR/_runs/.

    Raises ConfigError (nothing written) before any image is read when a source, the model or
    the output is unusable; LockHeld when another run writes the dataset; ErrorRateExceeded
    after writing when too many images failed; Interrupted after SIGINT/SIGTERM (a dataset
    keeps its committed parts and resumes on the next run; a file output is discarded).
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # A spawn worker is starting by re-running a script that calls score() without the
        # `if __name__ == "__main__":` guard. Leave quietly: the parent's pool sees the dead
        # worker at start-up and raises a ConfigError that names the fix.
        os._exit(1)
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
    engine(settings.engine)  # an unknown engine or a missing extra fails before any work
    if settings.engine == "dask" and not dataset:
        raise ConfigError("--engine dask writes one part per partition: -o must be a directory")
    options = settings.storage_options
    if not dataset:
        opened = open_sources(
            sources, labelled_folders=settings.labelled_folders, storage_options=options
        )
        specs = load_models(settings)
        split(output, options)[0].prepare()
        return _run(opened, output, specs, settings, done=None)
    # The lock comes first: a second run of a nightly job must leave at once, before it
    # spends seconds loading and test-running the model.
    store = open_store(output, options)
    with store.lock(wait=settings.wait_lock, lease_s=settings.lock_lease_s) as held:
        opened = open_sources(
            sources,
            labelled_folders=settings.labelled_folders,
            storage_options=options,
            allow_empty=settings.incremental,  # an empty uploads folder: a night with none
        )
        specs = load_models(settings)
        remove_stale_temporaries(store)
        settle_dead_attempts(store)
        done = load_done(
            output,
            None if settings.any_model else specs[0].sha256,
            use_fingerprint=settings.incremental,
            include_errors=not settings.retry_errors,
            setup_sha256=None if settings.any_model else specs[0].setup_sha256,
            storage_options=options,
        )
        return _run(opened, output, specs, settings, done=done, held=held)


def check_output(output: str | Path) -> bool:
    """Whether `output` is a dataset directory; raises OutputError when it is neither that
    nor a `.parquet` file name."""
    if not str(output).strip():
        raise OutputError("empty output path: give a .parquet file or a dataset directory")
    if isinstance(output, str) and is_url(output):
        storage.check_url(output)
        if storage.scheme(output) in ("http", "https"):
            raise OutputError(
                f"output {redact_url(output)}: a web server is a source only; write to a"
                " bucket (s3://, gs://, az://) or a local path"
            )
        suffix = posixpath.splitext(output)[1].lower()
        if output.endswith("/") or not suffix:
            return True
        if suffix != ".parquet":
            raise OutputError(
                f"output {redact_url(output)} is neither a .parquet object nor a prefix ending"
                " in '/': batchscore writes Parquet, to FILE.parquet or DIR/"
            )
        return False
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
    output: str | Path,
    specs: list[ModelSpec],
    settings: ScoreSettings,
    *,
    done: DoneSet | None,
    held: Held | None = None,
) -> RunSummary:
    spec = specs[0]
    run_id = settings.run_id or new_run_id()
    layout = OutputLayout(
        extra_columns=merged_extra_columns(opened),
        has_label=any(source.has_labels for source in opened),
        keep_probs=settings.keep_probs,
        prefixes=("", BASELINE_PREFIX)[: len(specs)],
        heads=[(spec.head, spec.embedding_size) for spec in specs],
    )
    metadata = run_metadata(specs, opened, run_id, settings)
    sink = _open_sink(
        output, output_schema(layout), metadata, run_id, settings, dataset=done, held=held
    )
    started_at = datetime.now(timezone.utc)
    scored = engine(settings.engine)
    assumed = tuple(note for s in specs for note in s.notes if note.startswith("assumed"))
    stats = RunStats()
    skips = SkipCounter()
    stop = StopFlag()
    started = time.perf_counter()
    refs = with_fingerprints(
        iter_refs(opened),
        settings.fingerprint,
        stop,
        storage_options=settings.storage_options if settings.incremental else None,
    )
    if done is not None:
        refs = skip_done(refs, done, skips)

    def summarize(status: str) -> tuple[RunSummary, dict[str, Any]]:
        elapsed = time.perf_counter() - started
        details = {
            **stats.as_dict(),
            "n_skipped": skips.skipped,
            "skipped_by": "any model" if settings.any_model else "this model",
        }
        shown = written_name(str(output))
        summary = RunSummary(run_id, shown, spec.sha256, details, elapsed, assumed)
        record = {
            **details,
            "status": status,
            "output": shown,
            "started_at": started_at.isoformat(),
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "elapsed_s": elapsed,
            "images_per_s": summary.images_per_s,
            "incremental": settings.incremental,
            "fingerprint": settings.fingerprint,
        }
        return summary, record

    try:
        if isinstance(sink, DatasetWriter):
            sink.begin(summarize("running")[1])
        with stop.installed(), _progress(opened, settings.progress) as bar:
            context = RunContext(specs, settings, layout, run_id)
            for batch in scored(refs, context, sink, stop):
                stats.add(batch)
                bar.update(stats.n_images + skips.skipped - bar.n)
        if stop.signum is not None:
            kept = sink.stop(summarize("interrupted")[1])
            raise Interrupted(
                f"stopped by signal {stop.signum}: {kept}; run the same command again to finish",
                stop.signum,
            )
        summary, record = summarize("complete")
        sink.finish(record)
    except Interrupted:
        raise
    except BaseException:
        sink.abort(summarize("failed")[1])
        raise
    _check_error_rate(summary, settings.max_error_rate)
    return summary


def _open_sink(
    output: str | Path,
    schema: pa.Schema,
    metadata: dict[str, Any],
    run_id: str,
    settings: ScoreSettings,
    *,
    dataset: DoneSet | None,
    held: Held | None,
) -> Sink:
    """A file, or (when the dataset's state was read under its lock) the dataset; in a bucket
    when `output` is a URL."""
    options = settings.storage_options
    if dataset is None:
        folder, name = split(output, options)
        return FileSink(folder, name, schema, metadata)
    assert held is not None, "a dataset is written under its lock"
    return DatasetWriter(
        open_store(output, options),
        schema,
        metadata,
        run_id=run_id,
        fence=held.check,
        part_rows=settings.part_rows,
        part_seconds=settings.part_seconds,
    )


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
