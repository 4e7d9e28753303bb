"""jobs/: the cron and systemd wrappers, run end to end with bash on real images and models."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from batchscore.store import LOCK_NAME
from tests.conftest import COLORS, REPO, noisy
from tests.models import color_model

JOBS = REPO / "jobs"
SCRIPTS = ("nightly.sh", "canary.sh", "rescore.sh")
# The scripts run batchscore from this very environment, as cron would run a venv's.
BATCHSCORE = f"{sys.executable} -m batchscore"
TRUTH = ["red", "green", "blue", "green", "green", "blue", "red", "green", "red"]


def settings_of(script: str) -> set[str]:
    """The environment variables a script documents in its header."""
    header = (JOBS / script).read_text().split("\nset -euo pipefail", 1)[0]
    return set(re.findall(r"^#   ([A-Z_]+)", header, re.M))


def environment(**settings: str | Path) -> dict[str, str]:
    documented = set().union(*(settings_of(s) for s in SCRIPTS))
    env = {k: v for k, v in os.environ.items() if k not in documented}
    env.update(BATCHSCORE=BATCHSCORE, WORKERS="0")
    return env | {k: str(v) for k, v in settings.items()}


def job(
    script: str, *args: str, cwd: Path | None = None, **settings: str | Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(JOBS / script), *args],
        env=environment(**settings),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def write_images(folder: Path, colors: list[str], start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(colors, start):
        path = folder / f"img_{i:04d}_{name}.png"
        noisy(COLORS[name], (24, 20), seed=i).save(path)
        paths.append(path)
    return paths


def sha256(model: Path) -> str:
    return hashlib.sha256((model / "model.onnx").read_bytes()).hexdigest()


@contextmanager
def holding_the_lock(dataset: Path) -> Iterator[None]:
    """Be "another run": hold the dataset's flock exactly as batchscore does."""
    dataset.mkdir(parents=True, exist_ok=True)
    with (dataset / LOCK_NAME).open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def test_nightly_scores_exactly_the_new_uploads_and_logs_each_run(
    tmp_path: Path, color_model_dir: Path
) -> None:
    uploads, dataset = tmp_path / "uploads", tmp_path / "preds"
    first = write_images(uploads, TRUTH[:6])
    settings = {"UPLOADS": uploads, "DATASET": dataset, "MODEL": color_model_dir}
    for _ in range(2):  # the second night finds nothing new
        done = job("nightly.sh", **settings)
        assert done.returncode == 0, done.stderr
        assert done.stdout == done.stderr == ""  # silent when all went well: cron mails nothing
    assert sorted(pd.read_parquet(dataset)["image_id"]) == [str(p) for p in first]

    new = write_images(uploads, TRUTH[6:], start=6)
    done = job("nightly.sh", **settings)
    assert done.returncode == 0, done.stderr
    frame = pd.read_parquet(dataset)
    assert len(frame) == 9 and frame["image_id"].is_unique
    newest = frame[frame["run_id"] == frame["run_id"].max()]
    assert sorted(newest["image_id"]) == [str(p) for p in new]
    assert (frame["pred_label"] == frame["image_id"].str.extract(r"_([a-z]+)\.png$")[0]).all()

    log = (dataset / "_logs" / "nightly.log").read_text().splitlines()
    assert [line.split("] ", 1)[1].split(":")[0] for line in log if "nightly.sh[" in line] == [
        "start",
        "exit 0",
    ] * 3
    assert "--incremental" in log[0] and "--max-error-rate 0.05" in log[0]
    summaries = [line for line in log if "nightly.sh[" not in line]
    assert summaries[0].startswith("6 images: 6 ok, 0 errors")
    assert summaries[1].startswith("nothing new to score (6 images already scored)")
    assert summaries[2].startswith("3 images: 3 ok, 0 errors (6 already scored by any model")


