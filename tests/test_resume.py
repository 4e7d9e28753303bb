"""A dataset run stopped at any moment resumes: kill -9, signals, a dead worker, a bad disk.

Each test runs the real CLI in a subprocess over a few hundred small PNGs with the tiny colour
model, committing a part every 5 rows, and checks what a reader would see: every part
readable, no visible temporary, and after the rerun every image exactly once per model.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from batchscore.dataset import dataset_summaries
from tests.conftest import COLORS, noisy
from tests.models import color_model

N_IMAGES = 300


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    names = list(COLORS)
    for i in range(N_IMAGES):
        noisy(COLORS[names[i % 3]], (24, 24), seed=i).save(folder / f"img_{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return color_model(tmp_path_factory.mktemp("model"))


def command(source: Path, dataset: Path, model: Path, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "batchscore", "score", str(source), "-o", f"{dataset}/"),
        *("--model", str(model), "--part-rows", "5", "--workers", "2", *extra),
    ]


@contextmanager
def running(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    """The run in its own process group, whatever is left of which is killed at the end."""
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield process
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def wait_for_first_part(dataset: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not list(dataset.glob("run_date=*/part-*.parquet")):
        assert process.poll() is None, "the run ended before committing a part"
        assert time.monotonic() < deadline, "no part committed within 60 s"
        time.sleep(0.01)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with suppress(OSError):  # the task may have ended meanwhile
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def workers(pid: int) -> list[int]:
    """The pool's worker processes (not the multiprocessing resource tracker)."""
    return [c for c in children(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def check_dataset(dataset: Path, *, complete: bool) -> pd.DataFrame:
    """What a reader sees: only readable parts, no duplicates; all images once if complete."""
    visible = [
        path
        for path in dataset.rglob("*")
        if path.is_file()
        and not any(p.startswith((".", "_")) for p in path.relative_to(dataset).parts)
    ]
    assert all(path.name.endswith(".parquet") for path in visible), visible
    for path in visible:
        pq.read_table(path)  # raises on a half-written part
    if not visible:
        return pd.DataFrame(columns=["image_id", "model_sha256", "status"])
    frame = pd.read_parquet(dataset, columns=["image_id", "model_sha256", "status"])
    assert not frame.duplicated(["image_id", "model_sha256"]).any()
    if complete:
        assert len(frame) == N_IMAGES
        assert (frame["status"] == "ok").all()
        assert not list(dataset.glob("run_date=*/.part-*.tmp"))  # the rerun removed them
    return frame


def last_summary(dataset: Path) -> dict[str, object]:
    return dataset_summaries(dataset, {})[-1]


@pytest.mark.slow
def test_kill_9_at_any_moment_then_the_same_command_finishes(
    tmp_path: Path, images: Path, model: Path
) -> None:
    dataset = tmp_path / "preds"
    argv = command(images, dataset, model)
    rng = random.Random(7)
    # Right after the first commit, then at random moments: some land while parts are being
    # written, the last one maybe still in start-up.
    delays = [0.0, rng.uniform(0.05, 0.6), rng.uniform(0.05, 0.6), None]
    for delay in delays:
        with running(argv) as process:
            if delay is None:
                time.sleep(rng.uniform(0.1, 1.0))
            else:
                wait_for_first_part(dataset, process)
                time.sleep(delay)
            process.kill()  # the parent alone, as the OOM killer would
            process.wait()
        check_dataset(dataset, complete=False)
    before = len(check_dataset(dataset, complete=False))
    assert 0 < before <= N_IMAGES  # on an idle machine a late kill may land after the end

    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    expected = (
        f"({before} already scored by this model, skipped)"
        if before < N_IMAGES
        else f"nothing new to score ({before} images already scored)"
    )
    assert expected in done.stderr
    check_dataset(dataset, complete=True)
    # `runs` adds up: each killed attempt was found by the next run and counted from its parts
    summaries = dataset_summaries(dataset, {})
    assert sum(int(s["n_committed"]) for s in summaries) == N_IMAGES
    assert {s["status"] for s in summaries} <= {"killed", "complete"}
    assert "running" not in {s["status"] for s in summaries}


@pytest.mark.slow
def test_kill_9_with_duplicate_ids_then_rerun_leaves_each_row_exactly_once(
    tmp_path: Path, images: Path, model: Path
) -> None:
    """Ids repeat (two files per id), and one (id, path) is listed twice: after kills and a
    rerun, the rows are exactly those of one uninterrupted run."""
    files = sorted(images.glob("*.png"))
    rows = [(f"id{i // 2}", path) for i, path in enumerate(files)] + [("id0", files[0])]
    manifest = tmp_path / "uploads.csv"
    manifest.write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in rows))
    expected = sorted((i, str(p)) for i, p in rows)

    def rows_of(dataset: Path) -> list[tuple[str, str]]:
        table = pd.read_parquet(dataset, columns=["image_id", "path", "status"])
        assert (table["status"] == "ok").all()
        return sorted(zip(table["image_id"], table["path"], strict=True))

    uninterrupted = tmp_path / "uninterrupted"
    argv = command(manifest, uninterrupted, model)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert rows_of(uninterrupted) == expected

    dataset = tmp_path / "preds"
    argv = command(manifest, dataset, model, "--batch-size", "1", "--workers", "1")
    committed = []
    for delay in (0.0, 0.05, 0.1):  # soon after a commit: the run is still going
        with running(argv) as process:
            wait_for_first_part(dataset, process)
            time.sleep(delay)
            process.kill()
            process.wait()
        committed.append(len(pd.read_parquet(dataset, columns=["image_id"])))
    assert committed[0] < len(rows), "the first kill came after the end: nothing tested"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert rows_of(dataset) == expected


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("named", [(), ("--run-id", "n1")], ids=["default-id", "run-id"])
def test_a_signal_commits_the_work_done_and_says_how_to_resume(
    tmp_path: Path, images: Path, model: Path, signum: int, code: int, named: tuple[str, ...]
) -> None:
    """The command it says to run again finishes the run, a named one too (its rerun used to
    overwrite the parts committed before the signal: 28 rows of 40)."""
    dataset = tmp_path / "preds"
    argv = command(images, dataset, model, "--batch-size", "2", *named)
    with running(argv) as process:
        wait_for_first_part(dataset, process)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    committed = len(check_dataset(dataset, complete=False))
    assert 0 < committed < N_IMAGES
    assert f"{committed} images scored and committed; run the same command again" in stderr
    interrupted = last_summary(dataset)
    assert (interrupted["status"], interrupted["n_committed"]) == ("interrupted", committed)

    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    check_dataset(dataset, complete=True)
    finished = last_summary(dataset)
    assert finished["n_committed"] == N_IMAGES - committed
    assert finished["attempt"] != interrupted["attempt"]


