# distributed is typed only in part: its Client, LocalCluster and as_completed are not.
# mypy: allow-untyped-calls
"""The Dask engine (`--engine dask`): partitions of paths scored on a cluster, one part each.

How a run flows (docs/dask.md has the whole story):

- The parent reads the sources and the dataset's state exactly as the local engine does, cuts
  the refs into partitions of `PARTITION_IMAGES` images (fewer with a smaller `--part-rows`;
  a small run is spread evenly over the workers instead) and keeps at most
  `IN_FLIGHT_PER_THREAD` partitions per worker thread submitted: no task graph is built up
  front, so memory stays flat for millions of images.
- `RunPlugin` travels once to every worker. Each worker thread lazily builds its own `Scorer`
  (one ORT session per model with `threads_per_worker` intra-op threads, 1 by default; ORT
  ignores OMP_NUM_THREADS), so Dask threads x ORT threads = cores and nothing oversubscribes.
- A partition is decoded, scored and written by one task into one Parquet part, atomically, at
  a name fixed by (run_id, attempt, partition index): when Dask retries a partition (its worker
  died) the retry replaces that part and never adds rows. Only the four columns the run's
  counts need go back to the parent; probabilities stay on disk.
- A partition that keeps killing its workers (a decoder crash, an out-of-memory kill) is scored
  again one image per task, one task at a time: as in the local engine, only an image that
  kills its worker again is lost, as an error row, and the run goes on.
- Workers write straight into the dataset: a directory every worker mounts at the same path,
  or a bucket, which workers read and write themselves (docs/object-storage.md), no shared
  disk needed. `RunPlugin.setup` checks that on every worker (a token file or object the
  parent wrote must be readable, the partition writable, the first input readable) and the
  run stops with a ConfigError before any task runs when one cannot.
"""

from __future__ import annotations

import math
import os
import posixpath
import signal
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from itertools import chain, count, islice
from typing import Any, cast

import dask
import onnxruntime as ort
import pyarrow as pa
from distributed import (
    Client,
    Future,
    KilledWorker,
    LocalCluster,
    Worker,
    as_completed,
    get_worker,
)
from distributed.comm.addressing import parse_address
from distributed.comm.registry import get_backend
from distributed.diagnostics.plugin import WorkerPlugin

from batchscore import __version__, storage
from batchscore.dataset import DatasetWriter, remove_stale_temporaries
from batchscore.engines import RunContext
from batchscore.errors import (
    BatchscoreError,
    ConfigError,
    OutputError,
    WriteFailed,
)
from batchscore.fetch import prefetched
from batchscore.files import write_errors
from batchscore.names import is_url, redact_url
from batchscore.output import OutputLayout, ParquetPart, Sink, chunk_to_batch
from batchscore.scorer import (
    ChunkOutput,
    ChunkResult,
    Scorer,
    chunk_refs,
    one_at_a_time,
    task_of,
)
from batchscore.settings import PipelineOptions
from batchscore.sources import ImageRef
from batchscore.spec import ModelSpec
from batchscore.store import Store
from batchscore.summary import stats_columns

PARTITION_IMAGES = 256  # big enough to amortise a task (~ms), small enough to retry cheaply
IN_FLIGHT_PER_THREAD = 2  # one running, one queued per worker thread: no idle gaps
TASK_RETRIES = 2  # a shared-filesystem hiccup on one worker should not fail a long run
WORKER_WAIT_S = 120.0  # a fresh cluster's workers may still be starting
LOOPBACK_ANY_PORT = "127.0.0.1:0"
# The nanny sets MALLOC_TRIM_THRESHOLD_=65536 in every worker; setting it at all turns off
# glibc's dynamic mmap threshold, so every decoded image is a fresh mmap and page faults
# (decode up to ~1.7x slower; docs/dask.md has the figures).
NANNY_MALLOC_TRIM = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