def test_overlapping_runs_are_refused_with_75_or_wait(
    tmp_path: Path, color_model_dir: Path
) -> None:
    uploads, dataset, log = tmp_path / "uploads", tmp_path / "preds", tmp_path / "nightly.log"
    write_images(uploads, TRUTH[:3])
    settings = {"UPLOADS": uploads, "DATASET": dataset, "MODEL": color_model_dir, "LOG": log}
    with holding_the_lock(dataset):
        refused = job("nightly.sh", **settings)
        assert refused.returncode == 75
        assert "another batchscore run" in refused.stderr  # mailed by cron
        assert "exit 75: another run holds the dataset's lock" in log.read_text()
        assert not list(dataset.glob("run_date=*/*"))

        waiting = subprocess.Popen(
            ["bash", str(JOBS / "nightly.sh"), "--wait-lock"],
            env=environment(**settings),
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while log.read_text().count("start:") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # batchscore is blocked in flock() now
        assert waiting.poll() is None, waiting.stderr
    _, stderr = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, stderr
    assert len(pd.read_parquet(dataset)) == 3


def test_error_rate_exit_code_passes_through_once_per_broken_upload(
    tmp_path: Path, color_model_dir: Path
) -> None:
    uploads, dataset = tmp_path / "uploads", tmp_path / "preds"
    write_images(uploads, ["red", "blue", "green"])
    (uploads / "empty.png").write_bytes(b"")
    (uploads / "late.png").write_bytes(b"\x89PNG\r\n\x1a\n half uploaded")
    settings = {"UPLOADS": uploads, "DATASET": dataset, "MODEL": color_model_dir}
    done = job("nightly.sh", "--max-error-rate", "0.25", **settings)
    assert done.returncode == 4
    assert "2 of 5 images failed (40.0%), more than --max-error-rate 25.0%" in done.stderr
    assert "exit 4: too many images failed" in done.stderr
    assert pd.read_parquet(dataset)["status"].value_counts().to_dict() == {"ok": 3, "error": 2}

    # The next night does not fail again on the same broken files...
    assert job("nightly.sh", "--max-error-rate", "0.25", **settings).returncode == 0
    # ...but scores the upload once it is complete (new size and mtime).
    noisy(COLORS["red"], (24, 20)).save(uploads / "late.png")
    assert job("nightly.sh", "--max-error-rate", "0.25", **settings).returncode == 0
    frame = pd.read_parquet(dataset).sort_values("scored_at")
    late = frame[frame["image_id"] == str(uploads / "late.png")]
    assert late["status"].tolist() == ["error", "ok"]
    # RETRY_ERRORS=1 tries the unchanged broken file again, and fails on it again.
    again = job("nightly.sh", RETRY_ERRORS="1", **settings)
    assert again.returncode == 4
    assert "1 of 1 images failed (100.0%)" in again.stderr
    assert len(pd.read_parquet(dataset)) == 7


@pytest.mark.slow
def test_sigterm_to_the_script_stops_batchscore_cleanly(
    tmp_path: Path, color_model_dir: Path
) -> None:
    uploads, dataset = tmp_path / "uploads", tmp_path / "preds"
    write_images(uploads, (TRUTH * 30)[:240])
    args = ["--", "--batch-size", "1", "--part-rows", "5"]
    settings = {"UPLOADS": uploads, "DATASET": dataset, "MODEL": color_model_dir, "WORKERS": "1"}
    script = subprocess.Popen(
        ["bash", str(JOBS / "nightly.sh"), *args],
        env=environment(**settings),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not list(dataset.glob("run_date=*/part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert script.poll() is None, "the run finished before it could be stopped"
    script.send_signal(signal.SIGTERM)  # what systemctl stop does with KillMode=mixed
    _, stderr = script.communicate(timeout=60)
    assert script.returncode == 143, stderr
    assert "run the same command again to finish" in stderr
    assert "exit 143: stopped by a signal; the next run resumes" in stderr
    assert 0 < len(pd.read_parquet(dataset)) < 240

    done = job("nightly.sh", *args, **settings)
    assert done.returncode == 0, done.stderr
    frame = pd.read_parquet(dataset)
    assert len(frame) == 240 and frame["image_id"].is_unique


def test_rescore_then_diff_end_to_end(tmp_path: Path) -> None:
    old = color_model(tmp_path / "v1")
    new = color_model(tmp_path / "v2", class_names=("red", "blue", "green"), scale=3)
    uploads, dataset = tmp_path / "uploads", tmp_path / "preds"
    write_images(uploads, TRUTH)
    nightly = job("nightly.sh", UPLOADS=uploads, DATASET=dataset, MODEL=old)
    assert nightly.returncode == 0, nightly.stderr

    no_previous = job("rescore.sh", str(uploads), DATASET=dataset, NEW_MODEL=old)
    assert no_previous.returncode == 2
    assert "set OLD_SHA" in no_previous.stderr

    settings = {"DATASET": dataset, "NEW_MODEL": new, "MAX_CHANGED_SHARE": "1"}
    done = job("rescore.sh", str(uploads), cwd=tmp_path, **settings)
    assert done.returncode == 0, done.stderr
    assert f"A: {dataset} (model {sha256(old)[:12]})" in done.stdout  # found in the runs
    assert f"B: {dataset} (model {sha256(new)[:12]})" in done.stdout
    assert "changed top-1: 6 of 9 (66.7%)" in done.stdout
    changed = tmp_path / f"changed-{sha256(old)[:12]}-{sha256(new)[:12]}.parquet"
    assert pd.read_parquet(changed)["a_pred_label"].tolist().count("green") == 4
    assert pd.read_parquet(dataset)["model_sha256"].value_counts().to_list() == [9, 9]

    settings["MAX_CHANGED_SHARE"] = "0.5"
    changed_to = tmp_path / "c.parquet"
    guarded = job("rescore.sh", "--changed", str(changed_to), SOURCES=uploads, **settings)
    assert guarded.returncode == 3
    assert "nothing new to score (9 images already scored)" in guarded.stderr  # resumable
    assert "more than --max-changed-share 50.0%" in guarded.stderr
    assert len(pd.read_parquet(changed_to)) == 6
    assert len(pd.read_parquet(dataset)) == 18


def test_canary_blesses_or_blocks(tmp_path: Path) -> None:
    canary_set = tmp_path / "canary"
    for color in COLORS:
        write_images(canary_set / color, [color] * 3)
    current = color_model(tmp_path / "current")
    swapped = color_model(tmp_path / "swapped", class_names=("red", "blue", "green"), scale=3)
    settings = {"CANARY_SET": canary_set, "MIN_ACCURACY": "0.9", "CURRENT": current}

    passed = job("canary.sh", CANDIDATE=current, REPORT_DIR=tmp_path / "ok", **settings)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert (tmp_path / "ok" / "canary.json").exists()

    failed = job("canary.sh", "--report", str(tmp_path / "no"), CANDIDATE=swapped, **settings)
    assert failed.returncode == 3, failed.stdout + failed.stderr
    assert (tmp_path / "no" / "report.md").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_explain_themselves_and_refuse_bad_usage(script: str) -> None:
    shown = job(script, "--help")
    assert shown.returncode == 0
    assert "Settings: environment variables" in shown.stdout
    assert "Example:" in shown.stdout and "BATCHSCORE" in shown.stdout
    unknown = job(script, "--no-such-flag")
    assert unknown.returncode == 2
    assert "unknown option --no-such-flag" in unknown.stderr
    missing = job(script)
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"{script}: ")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean() -> None:
    done = subprocess.run(
        ["shellcheck", *(str(JOBS / s) for s in SCRIPTS)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout


def test_cron_and_systemd_examples_use_documented_settings() -> None:
    documented = settings_of("nightly.sh") | {"SHELL", "MAILTO"}
    crontab = (JOBS / "crontab.example").read_text()
    service = (JOBS / "batchscore-nightly.service").read_text()
    used = set(re.findall(r"(?:^|\s|Environment=)([A-Z_]+)=", crontab + service, re.M))
    assert used and used <= documented | settings_of("canary.sh")
    assert "/jobs/nightly.sh" in crontab
    assert re.search(r"^ExecStart=\S+/jobs/nightly\.sh$", service, re.M)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_units_verify(tmp_path: Path) -> None:
    for name in ("batchscore-nightly.service", "batchscore-nightly.timer"):
        text = (JOBS / name).read_text()
        text = re.sub(r"^ExecStart=\S+", f"ExecStart={JOBS / 'nightly.sh'}", text, flags=re.M)
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", *(str(p) for p in sorted(tmp_path.iterdir()))],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and not done.stderr, done.stderr


def scored_reference(tmp_path: Path) -> tuple[Path, Path]:
    """A colour model, and a dataset of 54 images it scored: the monitor's reference."""
    model = color_model(tmp_path / "model")
    reference_images, reference = tmp_path / "reference_images", tmp_path / "reference"
    write_images(reference_images, TRUTH * 6)
    args = ["-m", "batchscore", "score", str(reference_images), "-o", f"{reference}/"]
    args += ["--model", str(model), "--workers", "0"]
    assert subprocess.run([sys.executable, *args], check=False).returncode == 0
    return model, reference


def test_nightly_monitors_tonights_run_and_says_what_moved_and_where_the_report_is(
    tmp_path: Path,
) -> None:
    model, reference = scored_reference(tmp_path)
    uploads, dataset = tmp_path / "uploads", tmp_path / "preds"
    uploads.mkdir()
    settings = {"UPLOADS": uploads, "DATASET": dataset, "MODEL": model,
                "MONITOR_REFERENCE": reference}  # fmt: skip
    log = dataset / "_logs" / "nightly.log"

    first = job("nightly.sh", **settings)  # the first night: no uploads yet
    assert first.returncode == 0, first.stderr
    assert "no new uploads tonight: nothing to monitor" in log.read_text()

    write_images(uploads, TRUTH * 4, start=200)  # fresh draws of the reference's process
    quiet = job("nightly.sh", "--run-id", "night-2", **settings)
    assert quiet.returncode == 0, quiet.stderr
    saved = json.loads((dataset / "_monitor" / "night-2" / "monitor.json").read_text())
    assert saved["window"] == "run night-2" and saved["verdict"] == "ok"

    write_images(uploads, ["red"] * 36, start=300)  # a night of one colour only
    alert = job("nightly.sh", **settings, RUN_ID="night-3")
    assert alert.returncode == 3, alert.stderr
    text = log.read_text()
    assert f"exit 3: ALERT: monitor found drift against {reference}" in text
    assert re.search(r"ALERT prediction drift \(class mix\).*moved most: red \d+% -> 100%", text)
    assert re.search(
        rf"moved most: red \d+% -> 100% \(e\.g\. {uploads}/img_03\d\d_red\.png\)", text
    )
    assert f"monitor report: {dataset}/_monitor/night-3/report.md" in text
    assert "ALERT" in alert.stderr and "night-3/report.md" in alert.stderr  # in cron's mail

    again = job("nightly.sh", **settings, RUN_ID="night-4")  # nothing new since
    assert again.returncode == 0, again.stderr  # the old alert is not sent again
    assert text.count("ALERT prediction drift") == log.read_text().count("ALERT prediction drift")
    assert not (dataset / "_monitor" / "night-4").exists()
    assert sorted(p.name for p in (dataset / "_monitor").iterdir()) == ["night-2", "night-3"]


def test_nightly_passes_monitor_options_and_monitors_a_night_that_exits_4(
    tmp_path: Path,
) -> None:
    model, reference = scored_reference(tmp_path)
    uploads, dataset = tmp_path / "uploads", tmp_path / "preds"
    broken = write_images(uploads, TRUTH * 4, start=200)
    for path in broken[:6]:
        path.write_bytes(b"not a png")  # 6 of 36 fail: more than MAX_ERROR_RATE
    night = job("nightly.sh", "--monitor-args", "--alpha 0.05 --max-error-rate-rise 0.5",
                UPLOADS=uploads, DATASET=dataset, MODEL=model, MONITOR_REFERENCE=reference,
                RUN_ID="night-1")  # fmt: skip
    assert night.returncode == 4, night.stderr  # the scoring's verdict, kept
    saved = json.loads((dataset / "_monitor" / "night-1" / "monitor.json").read_text())
    assert saved["false_alarm_rate"] == 0.05  # the options reached the monitor
    errors = next(s for s in saved["signals"] if s["name"] == "error rate rise")
    assert errors["threshold"] == 0.5 and errors["alert"] is False

    write_images(uploads, TRUTH * 4, start=400)
    wrong = job("nightly.sh", "--monitor-args", "--no-such-option", UPLOADS=uploads,
                DATASET=dataset, MODEL=model, MONITOR_REFERENCE=reference)  # fmt: skip
    assert wrong.returncode == 2 and "No such option '--no-such-option'" in wrong.stderr


def test_a_model_change_scores_only_new_uploads_and_is_monitored_against_its_own_canary(
    tmp_path: Path,
) -> None:
    """References kept one folder per model (`batchscore canary --report REFS/NAME`): the
    monitor picks the window's model's, and a model without one is told how to make it."""
    old, new = color_model(tmp_path / "old"), color_model(tmp_path / "new", scale=4.0)
    refs = tmp_path / "refs"
    canary_set = tmp_path / "canary_set"
    for i, colour in enumerate(TRUTH * 6):
        write_images(canary_set / colour, [colour], start=1000 + i)

    def canary(model: Path, name: str) -> None:
        args = ["-m", "batchscore", "canary", str(canary_set), "--model", str(model)]
        args += ["--report", str(refs / name), "--workers", "0"]
        assert subprocess.run([sys.executable, *args], check=False).returncode == 0

    canary(old, "old")
    uploads, dataset = tmp_path / "uploads", tmp_path / "preds"
    settings = {"UPLOADS": uploads, "DATASET": dataset, "MONITOR_REFERENCE": refs}
    write_images(uploads, TRUTH * 4, start=0)
    assert job("nightly.sh", **settings, MODEL=old, RUN_ID="n1").returncode == 0

    write_images(uploads, TRUTH * 4, start=100)  # the model changes with tonight's uploads
    changed = job("nightly.sh", **settings, MODEL=new, RUN_ID="n2")
    assert changed.returncode == 2, changed.stderr
    assert "no canary report of model" in changed.stderr
    assert f"--report {refs}/NAME" in changed.stderr
    assert re.search(
        r"tonight is not monitored; once fixed: .* monitor .* --run n2 ", changed.stderr
    )
    tonight = pd.read_parquet(dataset, filters=[("run_id", "==", "n2")])
    assert len(tonight) == 36  # only the new uploads: the 36 of night 1 are not rescored

    canary(new, "new")
    write_images(uploads, TRUTH * 4, start=200)
    night = job("nightly.sh", **settings, MODEL=new, RUN_ID="n3")
    assert night.returncode == 0, night.stderr
    saved = json.loads((dataset / "_monitor" / "n3" / "monitor.json").read_text())
    assert saved["reference"] == str(refs / "new")
    assert [n["run_id"] for n in saved["trend"]] == ["n2", "n3"]  # night 1 was the old model's