@pytest.mark.slow
def test_a_signal_during_start_up_says_so_in_one_line(
    tmp_path: Path, images: Path, model: Path
) -> None:
    """Before the run installs its own handlers (imports, lock, model: over a second), a
    SIGTERM used to end it with a bare 143 and nothing in the log."""
    dataset = tmp_path / "preds"
    with running(command(images, dataset, model)) as process:
        time.sleep(0.6)  # batchscore.cli is imported; the scoring stack is not yet
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines() == [
        "batchscore: error: stopped by signal 15 before or after its work: nothing more was"
        " written; run the same command again to finish"
    ]
    argv = command(images, dataset, model)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    check_dataset(dataset, complete=True)


@pytest.mark.slow
def test_a_killed_worker_does_not_kill_the_job(tmp_path: Path, images: Path, model: Path) -> None:
    dataset = tmp_path / "preds"
    with running(command(images, dataset, model, "--batch-size", "2")) as process:
        wait_for_first_part(dataset, process)
        victims = workers(process.pid)
        assert len(victims) == 2
        os.kill(victims[0], signal.SIGKILL)
        assert process.poll() is None, "the run ended before its worker could be killed"
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    check_dataset(dataset, complete=True)  # the dead worker's images were retried, all ok
    # Only the summary line: no "leaked semaphore" or other noise from the broken pool.
    [line] = stderr.strip().splitlines()
    assert line.startswith(f"{N_IMAGES} images: {N_IMAGES} ok, 0 errors"), stderr


