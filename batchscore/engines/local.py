"""The local engine: chunks of paths go to worker processes, scores come back in input order.

Design (measured on a 2-core machine, see docs/performance.md): each worker process decodes
and preprocesses its chunk, writes the normalised pixels straight into its own batch buffer,
and runs its own single-threaded ONNX Runtime session on that batch. Only probabilities travel
back to the parent (4 bytes per class per image, instead of ~600 KB of float32 pixels), and no
core waits on another: decode and inference of one chunk happen in the same process, so two
workers keep two cores busy. A separate inference process fed by decode workers lost on heavier
models, and pickling tensors between processes cost 2-3 ms per image.

Memory stays flat: at most `workers * IN_FLIGHT_PER_WORKER` chunks are submitted and not yet
consumed, however many images the sources hold. Results are yielded in input order.

A worker that dies (segfault in a decoder, OOM kill) breaks the pool. The pool is replaced and
the chunks it held are retried one image at a time in a fresh pool; an image that kills its
worker again becomes an error row. Nothing is dropped and the run goes on.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone

import pyarrow as pa

from batchscore.engines import RunContext
from batchscore.errors import ConfigError
from batchscore.fetch import prefetched
from batchscore.output import Sink, chunk_to_batch
from batchscore.scorer import (
    ChunkOutput,
    ChunkResult,
    Scorer,
    Task,
    chunk_refs,
    one_at_a_time,
    task_of,
)
from batchscore.settings import PipelineOptions
from batchscore.sources import ImageRef
from batchscore.spec import ModelSpec

IN_FLIGHT_PER_WORKER = 4
PARENT_POLL_S = 1.0
WORKERS_DID_NOT_START = (
    "worker processes died while starting. Workers are started with 'spawn' and import the"
    ' script that called batchscore: call score() under `if __name__ == "__main__":`'
    " (or use workers=0)"
)


def score(
    refs: Iterator[ImageRef], context: RunContext, sink: Sink, stop: Callable[[], bool]
) -> Iterator[pa.RecordBatch]:
    """The engine: score `refs` in a local process pool, write each chunk to `sink` in input
    order, and yield what was written. Objects in a bucket are read ahead here, in the parent,
    and travel to the workers with their chunk."""
    fetched = prefetched(refs, context.settings.storage_options)
    for result in run_pipeline(fetched, context.specs, context.settings.pipeline, stop):
        batch = chunk_to_batch(result, context.specs, sink.schema, context.layout, context.run_id)
        sink.write(batch)
        yield batch


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


def _now() -> datetime:
    return datetime.now(timezone.utc)


class _Pool:
    """A process pool that can be replaced when one of its workers dies."""

    def __init__(self, specs: Sequence[ModelSpec], options: PipelineOptions) -> None:
        self.specs = specs
        self.options = options
        self.executor = self._new()
        try:  # a worker that cannot even start is the caller's setup, not an image's fault
            self.executor.submit(os.getpid).result()
        except BrokenProcessPool:
            self.close(force=True)
            raise ConfigError(WORKERS_DID_NOT_START) from None

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.options.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.specs, self.options, os.getpid()),
        )

    def submit(self, refs: list[ImageRef]) -> Future[ChunkOutput]:
        return self.executor.submit(_score_in_worker, task_of(refs))

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
        return one_at_a_time(
            refs, self._score_one, BrokenProcessPool, self.specs, self.options.top_k
        )

    def _score_one(self, ref: ImageRef) -> ChunkOutput:
        try:
            return self.submit([ref]).result()
        except BrokenProcessPool:  # this image killed a fresh worker: it is the culprit
            self.replace()
            raise


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
    chunks = chunk_refs(refs, options.batch_size)
    if options.workers <= 0:
        scorer = Scorer(specs, options)
        for chunk in chunks:
            if should_stop():
                return
            yield ChunkResult(chunk, scorer.score(task_of(chunk)), _now())
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
