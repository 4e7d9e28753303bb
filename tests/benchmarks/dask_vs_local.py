"""The Dask engine against the local engine, on the same 1080p JPEGs and the same machine.

Not a test: it prints figures for docs/dask.md and asserts nothing about time. Every figure is
the median of `--repeats` runs; the engines take turns within each repeat, so a noisy
neighbour on a shared machine slows all of them alike. Each run is `batchscore.score.score`
into a fresh dataset directory, timed end to end (model check and start-up included):

- local: the default engine, a pool of `--workers` processes;
- dask cold: `--engine dask` with no address, so the run starts and stops its own LocalCluster
  of `--workers` single-threaded processes;
- dask warm: `--engine dask` against a LocalCluster started once beforehand (a long-lived
  cluster, as in production), with the nanny's MALLOC_TRIM_THRESHOLD_ unset as the engine does
  for the clusters it starts;
- dask warm, nanny malloc default: the same with distributed's default
  MALLOC_TRIM_THRESHOLD_=65536 left in place (the trap docs/dask.md describes).

Each run scores a manifest listing the `--count` files `--times` times (a few seconds of work,
so start-up does not drown the scoring), with default settings otherwise.

Run from the repository root (about a minute on 2 cores; needs the dask extra):

    python -m tests.benchmarks.dask_vs_local
    python -m tests.benchmarks.dask_vs_local --count 100 --repeats 5 --workdir /tmp/bench
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import dask
from distributed import LocalCluster

from batchscore.engines.dask import LOOPBACK_ANY_PORT, NANNY_MALLOC_TRIM
from batchscore.score import score
from batchscore.settings import PipelineOptions, ScoreSettings
from tests.benchmarks.bench import CORPORA, cpu_model, make_corpus, write_manifest


def timed_run(corpus: Path, output: Path, settings: ScoreSettings) -> float:
    started = time.perf_counter()
    summary = score([corpus], output, settings)
    elapsed = time.perf_counter() - started
    if summary.stats["n_ok"] == 0:
        raise SystemExit(f"nothing scored into {output}")
    return elapsed


def warm_cluster(workers: int, malloc_trim: int | None) -> LocalCluster:
    with dask.config.set({NANNY_MALLOC_TRIM: malloc_trim}):
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": LOOPBACK_ANY_PORT},
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=80, help="1080p JPEGs to make")
    parser.add_argument("--times", type=int, default=5, help="each run scores each file this often")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the corpus between runs")
    args = parser.parse_args(argv)
    logging.getLogger("distributed").setLevel(logging.WARNING)  # cluster start/stop chatter
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dask-vs-local-"))
    shutil.rmtree(work / "out", ignore_errors=True)  # a dataset that exists is skipped, not timed
    files = make_corpus(work, CORPORA["1080p-jpeg"], args.count)
    corpus = write_manifest(work / "manifest.txt", files, args.times)
    n_images = args.count * args.times
    base = ScoreSettings(pipeline=PipelineOptions(workers=args.workers))
    warm = warm_cluster(args.workers, None)
    trimmed = warm_cluster(args.workers, 65536)
    engines: dict[str, Callable[[Path], float]] = {
        "local": lambda out: timed_run(corpus, out, base),
        "dask cold": lambda out: timed_run(corpus, out, _dask(base, None)),
        "dask warm": lambda out: timed_run(corpus, out, _dask(base, warm.scheduler_address)),
        "dask warm, nanny malloc default": lambda out: timed_run(
            corpus, out, _dask(base, trimmed.scheduler_address)
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in engines}
    try:
        for repeat in range(args.repeats):
            for name, run in engines.items():
                output = work / "out" / f"{name.replace(' ', '-').replace(',', '')}-{repeat}"
                times[name].append(run(output))
    finally:
        warm.close()
        trimmed.close()
    local = statistics.median(times["local"])
    print(
        f"{args.count} 1080p JPEGs x {args.times} = {n_images} images, {args.workers} workers,"
        f" median of {args.repeats}; {cpu_model()}"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"  {name:33s} {median:6.2f} s  {n_images / median:6.1f} img/s"
            f"  x{median / local:.2f} of local  (runs: {', '.join(f'{v:.2f}' for v in values)})"
        )


def _dask(settings: ScoreSettings, address: str | None) -> ScoreSettings:
    return replace(settings, engine="dask", dask_address=address)


if __name__ == "__main__":  # LocalCluster starts processes that import this module
    main()
