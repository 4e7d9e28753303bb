"""Any file, any name, any bytes: no input may crash, hang or silently lose a nightly run.

The corpus (tests/hostile.py) is generated: non-UTF-8 and newline names, a FIFO, /dev/zero,
thin strips, oriented TIFFs and JPEGs, a TGA-confusable ICO, formats Pillow cannot decode here,
truncated files, a bomb. Runs go through the real CLI in a subprocess with a time limit, and
the Parquet they write is read back.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from batchscore.cli import cli
from tests.conftest import COLORS, noisy
from tests.hostile import NON_UTF8_NAME, build_corpus
from tests.models import color_model

SUMMARY = re.compile(r"^(\d+ images?: \d+ ok, \d+ errors.*|nothing new to score.*) -> .+$")
CROPPING = {
    "resize_size": 256,
    "crop_size": 224,
    "interpolation": "bilinear",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "output": "logits",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[bytes, str]]:
    return build_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The colour model behind a resize-256 / crop-224 config, so thin strips take the crop."""
    return color_model(tmp_path_factory.mktemp("model"), size=224, preprocess=CROPPING)


def run(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess; a hang fails the test instead of stalling the suite."""
    argv = [sys.executable, "-m", "batchscore", *map(os.fsdecode, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def rows_by_bytes(table: pd.DataFrame) -> dict[bytes, pd.Series]:
    return {row.path_bytes: row for row in table.itertuples()}  # type: ignore[misc]


def check_every_input_once(output: Path, expect: dict[bytes, str]) -> pd.DataFrame:
    table = pd.read_parquet(output)
    counts = Counter(table["path_bytes"])
    assert counts == Counter(list(expect)), "every input exactly once, nothing else"
    for row in table.itertuples():
        outcome = expect[row.path_bytes]
        if outcome != "ok-or-error":
            assert row.status == outcome.split("-")[0], (row.path, row.error)
        assert row.path == _readable(row.path_bytes)
    return table


def _readable(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def check_quiet(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and SUMMARY.match(lines[0]), done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_the_whole_corpus_from_a_manifest_is_scored_quietly_each_input_once(
    tmp_path: Path, corpus: tuple[Path, Path, dict[bytes, str]], model: Path, workers: str
) -> None:
    _, manifest, expect = corpus
    expect = {path: outcome for path, outcome in expect.items() if b"\n" not in path}
    output = tmp_path / "out.parquet"
    done = run("score", manifest, "-o", output, "--model", model, "--workers", workers)
    check_quiet(done)
    table = check_every_input_once(output, expect)
    rows = {os.path.basename(row.path_bytes): row for row in table.itertuples()}

    # A non-UTF-8 name is scored, shown readably, and its bytes open the same file.
    bad = rows[NON_UTF8_NAME]
    assert bad.status == "ok" and bad.pred_label == "blue"
    assert bad.path.endswith("bad\\xff\\xfe.png") and bad.image_id == bad.path
    assert os.path.isfile(os.fsdecode(bad.path_bytes))

    # Upright sizes: the TIFF decoder turns the image itself, JPEG does not.
    for name in (b"tiff_orientation_", b"jpeg_orientation_"):
        sizes = {o: (rows[name + b"%d" % o + b"." + _ext(name)].width,
                     rows[name + b"%d" % o + b"." + _ext(name)].height)
                 for o in (1, 5, 6, 8)}  # fmt: skip
        assert sizes == {1: (50, 30), 5: (30, 50), 6: (30, 50), 8: (30, 50)}, name

    # The ICO opens as an ICO even though a TGA was decoded just before in the same process.
    icon = rows[b"b_icon.ico"]
    assert (icon.status, icon.width, icon.height) == ("ok", 256, 256), icon.error

    # Thin strips are scored with bounded memory (see the memory test below).
    assert rows[b"thin_1x4000.png"].pred_label == "red"
    assert rows[b"thin_40000x1.png"].pred_label == "blue"

    # Reasons say what is missing, not "corrupt".
    assert rows[b"unknown_pixels.dds"].error.startswith("unsupported image feature: ")
    assert rows[b"drawing.wmf"].error.startswith("unsupported format: WMF is recognised")
    eps = rows[b"vector.eps"]
    if shutil.which("gs") is None:
        assert eps.error.startswith("needs Ghostscript"), eps.error
    assert rows[b"pipe.png"].error == "not a regular file"
    assert rows[b"zero"].error == "not a regular file"
    assert rows[b"bomb_20000x20000.png"].error.startswith("decompression bomb")

    # libtiff's complaint is in the row, not on the terminal.
    assert "Fax4Decode" in rows[b"noisy_libtiff.tif"].warning
    assert table["warning"].notna().sum() < len(table) / 2


def _ext(name: bytes) -> bytes:
    return b"tif" if name.startswith(b"tiff") else b"jpg"


@pytest.mark.slow
def test_the_corpus_folder_into_a_dataset_with_sha256_fingerprints_resumes_to_nothing(
    tmp_path: Path, corpus: tuple[Path, Path, dict[bytes, str]], model: Path
) -> None:
    folder, _, expect = corpus
    image_suffixes = (b".png", b".jpg", b".gif", b".tif")
    walked = {
        path: outcome
        for path, outcome in expect.items()
        if path.startswith(os.fsencode(folder)) and path.lower().endswith(image_suffixes)
    }
    del walked[os.fsencode(folder / "folder.png")]  # a directory is walked into, not scored
    dataset = tmp_path / "preds"
    argv = ("score", folder, "-o", f"{dataset}/", "--model", model, "--workers", "2")
    flags = ("--incremental", "--fingerprint", "sha256", "--no-retry-errors")
    check_quiet(run(*argv, *flags))
    check_every_input_once(dataset, walked)
    again = run(*argv, *flags)
    check_quiet(again)
    assert again.stderr.startswith("nothing new to score"), again.stderr
    assert len(pd.read_parquet(dataset)) == len(walked)


def test_sha256_fingerprints_never_open_a_fifo_or_read_a_device_forever(
    tmp_path: Path, color_model_dir: Path
) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    image = tmp_path / "red.png"
    noisy(COLORS["red"], (20, 20)).save(image)
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{fifo}\n/dev/zero\n{image}\n")
    dataset = tmp_path / "preds"
    argv = ("score", manifest, "-o", f"{dataset}/", "--model", color_model_dir)
    done = run(*argv, "--incremental", "--fingerprint", "sha256", "--workers", "0", timeout=60)
    check_quiet(done)
    table = pd.read_parquet(dataset).set_index("path")
    assert table.loc[str(fifo), "error"] == "not a regular file"
    assert table.loc["/dev/zero", "error"] == "not a regular file"
    assert pd.isna(table.loc["/dev/zero", "fingerprint"])
    assert table.loc[str(image), "fingerprint"].startswith("sha256:")


def test_fingerprint_sha256_without_incremental_is_refused(
    tmp_path: Path, color_model_dir: Path
) -> None:
    output = tmp_path / "out.parquet"
    result = CliRunner().invoke(
        cli,
        [
            "score",
            "/dev/null",
            "-o",
            str(output),
            "--fingerprint",
            "sha256",
            "--model",
            str(color_model_dir),
        ],
    )
    assert result.exit_code == 2
    assert "--fingerprint sha256 only tells --incremental" in result.output
    assert not output.exists()


@pytest.mark.slow
def test_sigterm_stops_a_run_busy_hashing_huge_files_within_seconds(
    tmp_path: Path, color_model_dir: Path
) -> None:
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as handle:  # sparse: 4 GiB of zeros that take no disk
        handle.truncate(4 << 30)
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{huge}\n" * 20)  # ~80 GiB to hash: minutes without the stop
    argv = [sys.executable, "-m", "batchscore", "score", str(manifest), "-o", f"{tmp_path}/ds/"]
    argv += ["--model", str(color_model_dir), "--incremental", "--fingerprint", "sha256"]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        assert process.poll() is None, "the run ended before it was signalled"
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert time.monotonic() - sent < 10
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert stderr.strip().startswith("batchscore: error: stopped by signal 15")


def test_a_stale_temporary_of_a_killed_file_run_is_removed(
    tmp_path: Path, color_model_dir: Path
) -> None:
    image = tmp_path / "red.png"
    noisy(COLORS["red"], (20, 20)).save(image)
    output = tmp_path / "out.parquet"
    stale = tmp_path / f".out.parquet.{_dead_pid()}-0123abcd.tmp"
    stale.write_bytes(b"half a file")
    alive = tmp_path / f".out.parquet.{os.getpid()}-0123abcd.tmp"  # a live writer's: kept
    alive.write_bytes(b"being written")
    args = ["score", str(image), "-o", str(output), "--model", str(color_model_dir)]
    result = CliRunner().invoke(cli, [*args, "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and alive.exists()
    assert len(pd.read_parquet(output)) == 1


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_non_utf8_names_in_a_folder_and_on_the_command_line(
    tmp_path: Path, color_model_dir: Path
) -> None:
    folder = tmp_path / "uploads"
    folder.mkdir()
    bad = os.path.join(os.fsencode(folder), NON_UTF8_NAME)
    noisy(COLORS["green"], (20, 20)).save(os.fsdecode(bad), format="PNG")
    for source in (folder, os.fsdecode(bad)):
        output = tmp_path / "out.parquet"
        args = ["score", os.fsdecode(source), "-o", str(output)]
        result = CliRunner().invoke(cli, [*args, "--model", str(color_model_dir), "--workers", "0"])
        assert result.exit_code == 0, result.output
        [row] = pd.read_parquet(output).itertuples()
        assert row.path_bytes == bad and row.pred_label == "green"
        assert row.path == os.fsdecode(bad).encode("utf-8", "surrogateescape").decode(
            "utf-8", "backslashreplace"
        )


@pytest.mark.parametrize("kind", ["txt", "csv", "jsonl", "parquet"])
def test_manifests_with_bytes_that_are_not_utf8_never_crash(
    tmp_path: Path, color_model_dir: Path, kind: str
) -> None:
    """A path's bytes are the file's name; any other field's bad bytes become \\xNN and a
    warning in the row."""
    bad = os.fsencode(tmp_path) + b"/caf\xe9.png"  # Latin-1 bytes, as old uploaders wrote
    noisy(COLORS["red"], (20, 20)).save(os.fsdecode(bad), format="PNG")
    good = tmp_path / "good.png"
    noisy(COLORS["blue"], (20, 20)).save(good)
    manifest = tmp_path / f"list.{kind}"
    if kind == "txt":
        manifest.write_bytes(bad + b"\n" + os.fsencode(good) + b"\n")
    elif kind == "csv":
        lines = [b"path,id,note", bad + b",one,ol\xe9", os.fsencode(good) + b",two,fine"]
        manifest.write_bytes(b"\n".join(lines) + b"\n")
    elif kind == "jsonl":
        first = b'{"path": "' + bad + b'", "id": "one", "note": "ol\xe9"}'
        manifest.write_bytes(first + b"\n" + json.dumps({"path": str(good)}).encode() + b"\n")
    else:
        table = pa.table({"path": pa.array([bad, os.fsencode(good)], pa.binary())})
        pq.write_table(table, manifest)
    output = tmp_path / "out.parquet"
    result = CliRunner().invoke(
        cli,
        [
            "score",
            str(manifest),
            "-o",
            str(output),
            "--model",
            str(color_model_dir),
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = pd.read_parquet(output)
    assert list(rows["path_bytes"]) == [bad, os.fsencode(good)]
    assert list(rows["status"]) == ["ok", "ok"]
    assert list(rows["pred_label"]) == ["red", "blue"]
    if kind in ("csv", "jsonl"):
        assert rows["note"][0] == "ol\\xe9"
        assert "not UTF-8 in note" in rows["warning"][0]
        assert pd.isna(rows["warning"][1])


def test_a_nul_byte_or_an_oversized_csv_field_is_an_error_row_and_the_rest_is_read(
    tmp_path: Path, color_model_dir: Path
) -> None:
    good = tmp_path / "good.png"
    noisy(COLORS["blue"], (20, 20)).save(good)
    manifest = tmp_path / "list.csv"
    huge = b"x" * 200_000  # over the csv module's field limit
    rows = [b"path", b"bad\x00name.png", huge + b".png", os.fsencode(good)]
    manifest.write_bytes(b"\n".join(rows) + b"\n")
    output = tmp_path / "ds"
    args = ["score", str(manifest), "-o", f"{output}/", "--incremental"]
    result = CliRunner().invoke(cli, [*args, "--model", str(color_model_dir), "--workers", "0"])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(output)
    assert list(table["status"]) == ["error", "error", "ok"]
    assert "NUL byte" in table["error"][0]
    assert "unreadable CSV row (field larger than field limit" in table["error"][1]


@pytest.mark.parametrize("split", [0, 1, 2, 3, 4, 5])
def test_duplicate_ids_resume_exactly_once(
    tmp_path: Path, color_model_dir: Path, split: int
) -> None:
    """Rows sharing an id are different images when their paths differ, and the same
    (id, path) listed twice is scored twice. A run killed after `split` rows (parts are
    committed in input order) and run again leaves what one uninterrupted run leaves."""
    paths = []
    for name in ("red", "green", "blue"):
        path = tmp_path / f"{name}.png"
        noisy(COLORS[name], (20, 20)).save(path)
        paths.append(path)
    rows = [("a", paths[0]), ("a", paths[1]), ("b", paths[2]), ("b", paths[2]), ("c", paths[0])]
    full = tmp_path / "full.csv"
    full.write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in rows))
    prefix = tmp_path / "prefix.csv"
    prefix.write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in rows[:split]))

    def score(manifest: Path, dataset: Path) -> None:
        args = ["score", str(manifest), "-o", f"{dataset}/", "--model", str(color_model_dir)]
        result = CliRunner().invoke(cli, [*args, "--workers", "0"])
        assert result.exit_code == 0, result.output

    score(full, tmp_path / "uninterrupted")
    if split:
        score(prefix, tmp_path / "resumed")
    score(full, tmp_path / "resumed")
    score(full, tmp_path / "resumed")  # a third run finds nothing left
    columns = ["image_id", "path", "pred_label"]

    def key(name: str) -> list[tuple[str, str, str]]:
        table = pd.read_parquet(tmp_path / name, columns=columns)
        return sorted(map(tuple, table.to_numpy().tolist()))

    assert key("resumed") == key("uninterrupted")
    assert len(key("uninterrupted")) == len(rows)


def test_column_names_stay_unique_and_never_shadow_the_partition(
    tmp_path: Path, color_model_dir: Path
) -> None:
    image = tmp_path / "red.png"
    noisy(COLORS["red"], (20, 20)).save(image)
    manifest = tmp_path / "list.csv"
    header = b"path,status,manifest_status,run_date,weird\xff\n"  # not UTF-8 either
    manifest.write_bytes(header + os.fsencode(image) + b",s1,s2,2020-01-01,w\n")
    for output in (tmp_path / "out.parquet", tmp_path / "ds"):
        target = f"{output}/" if output.suffix == "" else str(output)
        args = ["score", str(manifest), "-o", target, "--model", str(color_model_dir)]
        result = CliRunner().invoke(cli, [*args, "--workers", "0"])
        assert result.exit_code == 0, result.output
        table = pd.read_parquet(output)  # pandas fails on duplicate or clashing names
        assert len(set(pq.read_schema(_a_file(output)).names)) == len(
            pq.read_schema(_a_file(output)).names
        )
        row = table.iloc[0]
        assert row["status"] == "ok"
        assert row["manifest_status"] == "s1"
        assert row["manifest_manifest_status"] == "s2"
        assert row["manifest_run_date"] == "2020-01-01"
        assert row["weird\\xff"] == "w"


def _a_file(output: Path) -> Path:
    return output if output.is_file() else next(output.glob("run_date=*/*.parquet"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["", "-o", "x.parquet"], "empty source path"),
        (["{image}", "-o", "preds.csv"], "is neither a .parquet file name nor a directory"),
        (["{image}", "-o", ""], "empty output path"),
    ],
)
def test_an_empty_source_or_a_non_parquet_output_is_one_line_exit_2(
    tmp_path: Path, color_model_dir: Path, args: list[str], message: str
) -> None:
    image = tmp_path / "red.png"
    noisy(COLORS["red"], (20, 20)).save(image)
    os.chdir(tmp_path)
    argv = ["score", *(a.format(image=image) for a in args), "--model", str(color_model_dir)]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["color_model", "red.png"]


def test_a_name_too_long_or_a_symlink_loop_says_so(tmp_path: Path, color_model_dir: Path) -> None:
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{tmp_path / 'loop.png'}\n{tmp_path / ('x' * 300)}.png\n")
    output = tmp_path / "out.parquet"
    args = ["score", str(manifest), "-o", str(output), "--model", str(color_model_dir)]
    assert CliRunner().invoke(cli, [*args, "--workers", "0"]).exit_code == 0
    reasons = list(pd.read_parquet(output)["error"])
    assert reasons == [
        "cannot read file: Too many levels of symbolic links",
        "cannot read file: File name too long",
    ]


def test_an_output_path_that_is_not_utf8_is_one_line_exit_2(
    tmp_path: Path, color_model_dir: Path
) -> None:
    image = tmp_path / "red.png"
    noisy(COLORS["red"], (20, 20)).save(image)
    for name in (b"out\xff.parquet", b"ds\xff/"):
        output = os.fsdecode(os.fsencode(tmp_path) + b"/" + name)
        args = ["score", str(image), "-o", output, "--model", str(color_model_dir)]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert "is not valid UTF-8" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["color_model", "red.png"]


def test_the_lock_is_taken_before_the_model_is_even_loaded(tmp_path: Path) -> None:
    dataset = tmp_path / "preds"
    dataset.mkdir()
    image = tmp_path / "red.png"
    noisy(COLORS["red"], (20, 20)).save(image)
    with open(dataset / "_batchscore.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        args = ["score", str(image), "-o", f"{dataset}/", "--model", str(tmp_path / "none")]
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 75, result.output  # not 2: the missing model is never reached
    assert "another batchscore run" in result.output


@pytest.mark.slow
def test_max_pixels_can_raise_the_limit_above_pillows_own(
    tmp_path: Path, color_model_dir: Path
) -> None:
    big = tmp_path / "big.png"
    Image.new("1", (13500, 13500)).save(big)  # 182,250,000 pixels: above Pillow's 178,956,970
    output = tmp_path / "out.parquet"
    base = ["score", str(big), "-o", str(output), "--model", str(color_model_dir)]
    assert CliRunner().invoke(cli, [*base, "--workers", "0"]).exit_code == 0
    assert pd.read_parquet(output)["error"][0].startswith("decompression bomb")
    result = CliRunner().invoke(cli, [*base, "--workers", "0", "--max-pixels", "200000000"])
    assert result.exit_code == 0, result.output
    row = pd.read_parquet(output).iloc[0]
    assert (row["status"], row["width"], row["height"]) == ("ok", 13500, 13500)


@pytest.mark.parametrize("size", [(1, 40000), (40000, 1), (3, 100000)])
def test_a_thin_image_is_preprocessed_in_bounded_memory(
    tmp_path: Path, size: tuple[int, int]
) -> None:
    """Resizing the shorter side of a 1x40000 strip to 256 used to make a 256x10,240,000
    intermediate (tens of GB). Peak memory of a fresh process stays small now."""
    path = tmp_path / "thin.png"
    Image.new("RGB", size, (200, 10, 10)).save(path)
    code = (
        "import re, sys\n"
        "from batchscore.preprocess import load_image\n"
        "from batchscore.preprocess_config import resolve_preprocess\n"
        f"config = resolve_preprocess({CROPPING!r})\n"
        "decoded = load_image(sys.argv[1], config)\n"
        "assert decoded.pixels.shape == (224, 224, 3), decoded.pixels.shape\n"
        "assert (decoded.pixels == (200, 10, 10)).all()\n"
        # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's over exec)
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 400_000, f"peak {int(done.stdout) // 1024} MB"
