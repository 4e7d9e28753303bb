"""Every image exactly once, whatever happens to the runs: random fault schedules (Jepsen-style,
bounded) over a local dataset and over a dataset in an S3 server on loopback behind the fault
proxy. The harness is tests/schedules.py; docs/unattended.md says what it found.

BATCHSCORE_SCHEDULES (local) and BATCHSCORE_BUCKET_SCHEDULES set how many schedules run;
BATCHSCORE_SCHEDULE_SEED=N replays the one schedule a failure names.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import s3fs

from batchscore.dataset import dataset_summaries, is_part, part_files
from batchscore.files import process_alive
from batchscore.store import STAGING_PREFIX
from tests.conftest import COLORS
from tests.models import color_model
from tests.object_store import Bucket, FaultProxy
from tests.schedules import (
    Runner,
    Schedule,
    draw,
    findings,
    forkserver,
    row_problems,
    summary_problems,
)
from tests.test_object_storage import png

LOCAL_SCHEDULES = int(os.environ.get("BATCHSCORE_SCHEDULES", "200"))
BUCKET_SCHEDULES = int(os.environ.get("BATCHSCORE_BUCKET_SCHEDULES", "30"))
REPLAY = os.environ.get("BATCHSCORE_SCHEDULE_SEED")
VERBOSE = bool(os.environ.get("BATCHSCORE_SCHEDULE_VERBOSE"))  # each schedule and its steps


def seeds(count: int, first: int) -> list[int]:
    return [int(REPLAY)] if REPLAY else list(range(first, first + count))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return color_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def context() -> Iterator[object]:
    yield forkserver()


def good_and_bad(n_good: int) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Image names and bytes: `n_good` good ones, and two that are bad in themselves."""
    names = list(COLORS)
    good = {f"img_{i:03d}.png": png(names[i % 3], seed=i) for i in range(n_good)}
    bad = {"zz_corrupt.png": b"\x89PNG but not really an image", "zz_empty.png": b""}
    return good, bad


def report(schedule: Schedule, runner: Runner, problems: list[str]) -> str:
    steps = "\n".join(f"    {step} -> exit {code}" for step, code, _ in runner.seen)
    listed = "\n".join(f"  - {p}" for p in problems[:12])
    return (
        f"schedule failed; replay with BATCHSCORE_SCHEDULE_SEED={schedule.seed}\n{schedule}\n"
        f"  ran:\n{steps}\n  found:\n{listed}"
    )


@pytest.mark.slow
def test_local_datasets_keep_every_image_exactly_once(
    tmp_path: Path, model: Path, context: object
) -> None:
    images = tmp_path / "uploads"
    images.mkdir()
    good, bad = good_and_bad(24)
    for name, data in {**good, **bad}.items():
        (images / name).write_bytes(data)
    failures, ran = [], 0
    for seed in seeds(LOCAL_SCHEDULES, first=0):
        schedule = draw(seed, in_bucket=False, run_s=0.3)
        dataset = tmp_path / f"preds-{seed}"
        logs = tmp_path / f"logs-{seed}"
        logs.mkdir()
        argv = ["score", str(images), "-o", f"{dataset}/", "--model", str(model)]
        runner = Runner(context, [*argv, *schedule.options], {}, logs)  # type: ignore[arg-type]
        runner.run(schedule)
        ran += 1
        problems = findings(runner)
        if not problems:
            rows = pd.read_parquet(dataset, columns=["path", "status"])
            problems += row_problems(
                rows,
                {str(images / n) for n in good},
                {str(images / n) for n in bad},
                schedule.no_retry_errors,
            )
            parts = {
                p.relative_to(dataset).as_posix(): pq.read_metadata(p).num_rows
                for p in part_files(dataset)
            }
            problems += summary_problems(dataset_summaries(dataset, {}), parts, len(rows))
            left = [*dataset.glob("run_date=*/.part-*"), *dataset.glob("_runs/.*")]
            problems += [f"temporary left after the clean run: {p.name}" for p in left]
        if problems:
            failures.append(report(schedule, runner, problems))
    print(f"{ran} local schedules, {len(failures)} failed")
    assert not failures, "\n\n".join(failures[:3])


@pytest.fixture
def proxied(s3: Bucket) -> Iterator[tuple[Bucket, FaultProxy]]:
    with FaultProxy(s3.endpoint) as front:
        yield s3, front
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_bucket_datasets_keep_every_image_exactly_once(
    proxied: tuple[Bucket, FaultProxy], model: Path, context: object, tmp_path: Path
) -> None:
    bucket, proxy = proxied
    good, bad = good_and_bad(10)
    for name, data in {**good, **bad}.items():
        bucket.put(f"uploads/{name}", data)
    env = {
        name: os.environ[name]
        for name in os.environ
        if name.startswith("AWS_") and name != "AWS_ENDPOINT_URL"
    }
    env["AWS_ENDPOINT_URL"] = proxy.url  # the runs go through the proxy; the checks do not
    failures, ran = [], 0
    for seed in seeds(BUCKET_SCHEDULES, first=100_000):
        schedule = draw(seed, in_bucket=True, run_s=0.6)
        prefix = f"preds-{seed}/"
        logs = tmp_path / f"logs-{seed}"
        logs.mkdir()
        argv = ["score", bucket.uri("uploads/"), "-o", bucket.uri(prefix), "--model", str(model)]
        runner = Runner(
            context,  # type: ignore[arg-type]
            [*argv, *schedule.options, "--lock-lease", "20"],
            env,
            logs,
            add_fault=lambda match, kind, times: proxy.add_fault(match, kind, times, delay_s=2.0),
            clear_faults=proxy.clear_faults,
        )
        runner.run(schedule)
        ran += 1
        if VERBOSE:
            print(report(schedule, runner, []))
        problems = findings(runner)
        if not problems:
            s3fs.S3FileSystem.clear_instance_cache()
            keys = bucket.keys(prefix)
            part_keys = [k for k in keys if is_part(k[len(prefix) :])]
            tables = {k: pq.read_table(io.BytesIO(bucket.get(k))) for k in part_keys}
            rows = pd.concat(
                [t.select(["path", "status"]).to_pandas() for t in tables.values()]
                or [pd.DataFrame({"path": [], "status": []})]
            )
            problems += row_problems(
                rows,
                {bucket.uri(f"uploads/{n}") for n in good},
                {bucket.uri(f"uploads/{n}") for n in bad},
                schedule.no_retry_errors,
            )
            parts = {k[len(prefix) :]: t.num_rows for k, t in tables.items()}
            summaries = dataset_summaries(bucket.uri(prefix), {})
            problems += summary_problems(summaries, parts, len(rows))
            hidden = [k for k in keys if "/." in f"/{k[len(prefix) :]}"]
            problems += [f"temporary left after the clean run: {k}" for k in hidden]
            if f"{prefix}_batchscore.lock" in keys:
                problems.append("the clean run left its lock behind")
        if problems:
            failures.append(report(schedule, runner, problems))
    staged = Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*")
    dead = [
        p for p in staged if not process_alive(int(p.name[len(STAGING_PREFIX) :].split("-")[0]))
    ]
    print(f"{ran} bucket schedules, {len(failures)} failed")
    assert not failures, "\n\n".join(failures[:3])
    assert dead == [], "staging folders of dead runs left behind"
