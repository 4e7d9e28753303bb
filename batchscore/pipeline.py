"""How images flow: chunks of paths go to worker processes, scores come back in input order.

Design (measured on a 2-core machine, see README "Performance"): each worker process decodes
and preprocesses its chunk, writes the normalised pixels straight into its own batch buffer,
and runs its own single-threaded ONNX Runtime session on that batch. Only probabilities travel
back to the parent (4 bytes per class per image, instead of ~600 KB of float32 pixels), and no
core waits on another: decode and inference of one chunk happen in the same process, so two
workers keep two cores busy. A separate inference process fed by decode workers lost on heavier
models, and pickling tensors between processes cost 2-3 ms per image.

Memory stays flat: at most `workers * IN_FLIGHT_PER_WORKER` chunks are submitted and not yet
consumed, however many images the sources hold. Results are yielded in input order.

What a decoder prints is not the user's business at 3 a.m.: Pillow's Python warnings and the
C libraries' messages on file descriptor 2 (libtiff writes there) are caught around each image
and land in that image's `warning` column, never on the terminal or in cron mail.

A worker that dies (segfault in a decoder, OOM kill) breaks the pool. The pool is replaced and
the chunks it held are retried one image at a time in a fresh pool; an image that kills its
worker again becomes an error row. Nothing is dropped and the run goes on.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice

import numpy as np
import onnxruntime as ort

from batchscore.model import ModelSpec, create_session, first_line
from batchscore.preprocess import (
    ImageError,
    PreprocessConfig,
    init_pillow,
    load_image,
    normalization_lut,
)
from batchscore.settings import PipelineOptions
from batchscore.sources import ImageRef

IN_FLIGHT_PER_WORKER = 4
PARENT_POLL_S = 1.0
WORKER_DIED = "worker process died while decoding or scoring this image (crash or out-of-memory)"


@dataclass
class ModelScores:
    """One model's scores for a chunk: rows of error images are all zero."""

    probs: np.ndarray  # [n, classes] float32
    topk: np.ndarray  # [n, k] int32, best first


@dataclass
class ChunkOutput:
    """What a worker sends back for a chunk (no pixels, no manifest fields)."""

    errors: list[str | None]
    widths: list[int | None]
    heights: list[int | None]
    scores: list[ModelScores]
    warnings: list[str | None]


@dataclass
class ChunkResult:
    """A chunk's refs with their outputs, handed to the writer in input order."""

    refs: list[ImageRef]
    output: ChunkOutput
    finished_at: datetime


Task = list[tuple[str | None, str | None]]  # (path, problem) per image


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probs: np.ndarray = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
    return probs