@pytest.mark.slow
def test_workers_exit_when_batchscore_is_killed(tmp_path: Path, images: Path, model: Path) -> None:
    dataset = tmp_path / "preds"
    with running(command(images, dataset, model, "--batch-size", "2")) as process:
        wait_for_first_part(dataset, process)
        left = children(process.pid)
        process.kill()
        process.wait()
        deadline = time.monotonic() + 5
        while any(map(is_running, left)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in left if is_running(pid)]


@contextmanager
def mounted_tmpfs(target: Path, options: str) -> Iterator[Path]:
    """A small filesystem of our own: skipped where mounting is not allowed (not root)."""
    target.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)]
    if subprocess.run(mount, capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_an_unwritable_dataset_directory_exits_2(tmp_path: Path, images: Path, model: Path) -> None:
    target = tmp_path / "preds"
    one = images / "img_0000.png"
    if os.geteuid() != 0:  # permissions hold for anyone but root
        target.mkdir()
        target.chmod(0o555)
        done = subprocess.run(
            command(one, target, model), capture_output=True, text=True, check=False
        )
        target.chmod(0o755)
    else:  # root ignores permissions, not a read-only filesystem
        with mounted_tmpfs(target, "ro,size=64k"):
            done = subprocess.run(
                command(one, target, model), capture_output=True, text=True, check=False
            )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"batchscore: error: cannot write output {target}: "
        + ("Read-only file system" if os.geteuid() == 0 else "Permission denied")
    ]


@pytest.mark.slow
def test_a_full_disk_mid_run_exits_1_and_leaves_nothing_half_written(
    tmp_path: Path, images: Path, model: Path
) -> None:
    with mounted_tmpfs(tmp_path / "disk", "size=96k") as disk:
        dataset = disk / "preds"
        argv = command(images, dataset, model)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 1, done.stderr
        [line] = done.stderr.strip().splitlines()
        assert line.startswith("batchscore: error: cannot write ") and "No space left" in line
        committed = len(check_dataset(dataset, complete=False))
        assert 0 < committed < N_IMAGES
        assert not list(dataset.glob("run_date=*/.*.tmp"))
        failed = last_summary(dataset)
        assert failed["status"] == "failed"
        assert failed["n_committed"] == committed  # what `runs` shows, not what was scored

        remount = ["mount", "-o", "remount,size=8m", str(disk)]
        subprocess.run(remount, check=True)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        check_dataset(dataset, complete=True)


def _fill(disk: Path) -> None:
    with (disk / "filler").open("wb", buffering=0) as handle, suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)


@pytest.mark.parametrize("when", ["before the run", "when a part opens"])
def test_a_disk_full_from_the_start_is_one_line_and_leaves_no_temporary(
    tmp_path: Path, images: Path, model: Path, when: str
) -> None:
    with mounted_tmpfs(tmp_path / "disk", "size=96k") as disk:
        dataset = disk / "preds"
        if when == "when a part opens":  # the lock file keeps its page for the pid
            argv = command(images / "img_0000.png", dataset, model, "--workers", "0")
            subprocess.run(argv, capture_output=True, check=True)
        _fill(disk)
        argv = command(images / "img_0001.png", dataset, model, "--workers", "0")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 1
        assert "Traceback" not in done.stderr
        assert not [p for p in dataset.rglob(".*") if p.name.endswith(".tmp")]