class RunPlugin(WorkerPlugin):
    """Everything a worker needs to score this run's partitions, sent once per worker."""

    def __init__(
        self,
        context: RunContext,
        sink: DatasetWriter,
        *,
        token: tuple[str, str],
        probe: str | None,
        ignore_sigint: bool,
    ) -> None:
        self.name = f"batchscore-{context.run_id}"
        self.specs: list[ModelSpec] = context.specs
        self.options: PipelineOptions = context.settings.pipeline
        self.layout: OutputLayout = context.layout
        self.run_id = context.run_id
        self.schema: pa.Schema = sink.schema
        self.metadata: dict[str, Any] = sink.metadata
        self.store = sink.store
        self.partition = sink.partition
        self.storage_options = dict(context.settings.storage_options)
        self.token = token
        self.probe = probe
        self.ignore_sigint = ignore_sigint
        self.problem: str | None = None

    def setup(self, worker: Worker) -> None:
        del worker  # the plugin's state is all it needs
        if self.ignore_sigint:  # our LocalCluster shares the terminal: Ctrl-C is the parent's
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._local = threading.local()
        self.problem = storage_problem(
            self.store,
            self.partition,
            token=self.token,
            probe=self.probe,
            metadata=self.metadata,
            options=self.storage_options,
        )

    def scorer(self) -> Scorer:
        """This thread's scorer: Dask runs one task per thread at once, and a session is never
        shared by two tasks running together."""
        scorer: Scorer | None = getattr(self._local, "scorer", None)
        if scorer is None:
            scorer = self._local.scorer = Scorer(self.specs, self.options)
        return scorer

    def score(self, refs: Sequence[ImageRef]) -> ChunkOutput:
        """Score `refs` as one batch on this thread's sessions."""
        if self.problem is not None:
            raise OutputError(f"this Dask worker cannot use the run's files: {self.problem}")
        return self.scorer().score(task_of(refs))

    def score_partition(self, name: str, refs: Sequence[ImageRef]) -> pa.RecordBatch:
        """Score `refs` in input order, batch by batch, into the part `name` of the run's
        store (in a bucket, this worker reads the objects and uploads the part itself)."""
        fetched = prefetched(refs, self.storage_options)
        chunks = chunk_refs(fetched, self.options.batch_size)
        return self.commit_part(name, (_result(chunk, self.score(chunk)) for chunk in chunks))

    def score_images(self, refs: Sequence[ImageRef]) -> ChunkOutput:
        """Score refs (read from their bucket here when they name objects) as one batch."""
        return self.score(list(prefetched(refs, self.storage_options)))

    def commit_part(self, name: str, results: Iterable[ChunkResult]) -> pa.RecordBatch:
        """Write `results` as the part `name`, committed whole by the run's store; return the
        columns the run's counts need."""
        shown = self.store.shown(name)
        with write_errors(shown):  # as DatasetWriter.write: one line, exit 1, not a traceback
            part = ParquetPart(self.store.stage(name), self.schema, self.metadata, shown=shown)
        counted = []
        try:
            for result in results:
                batch = chunk_to_batch(result, self.specs, self.schema, self.layout, self.run_id)
                part.write(batch)
                counted.append(batch.select(stats_columns(batch.schema.names)))
        except BaseException:
            part.abort()
            raise
        part.commit(self.store, name, {"part_rows": part.rows}, fence=self._fence)
        batches: list[pa.RecordBatch] = pa.Table.from_batches(counted).combine_chunks().to_batches()
        return batches[0]

    def _fence(self) -> None:
        """Run right before the part is committed (and before every retry of its upload)."""
        if not self.store.exists(self.token[0]):
            # The client is gone and the next run has removed its token: that run may have
            # read the dataset already, so committing now could write rows twice.
            raise BatchscoreError(f"run {self.run_id} is over; partition not committed")


def _result(refs: list[ImageRef], output: ChunkOutput) -> ChunkResult:
    return ChunkResult(refs, output, datetime.now(timezone.utc))


def storage_problem(
    store: Store,
    partition: str,
    *,
    token: tuple[str, str],
    probe: str | None,
    metadata: Mapping[str, Any],
    options: Mapping[str, Any],
) -> str | None:
    """Why this process cannot take part in the run, or None. Runs on each worker: it must
    read the client's token and write into the dataset (where the client writes: the same
    shared disk, or the same bucket with its own credentials), and read the first input."""
    token_name, token_value = token
    shown = store.shown(partition)
    try:
        seen = store.get(token_name).decode()
    except Exception as exc:
        return (
            f"cannot read {store.shown(token_name)} ({_why(exc)}): is {shown} shared storage,"
            " or a bucket this worker reaches?"
        )
    if seen != token_value:
        return f"{shown} here is not where the client writes (not shared storage?)"
    scratch = f"{partition}/.part-check-{uuid.uuid4().hex}.tmp"
    try:
        store.put(scratch, b"")
        store.delete(scratch)
    except WriteFailed as exc:
        return str(exc)
    except Exception as exc:
        return f"cannot write into {shown}: {storage.failure(exc)}"
    if probe is not None:
        problem = _probe_problem(probe, options)
        if problem is not None:
            return problem
    versions = (metadata["batchscore_version"], metadata["onnxruntime_version"])
    if (__version__, ort.__version__) != versions:
        return (
            f"runs batchscore {__version__} with onnxruntime {ort.__version__}, the client"
            f" {versions[0]} with onnxruntime {versions[1]}: install the same versions"
        )
    return None