def top_k_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values per row, best first; ties keep class-map order."""
    order: np.ndarray = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return order.astype(np.int32)


class Scorer:
    """Per-process state: one session per model and reusable batch buffers."""

    def __init__(self, specs: Sequence[ModelSpec], options: PipelineOptions) -> None:
        self.specs = list(specs)
        self.options = options
        self.sessions = [create_session(spec, options.threads_per_worker) for spec in specs]
        self.luts = {spec.preprocess: normalization_lut(spec.preprocess) for spec in specs}
        init_pillow()

    def score(self, task: Task) -> ChunkOutput:
        n = len(task)
        errors: list[str | None] = [problem for _, problem in task]
        widths: list[int | None] = [None] * n
        heights: list[int | None] = [None] * n
        notes: list[list[str]] = [[] for _ in range(n)]
        pixels: dict[PreprocessConfig, list[np.ndarray | None]] = {}
        for config in self.luts:  # decode once per distinct preprocessing, not per model
            pixels[config] = [None] * n
            for i, (path, _) in enumerate(task):
                if errors[i] is not None or path is None:
                    continue
                with c_stderr_into(notes[i]):
                    try:
                        decoded = load_image(
                            path,
                            config,
                            max_pixels=self.options.max_pixels,
                            fast_jpeg=self.options.fast_jpeg,
                        )
                    except ImageError as exc:
                        errors[i] = str(exc)
                        continue
                notes[i] += decoded.warnings
                pixels[config][i] = decoded.pixels
                widths[i], heights[i] = decoded.width, decoded.height
        all_probs = [
            self._infer(spec, session, pixels[spec.preprocess], errors)
            for spec, session in zip(self.specs, self.sessions, strict=True)
        ]
        for i, error in enumerate(errors):
            if error is not None:  # also clears scores of an image a later model rejected
                widths[i] = heights[i] = None
                for probs in all_probs:
                    probs[i] = 0.0
        k = self.options.top_k
        scores = [ModelScores(probs=probs, topk=top_k_indices(probs, k)) for probs in all_probs]
        warnings = [
            "; ".join(dict.fromkeys(found)) if found and error is None else None
            for found, error in zip(notes, errors, strict=True)
        ]
        return ChunkOutput(errors, widths, heights, scores, warnings)

    def _infer(
        self,
        spec: ModelSpec,
        session: ort.InferenceSession,
        images: list[np.ndarray | None],
        errors: list[str | None],
    ) -> np.ndarray:
        probs = np.zeros((len(images), spec.num_classes), dtype=np.float32)
        ok = [i for i, image in enumerate(images) if image is not None and errors[i] is None]
        if not ok:
            return probs
        batch = self._batch(spec, [images[i] for i in ok])  # type: ignore[misc]
        try:
            outputs = self._run(spec, session, batch)
        except Exception:  # isolate the image ORT rejects instead of failing the chunk
            outputs = np.zeros((len(ok), spec.num_classes), dtype=np.float32)
            for row, i in enumerate(ok):
                try:
                    outputs[row] = self._run(spec, session, batch[row : row + 1])[0]
                except Exception as exc:
                    errors[i] = f"inference failed: {first_line(exc)}"
        if spec.preprocess.output == "logits":
            outputs = softmax(outputs)
        probs[ok] = outputs
        return probs

    def _batch(self, spec: ModelSpec, images: list[np.ndarray]) -> np.ndarray:
        height, width = spec.preprocess.input_size
        batch = np.empty((len(images), 3, height, width), dtype=spec.input_dtype)
        lut = self.luts[spec.preprocess]
        for row, pixels in enumerate(images):
            for channel in range(3):
                if spec.input_dtype == "uint8":  # the model normalises inside its graph
                    batch[row, channel] = pixels[:, :, channel]
                else:
                    np.take(lut[channel], pixels[:, :, channel], out=batch[row, channel])
        return batch

    def _run(self, spec: ModelSpec, session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
        if spec.fixed_batch is None:
            return np.asarray(session.run(None, {spec.input_name: batch})[0], dtype=np.float32)
        size = spec.fixed_batch  # a model exported with a fixed batch axis: pad the last piece
        pieces = []
        for start in range(0, len(batch), size):
            piece = batch[start : start + size]
            if len(piece) < size:
                pad = np.zeros((size - len(piece), *piece.shape[1:]), dtype=piece.dtype)
                piece = np.concatenate([piece, pad])
            out = session.run(None, {spec.input_name: piece})[0]
            pieces.append(np.asarray(out, dtype=np.float32)[: min(size, len(batch) - start)])
        return np.concatenate(pieces)


@contextmanager
def c_stderr_into(notes: list[str]) -> Iterator[None]:
    """Catch what C code writes to file descriptor 2 meanwhile, and add it to `notes`.

    The descriptor points at an anonymous temporary file for the duration and is restored
    after, so a decoder's message lands in its image's row, not on the terminal."""
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read(4096).decode("utf-8", "replace")
            notes += [line.strip() for line in text.splitlines() if line.strip()]


_WORKER: Scorer | None = None


def _init_worker(specs: Sequence[ModelSpec], options: PipelineOptions, parent: int) -> None:
    # Ctrl-C goes to the whole process group; only the parent decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # `parent` comes from the parent itself: a worker started after its parent died sees
    # another getppid() at once and exits.
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    global _WORKER
    _WORKER = Scorer(specs, options)


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed (SIGKILL, OOM) must not live on holding a session."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _score_in_worker(task: Task) -> ChunkOutput:
    assert _WORKER is not None, "worker used before _init_worker"
    return _WORKER.score(task)


def _task(refs: list[ImageRef]) -> Task:
    return [(ref.path, ref.problem) for ref in refs]


def _chunks(refs: Iterable[ImageRef], size: int) -> Iterator[list[ImageRef]]:
    iterator = iter(refs)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _now() -> datetime:
    return datetime.now(timezone.utc)


class _Pool:
    """A process pool that can be replaced when one of its workers dies."""

    def __init__(self, specs: Sequence[ModelSpec], options: PipelineOptions) -> None:
        self.specs = specs
        self.options = options
        self.executor = self._new()

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.options.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.specs, self.options, os.getpid()),
        )

    def submit(self, refs: list[ImageRef]) -> Future[ChunkOutput]:
        return self.executor.submit(_score_in_worker, _task(refs))

    def replace(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.executor = self._new()

    def close(self, *, force: bool = False) -> None:
        """Wait for the workers to exit; with `force`, terminate them first (they may hang)."""
        if force:
            for process in list(getattr(self.executor, "_processes", {}).values()):
                process.terminate()
        self.executor.shutdown(wait=True, cancel_futures=True)

    def isolate(self, refs: list[ImageRef]) -> ChunkOutput:
        """Score a chunk one image at a time so that only a poisonous image is lost."""
        parts = []
        for ref in refs:
            try:
                parts.append(self.submit([ref]).result())
            except BrokenProcessPool:  # this image killed a fresh worker: it is the culprit
                self.replace()
                parts.append(failed_output(1, WORKER_DIED, self.specs, self.options.top_k))
        return concat_outputs(parts)


def failed_output(n: int, reason: str, specs: Sequence[ModelSpec], k: int) -> ChunkOutput:
    return ChunkOutput(
        errors=[reason] * n,
        widths=[None] * n,
        heights=[None] * n,
        warnings=[None] * n,
        scores=[
            ModelScores(
                probs=np.zeros((n, spec.num_classes), dtype=np.float32),
                topk=np.zeros((n, min(k, spec.num_classes)), dtype=np.int32),
            )
            for spec in specs
        ],
    )


def concat_outputs(parts: list[ChunkOutput]) -> ChunkOutput:
    n_models = len(parts[0].scores)
    return ChunkOutput(
        errors=[e for p in parts for e in p.errors],
        widths=[w for p in parts for w in p.widths],
        heights=[h for p in parts for h in p.heights],
        warnings=[w for p in parts for w in p.warnings],
        scores=[
            ModelScores(
                probs=np.concatenate([p.scores[m].probs for p in parts]),
                topk=np.concatenate([p.scores[m].topk for p in parts]),
            )
            for m in range(n_models)
        ],
    )


def run_pipeline(
    refs: Iterable[ImageRef],
    specs: Sequence[ModelSpec],
    options: PipelineOptions,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[ChunkResult]:
    """Score every ref with every model, yielding chunk results in input order.

    `should_stop` is polled before each new chunk: once it returns True, no new work is taken,
    the chunks already submitted are finished and yielded, and the generator ends.
    """
    chunks = _chunks(refs, options.batch_size)
    if options.workers <= 0:
        scorer = Scorer(specs, options)
        for chunk in chunks:
            if should_stop():
                return
            yield ChunkResult(chunk, scorer.score(_task(chunk)), _now())
        return
    pool = _Pool(specs, options)
    window: Window = deque()
    limit = options.workers * IN_FLIGHT_PER_WORKER
    finished = False
    try:
        for chunk in chunks:
            if should_stop():
                break
            try:
                window.append((chunk, pool.submit(chunk)))
            except BrokenProcessPool:  # a worker died between two submits
                window.append((chunk, None))
                yield from _recover(window, pool)
                continue
            if len(window) >= limit:
                yield from _take_head(window, pool)
        while window:
            yield from _take_head(window, pool)
        finished = True
    finally:
        pool.close(force=not finished)


Window = deque[tuple[list[ImageRef], "Future[ChunkOutput] | None"]]


def _take_head(window: Window, pool: _Pool) -> Iterator[ChunkResult]:
    chunk, future = window[0]
    try:
        assert future is not None  # only _recover sees chunks that were never submitted
        output = future.result()
    except BrokenProcessPool:
        yield from _recover(window, pool)
        return
    window.popleft()
    yield ChunkResult(chunk, output, _now())


def _recover(window: Window, pool: _Pool) -> Iterator[ChunkResult]:
    """A worker died: keep what finished, retry the rest one image at a time, in order."""
    pending = list(window)
    window.clear()
    pool.replace()
    for refs, future in pending:
        finished = (
            future is not None
            and future.done()
            and not future.cancelled()
            and future.exception() is None
        )
        output = future.result() if finished and future is not None else pool.isolate(refs)
        yield ChunkResult(refs, output, _now())
