"""`--engine dask` against the local engine, on real clusters bound to 127.0.0.1.

Every comparison scores the same real files (PNGs, JPEGs, two broken files) with the same real
ONNX model as the local engine, and checks the parts row for row.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

distributed = pytest.importorskip("distributed")  # the optional extra; CI installs it

import dask  # noqa: E402

from batchscore import score as score_module  # noqa: E402
from batchscore.cli import cli  # noqa: E402
from batchscore.dataset import DatasetWriter, dataset_summaries, part_files  # noqa: E402
from batchscore.engines import RunContext  # noqa: E402
from batchscore.engines.dask import (  # noqa: E402
    PARTITION_IMAGES,
    RunPlugin,
    _partitions,
    _shared_token,
)
from batchscore.errors import BatchscoreError, Interrupted, WriteFailed  # noqa: E402
from batchscore.incremental import with_fingerprints  # noqa: E402
from batchscore.model import load_model  # noqa: E402
from batchscore.output import OutputLayout, output_schema, read_metadata  # noqa: E402
from batchscore.score import run_metadata, score  # noqa: E402
from batchscore.scorer import WORKER_DIED  # noqa: E402
from batchscore.settings import PipelineOptions, ScoreSettings  # noqa: E402
from batchscore.sources import ImageRef, iter_refs, open_sources  # noqa: E402
from batchscore.store import LocalStore  # noqa: E402
from tests.conftest import COLORS, noisy  # noqa: E402
from tests.models import color_model, head_model  # noqa: E402

N_IMAGES = 18
PART_ROWS = 4  # both engines: parts of 4, 4, 4, 4, 2 rows, the same rows in the same parts
CLUSTER_START_S = 60


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(images folder, model folder): PNGs and JPEGs of several sizes, a truncated JPEG and
    text named .png, scored by a real ONNX model."""
    root = tmp_path_factory.mktemp("job")
    images = root / "images"
    (images / "jpeg").mkdir(parents=True)
    names = list(COLORS)
    for i in range(N_IMAGES - 2):
        folder, ext = (images / "jpeg", "jpg") if i % 3 == 0 else (images, "png")
        noisy(COLORS[names[i % 3]], (40 + 7 * i, 30 + i), seed=i).save(folder / f"{i:03d}.{ext}")
    (images / "jpeg" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    (images / "notes.png").write_text("not an image")
    return images, color_model(root / "model")


@pytest.fixture(scope="module")
def local_output(job: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, model = job
    output = tmp_path_factory.mktemp("local") / "preds"
    score([images], output, settings(model, workers=0))
    return output


def settings(model: Path, **changes: object) -> ScoreSettings:
    pipeline = PipelineOptions(workers=2, batch_size=PART_ROWS)
    if "workers" in changes:
        pipeline = replace(pipeline, workers=changes.pop("workers"))
    return replace(ScoreSettings(model=model, pipeline=pipeline, part_rows=PART_ROWS), **changes)


def on_dask(address: str) -> list[str]:
    return ["--engine", "dask", "--dask-address", address]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def scheduler_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`dask scheduler` and `dask worker --nworkers 2` as separate processes on loopback. The
    workers run in another folder, so a path relative to the test's folder is not theirs."""
    root = tmp_path_factory.mktemp("cluster")
    scheduler_file = root / "scheduler.json"
    loopback = ["--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0"]
    connect = ["--scheduler-file", str(scheduler_file)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    dask_cli = [sys.executable, "-m", "dask"]
    scheduler = subprocess.Popen(
        [*dask_cli, "scheduler", "--port", "0", *loopback, *connect], **quiet
    )
    (root / "elsewhere").mkdir()
    workers = subprocess.Popen(
        [*dask_cli, "worker", "--nworkers", "2", "--nthreads", "1", *loopback, *connect],
        cwd=root / "elsewhere",
        **quiet,
    )
    try:
        deadline = time.monotonic() + CLUSTER_START_S
        while not scheduler_file.exists():
            if time.monotonic() > deadline or scheduler.poll() is not None:
                pytest.fail("dask scheduler did not start")
            time.sleep(0.1)
        with distributed.Client(scheduler_file=str(scheduler_file)) as client:
            client.wait_for_workers(2, timeout=CLUSTER_START_S)
            yield str(client.scheduler.address)
    finally:
        for process in (workers, scheduler):  # workers first: they would wait for the scheduler
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def rows(root: Path) -> pd.DataFrame:
    frame = pd.concat([pd.read_parquet(path) for path in part_files(root)], ignore_index=True)
    assert frame["image_id"].is_unique
    return frame.set_index("image_id").sort_index()


def assert_same_as_local(output: Path, local: Path) -> None:
    """Same rows, labels, errors and (within 1e-5) probabilities; parts alike, part for part:
    same rows, same schema, same key-value metadata but the run id."""
    got, want = rows(output), rows(local)
    assert list(got.index) == list(want.index)
    assert len(got) == N_IMAGES
    assert list(got.columns) == list(want.columns)
    for column in ("path", "status", "error", "pred_label", "width", "height", "fingerprint"):
        if column in want:  # an embedding has no pred_label
            pd.testing.assert_series_equal(got[column], want[column])
    ok = want["status"] == "ok"
    assert (~ok).sum() == 2
    for column in [c for c in ("pred_prob", "probs", "topk_probs", "embedding") if c in want]:
        np.testing.assert_allclose(
            np.vstack(got.loc[ok, column]), np.vstack(want.loc[ok, column]), atol=1e-5
        )
    got_parts, want_parts = part_files(output), part_files(local)
    assert [len(pq.read_table(p)) for p in got_parts] == [4, 4, 4, 4, 2]
    for mine, theirs in zip(got_parts, want_parts, strict=True):
        assert list(pq.read_table(mine)["image_id"]) == list(pq.read_table(theirs)["image_id"])
        assert pq.read_schema(mine).remove_metadata() == pq.read_schema(theirs).remove_metadata()
        metadata, reference = read_metadata(mine), read_metadata(theirs)
        assert metadata.pop("run_id") != reference.pop("run_id")
        assert metadata == reference


def assert_summary(
    output: Path, *, n_images: int, status: str = "complete", run_id: str | None = None
) -> dict[str, Any]:
    """The summary of run `run_id` (of the only run when None) lists exactly its parts."""
    summaries = dataset_summaries(output, {})
    (summary,) = [s for s in summaries if run_id in (None, s["run_id"])]
    assert summary["status"] == status
    assert summary["n_images"] == n_images
    run_parts = [p for p in part_files(output) if summary["run_id"] in p.name]
    assert sorted(summary["parts"]) == [str(p.relative_to(output)) for p in run_parts]
    assert not list(output.glob("run_date=*/.*"))  # no temporary left behind
    return summary


@pytest.mark.slow
def test_local_cluster_scores_like_the_local_engine(
    job: tuple[Path, Path], local_output: Path, tmp_path: Path
) -> None:
    images, model = job
    output = tmp_path / "preds"
    summary = score([images], output, settings(model, engine="dask"))  # LocalCluster, 2 x 1
    assert summary.stats["n_ok"] == N_IMAGES - 2
    assert summary.stats["error_reasons"] == dataset_summaries(local_output, {})[0]["error_reasons"]
    assert_same_as_local(output, local_output)
    assert_summary(output, n_images=N_IMAGES)

    again = score([images], output, settings(model, engine="dask", retry_errors=False))
    assert again.stats["n_images"] == 0
    assert again.stats["n_skipped"] == N_IMAGES  # and no cluster was started for nothing


@pytest.mark.slow
def test_cli_on_a_separately_started_cluster(
    job: tuple[Path, Path], local_output: Path, scheduler_address: str, tmp_path: Path
) -> None:
    images, model = job
    output = tmp_path / "preds"
    args = ["score", str(images), "-o", f"{output}/", "--model", str(model), "-q"]
    sizes = ["--part-rows", str(PART_ROWS), "--batch-size", str(PART_ROWS)]
    result = CliRunner().invoke(cli, [*args, *sizes, *on_dask(scheduler_address)])
    assert result.exit_code == 0, result.output
    assert_same_as_local(output, local_output)
    assert_summary(output, n_images=N_IMAGES)


@pytest.mark.slow
@pytest.mark.parametrize("side", ["input", "output"])
def test_storage_the_workers_cannot_see_is_a_config_error(
    job: tuple[Path, Path],
    scheduler_address: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    side: str,
) -> None:
    """/proc/self/cwd/... is this process's folder, and another one for each worker: a path
    that only the client can see, like a local disk that is not shared."""
    images, model = job
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").symlink_to(images)
    here = Path("/proc/self/cwd")
    source = here / "images" if side == "input" else images
    output = here / "preds" if side == "output" else tmp_path / "preds"
    args = ["score", str(source), "-o", f"{output}/", "--model", str(model), "-q"]
    result = CliRunner().invoke(cli, [*args, *on_dask(scheduler_address)])
    assert result.exit_code == 2, result.output
    assert "2 of 2 workers" in result.output
    assert "shared storage" in result.output
    assert not part_files(tmp_path / "preds")


@pytest.mark.slow
def test_interrupted_run_resumes_without_duplicates(
    job: tuple[Path, Path],
    scheduler_address: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGINT once the first part is committed: the run stops submitting, commits what runs,
    and the same command finishes the rest."""
    images, model = job
    output = tmp_path / "preds"

    class StopAfterFirstPart(score_module.StopFlag):
        def __call__(self) -> bool:
            if self.signum is None and part_files(output):
                self.signum = signal.SIGINT
            return super().__call__()

    monkeypatch.setattr(score_module, "StopFlag", StopAfterFirstPart)
    tiny = settings(model, engine="dask", dask_address=scheduler_address, part_rows=2)
    with pytest.raises(Interrupted):
        score([images], output, tiny)
    first = assert_summary(output, n_images=len(rows(output)), status="interrupted")
    assert 2 <= len(rows(output)) < N_IMAGES
    monkeypatch.undo()

    summary = score([images], output, tiny)
    assert summary.stats["n_skipped"] == first["n_images"]
    assert len(rows(output)) == N_IMAGES  # rows() also checks every image_id is there once
    assert_summary(output, n_images=N_IMAGES - first["n_images"], run_id=summary.run_id)


def small_workers_cluster() -> distributed.LocalCluster:
    """Two loopback workers allowed 400 MB each, whose nanny kills one that decodes a 100 MP
    image; a partition that killed a worker is given up at once (allowed-failures 0)."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        return distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            memory_limit="400MB",
            host="127.0.0.1",
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        )


@pytest.mark.slow
def test_an_image_that_kills_its_worker_becomes_an_error_row(
    job: tuple[Path, Path], tmp_path: Path
) -> None:
    """How workers die in real life: out of memory. A 100-megapixel PNG (300 MB decoded) on
    workers allowed 400 MB gets its worker killed by the nanny; Dask gives up on the partition
    (allowed-failures 0 keeps this quick), its images are scored one task each, and only the
    killer is lost, as an error row. The run completes."""
    images, model = job
    (tmp_path / "bomb").mkdir()
    Image.new("RGB", (10_000, 10_000), COLORS["red"]).save(tmp_path / "bomb" / "big.png")
    cluster = small_workers_cluster()
    output = tmp_path / "preds"
    with cluster:
        address = cluster.scheduler_address
        on_cluster = settings(model, engine="dask", dask_address=address)
        summary = score([tmp_path / "bomb", images], output, on_cluster)
    assert summary.stats["n_errors"] == 3
    found = rows(output)
    assert len(found) == N_IMAGES + 1
    assert found.loc[str(tmp_path / "bomb" / "big.png"), "error"] == WORKER_DIED
    assert (found["status"] == "ok").sum() == N_IMAGES - 2
    assert_summary(output, n_images=N_IMAGES + 1)


def test_a_partition_commits_once_under_its_own_name(
    job: tuple[Path, Path], tmp_path: Path
) -> None:
    """What a worker does when Dask runs a partition twice (its first worker died): the same
    part name, so the second attempt replaces the first and no row is written twice. And a
    partition that outlives its run does not commit at all."""
    images, model = job
    specs = [load_model(model)]
    layout = OutputLayout(extra_columns={}, has_label=False)
    run_settings = settings(model, engine="dask")
    root = tmp_path / "preds"
    sink = DatasetWriter(
        LocalStore(root),
        output_schema(layout),
        run_metadata(specs, [], "run-1", run_settings),
        run_id="run-1",
    )
    partition = root / sink.partition
    refs = list(with_fingerprints(iter_refs(open_sources([images])), "size-mtime"))
    context = RunContext(specs, run_settings, layout, "run-1")
    with _shared_token(sink) as token:
        plugin = RunPlugin(context, sink, token=token, probe=refs[0].path, ignore_sigint=False)
        plugin.setup(worker=None)
        assert plugin.problem is None
        counts = [plugin.score_partition(sink.part_name(3), refs) for _ in range(2)]
        (partition / "blocked").write_bytes(b"")  # a file where a folder would have to be
        with pytest.raises(WriteFailed, match="cannot write"):  # one line for the CLI, exit 1
            plugin.score_partition(f"{sink.partition}/blocked/part.parquet", refs)
        (partition / "blocked").unlink()
    assert counts[0].equals(counts[1])
    assert counts[0].schema.names == ["status", "error", "pred_label", "pred_prob"]
    assert [p.name for p in part_files(root)] == [f"part-run-1-{sink.attempt}-00003.parquet"]
    assert pq.read_table(root / sink.part_name(3))["image_id"].to_pylist() == [
        r.image_id for r in refs
    ]
    assert not list(partition.glob(".*"))

    # A partition still running when its client died, finishing after the next run has
    # started (which removes the dead run's token): it must not commit.
    with pytest.raises(BatchscoreError, match="partition not committed"):
        plugin.score_partition(sink.part_name(4), refs)
    assert [p.name for p in part_files(root)] == [f"part-run-1-{sink.attempt}-00003.parquet"]
    assert not list(partition.glob(".*"))


@pytest.mark.parametrize(
    ("n_refs", "sizes"),
    [
        (1, [1]),
        (10, [3, 3, 3, 1]),  # a small run: spread over the 4 slots
        (80, [20, 20, 20, 20]),
        (1100, [256, 256, 256, 256, 76]),  # a big one: full partitions, in input order
    ],
)
def test_partitions(n_refs: int, sizes: list[int]) -> None:
    refs = [ImageRef(path=f"/{i}.png", image_id=str(i)) for i in range(n_refs)]
    partitions = list(_partitions(iter(refs), PARTITION_IMAGES, slots=4))
    assert [index for index, _ in partitions] == list(range(len(sizes)))
    assert [len(chunk) for _, chunk in partitions] == sizes
    assert [ref for _, chunk in partitions for ref in chunk] == refs


def test_unreachable_scheduler_is_a_config_error(job: tuple[Path, Path], tmp_path: Path) -> None:
    images, model = job
    for address, message in (
        (f"tcp://127.0.0.1:{free_port()}", "cannot reach the Dask scheduler"),
        ("bogus://127.0.0.1:1", "bad Dask scheduler address"),
    ):
        with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
            args = ["score", str(images), "-o", f"{tmp_path}/preds/", "--model", str(model)]
            result = CliRunner().invoke(cli, [*args, *on_dask(address)])
        assert result.exit_code == 2, result.output
        assert message in result.output


def test_the_local_engine_imports_no_dask(job: tuple[Path, Path], tmp_path: Path) -> None:
    images, model = job
    code = (
        "import sys\n"
        "from batchscore.cli import cli\n"
        f"cli(['score', {str(images)!r}, '-o', {str(tmp_path / 'out')!r} + '/',"
        f" '--model', {str(model)!r}, '--workers', '0', '-q'], standalone_mode=False)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert len(rows(tmp_path / "out")) == N_IMAGES


def test_an_embedding_model_scores_on_dask_as_it_does_locally(
    job: tuple[Path, Path], tmp_path: Path
) -> None:
    """An encoder's vectors go through the workers, the parts and the summaries like scores."""
    images, _ = job
    encoder = head_model(tmp_path / "encoder", class_names=None, preprocess={"head": "embedding"})
    local, on_cluster = tmp_path / "local", tmp_path / "dask"
    score([images], local, settings(encoder, workers=0))
    summary = score([images], on_cluster, settings(encoder, engine="dask"))
    assert summary.stats["n_ok"] == N_IMAGES - 2
    assert_same_as_local(on_cluster, local)
    vectors = rows(on_cluster)
    assert vectors["embedding"].dropna().map(len).eq(3).all()