def _probe_problem(probe: str, options: Mapping[str, Any]) -> str | None:
    """Whether the first input can be read here."""
    if is_url(probe):
        try:
            storage.read_object(probe, options)
        except Exception as exc:
            return f"cannot read input {redact_url(probe)} ({storage.reason(exc)})"
        return None
    try:
        with open(probe, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        return f"cannot read input {probe} ({exc.strerror or exc}): is it on shared storage?"
    return None


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not is_url(str(exc.filename or "")) and exc.strerror:
        return exc.strerror
    return storage.reason(exc)


def score_partition(plugin_name: str, name: str, refs: Sequence[ImageRef]) -> pa.RecordBatch:
    """The task: a module-level function, so workers unpickle it by reference."""
    return _plugin(plugin_name).score_partition(name, refs)


def score_images(plugin_name: str, refs: Sequence[ImageRef]) -> ChunkOutput:
    """The task that scores images of a partition that killed its workers, without writing."""
    return _plugin(plugin_name).score_images(refs)


def _plugin(plugin_name: str) -> RunPlugin:
    return cast(RunPlugin, get_worker().plugins[plugin_name])


def _plugin_problem(plugin_name: str, dask_worker: Worker) -> str | None:
    plugin = cast(RunPlugin | None, dask_worker.plugins.get(plugin_name))
    return None if plugin is None else plugin.problem


def score(
    refs: Iterator[ImageRef],
    context: RunContext,
    sink: Sink,
    stop: Callable[[], bool],
) -> Iterator[pa.RecordBatch]:
    """Score `refs` on a Dask cluster into `sink`'s dataset, yielding each partition's counts.

    Connects to `settings.dask_address`, or starts a LocalCluster of `settings.pipeline.workers`
    single-threaded processes. After `stop()` turns true no partition is submitted; the ones
    running finish and are committed. A failed partition stops submission the same way, then
    its error is raised, so every committed part is in `sink.parts` either way.
    """
    if not isinstance(sink, DatasetWriter):
        raise ConfigError("--engine dask writes one part per partition: -o must be a directory")
    first = next(refs, None)
    if first is None:
        return  # nothing left to score: no cluster to start
    settings = context.settings
    readable = first.path is not None and (is_url(first.path) or os.access(first.path, os.R_OK))
    with (
        _connect(settings.dask_address, settings.pipeline.workers) as client,
        _shared_token(sink) as token,
    ):
        plugin = RunPlugin(
            context,
            sink,
            token=token,
            probe=first.path if readable else None,
            ignore_sigint=settings.dask_address is None,
        )
        _wait_for_workers(client)
        client.register_plugin(plugin, name=plugin.name)
        try:
            _check_workers(client, plugin.name)
            size = min(PARTITION_IMAGES, settings.part_rows)
            partitions = _partitions(chain([first], refs), size, _slots(client))
            yield from _stream(client, plugin, partitions, sink, stop)
            remove_stale_temporaries(sink.store)  # of parts whose worker died mid-write
        finally:
            with suppress(OSError):  # a lost scheduler must not hide the run's own error
                client.unregister_worker_plugin(plugin.name)


def _partitions(
    refs: Iterator[ImageRef], size: int, slots: int
) -> Iterator[tuple[int, list[ImageRef]]]:
    """Numbered partitions of `size` refs. A run smaller than `slots` full partitions is spread
    evenly over the slots instead: 80 images must not all go to one worker."""
    head = list(islice(refs, size * slots))
    if len(head) < size * slots:
        size = max(1, math.ceil(len(head) / slots))
    return enumerate(chunk_refs(chain(head, refs), size))


def _slots(client: Client) -> int:
    """How many partitions to keep submitted: `IN_FLIGHT_PER_THREAD` per worker thread."""
    threads: dict[str, int] = client.nthreads()
    return IN_FLIGHT_PER_THREAD * max(sum(threads.values()), 1)


@contextmanager
def _connect(address: str | None, workers: int) -> Iterator[Client]:
    if address is not None:
        try:  # checked first: Client leaves a thread behind on a bad scheme (60 s at exit)
            get_backend(parse_address(address)[0])
        except ValueError as exc:
            raise ConfigError(f"bad Dask scheduler address {address!r}: {exc}") from exc
        try:
            client = Client(address, set_as_default=False)
        except OSError as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
        with client:
            yield client
        return
    with (
        dask.config.set({NANNY_MALLOC_TRIM: None}),
        LocalCluster(
            n_workers=max(workers, 1),
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",  # nothing outside this machine needs to reach it
            dashboard_address=None,
            # Without a dashboard the scheduler still serves /health on 8787 (a warning, and
            # another port, when that is taken): a free loopback port instead.
            scheduler_kwargs={"dashboard_address": LOOPBACK_ANY_PORT},
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        yield client


@contextmanager
def _shared_token(sink: DatasetWriter) -> Iterator[tuple[str, str]]:
    """A file only this run can have written: a worker that reads it sees the same storage.
    Named like a staged file, so the next run removes it if this one dies."""
    value = uuid.uuid4().hex
    name = f"{sink.partition}/.part-{sink.run_id}-{sink.attempt}-shared.tmp"
    sink.store.put(name, value.encode())
    try:
        yield name, value
    finally:
        with suppress(Exception):
            sink.store.delete(name)


def _wait_for_workers(client: Client) -> None:
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError as exc:
        raise ConfigError(
            f"no Dask worker joined the scheduler within {WORKER_WAIT_S:.0f} s"
            " (an adaptive cluster needs minimum=1)"
        ) from exc


def _check_workers(client: Client, plugin_name: str) -> None:
    problems: dict[str, str | None] = client.run(_plugin_problem, plugin_name)
    by_problem: dict[str, list[str]] = {}
    for address, problem in sorted(problems.items()):
        if problem is not None:
            by_problem.setdefault(problem, []).append(address)
    if by_problem:
        listed = "; ".join(
            f"{len(addresses)} of {len(problems)} workers (e.g. {addresses[0]}): {problem}"
            for problem, addresses in by_problem.items()
        )
        raise ConfigError(
            "Dask workers cannot take part in this run (--engine dask needs the inputs and the"
            " output directory on storage every worker mounts at the same path, or in a bucket"
            " every worker can reach, and the same batchscore and onnxruntime versions):"
            f" {listed}"
        )


def _stream(
    client: Client,
    plugin: RunPlugin,
    partitions: Iterator[tuple[int, list[ImageRef]]],
    sink: DatasetWriter,
    stop: Callable[[], bool],
) -> Iterator[pa.RecordBatch]:
    """Keep a bounded window of partitions in flight; yield each one's counts as it lands."""
    completed = as_completed(loop=client.loop)
    in_flight: dict[str, tuple[int, list[ImageRef]]] = {}

    def submit_more() -> None:
        limit = _slots(client)  # again each time: workers may come and go
        while completed.count() < limit and not stop():
            sink.fence()  # no partition starts once the lock may be another run's
            item = next(partitions, None)
            if item is None:
                return
            index, chunk = item
            future = client.submit(
                score_partition,
                plugin.name,
                sink.part_name(index),
                chunk,
                key=f"{plugin.name}-part-{index:05d}",
                retries=TASK_RETRIES,
            )
            in_flight[str(future.key)] = item
            completed.add(future)

    failure: Exception | None = None
    submit_more()
    for future in completed:
        index, chunk = in_flight.pop(str(future.key))
        try:
            batch = _counts(future, client, plugin, chunk, sink.part_name(index))
        except Exception as exc:  # drain what is running first, so its parts are recorded
            failure = failure or exc
            continue
        sink.add_part(index, len(chunk))
        yield batch
        if failure is None:
            submit_more()
    if failure is not None:
        raise failure


def _counts(
    future: Future[pa.RecordBatch],
    client: Client,
    plugin: RunPlugin,
    chunk: list[ImageRef],
    name: str,
) -> pa.RecordBatch:
    """A partition's counts, once its part is committed."""
    try:
        batch: pa.RecordBatch = future.result()
    except KilledWorker:
        return _isolate(client, plugin, chunk, name)
    return batch


def _isolate(client: Client, plugin: RunPlugin, chunk: list[ImageRef], name: str) -> pa.RecordBatch:
    """A partition killed the workers that ran it (a decoder crash, an out-of-memory kill), or
    was queued on them when another one did. Score its images one task at a time, so a worker
    that dies then held no other image of it: only an image that kills its worker again is
    lost, as an error row like the local engine's. The part is written from here."""
    numbers = count()

    def score_one(ref: ImageRef) -> ChunkOutput:
        key = f"{posixpath.basename(name).removesuffix('.parquet')}-image-{next(numbers)}"
        future = client.submit(score_images, plugin.name, [ref], key=key)
        output: ChunkOutput = future.result()
        return output

    output = one_at_a_time(chunk, score_one, KilledWorker, plugin.specs, plugin.options.top_k)
    return plugin.commit_part(name, [_result(chunk, output)])
