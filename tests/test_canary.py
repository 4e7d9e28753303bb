"""`batchscore canary`: metrics against scikit-learn, the gate's exit codes, the report files.

Real ONNX models (tests/models.py) score real PNG/JPEG files; scikit-learn and scipy are the
oracles here and only here.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from batchscore.canary import NO_PREDICTION, CanarySettings, run_canary
from batchscore.cli import cli
from batchscore.metrics import classification_metrics, mcnemar_exact_p, wilson_interval
from batchscore.report import confusion_svg
from batchscore.settings import PipelineOptions, ScoreSettings
from tests.conftest import COLORS, SAMPLES, noisy
from tests.models import color_model

SWAPPED = ("green", "red", "blue")  # a model that calls red images green and green ones red


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, ["canary", *args])


def image_folder(root: Path, layout: dict[str, list[str]]) -> Path:
    """ImageFolder layout: {folder (= label): [true colour of each image]}."""
    seed = 0
    for label, colours in layout.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for colour in colours:
            noisy(COLORS[colour], (24 + seed % 7, 20), seed=seed).save(root / label / f"{seed}.png")
            seed += 1
    return root


@pytest.fixture
def canary_set(tmp_path: Path) -> Path:
    """12 images; one green image is filed under red/, so red recall and green precision < 1."""
    return image_folder(
        tmp_path / "canary",
        {"red": ["red"] * 4 + ["green"], "green": ["green"] * 3, "blue": ["blue"] * 4},
    )


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    """(a model that is right on colours, one that swaps red and green)."""
    return color_model(tmp_path / "good"), color_model(tmp_path / "swapped", class_names=SWAPPED)


def read_report(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "canary.json").read_text())
    return data


# --- metrics against scikit-learn -------------------------------------------------------

labels_and_predictions = st.integers(1, 8).flatmap(
    lambda n_classes: st.lists(
        st.tuples(st.integers(0, n_classes - 1), st.integers(0, n_classes - 1)),
        min_size=1,
        max_size=60,
    )
)


def assert_matches_sklearn(y_true: list[int], y_pred: list[int]) -> None:
    metrics = classification_metrics(np.array(y_true), np.array(y_pred))
    present = sorted(set(y_true) | set(y_pred) - {NO_PREDICTION})
    assert metrics.classes.tolist() == present
    assert metrics.accuracy == accuracy_score(y_true, y_pred)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=present, zero_division=0
    )
    assert metrics.precision.tolist() == precision.tolist()
    assert metrics.recall.tolist() == recall.tolist()
    assert metrics.f1.tolist() == f1.tolist()
    assert metrics.support.tolist() == support.tolist()
    for average, ours in (("macro", metrics.macro_avg()), ("weighted", metrics.weighted_avg())):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=present, average=average, zero_division=0
        )
        assert ours == {"precision": p, "recall": r, "f1": f}
    assert metrics.confusion.tolist() == confusion_matrix(y_true, y_pred, labels=present).tolist()


# scikit-learn warns that a one-class matrix may lack classes: ours lists exactly those present
single_label = pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")


@single_label
@settings(max_examples=150, deadline=None)
@given(labels_and_predictions)
def test_metrics_equal_sklearn(pairs: list[tuple[int, int]]) -> None:
    """Classes can be missing from the labels, the predictions, or both."""
    y_true, y_pred = map(list, zip(*pairs, strict=True))
    assert_matches_sklearn(y_true, y_pred)


@single_label
@settings(max_examples=100, deadline=None)
@given(labels_and_predictions, st.data())
def test_images_without_prediction_are_wrong_in_accuracy_and_recall_only(
    pairs: list[tuple[int, int]], data: st.DataObject
) -> None:
    failed = data.draw(st.lists(st.booleans(), min_size=len(pairs), max_size=len(pairs)))
    y_true = [t for t, _ in pairs]
    y_pred = [NO_PREDICTION if bad else p for (_, p), bad in zip(pairs, failed, strict=True)]
    assert_matches_sklearn(y_true, y_pred)


def test_metrics_refuse_empty_or_mismatched_input() -> None:
    with pytest.raises(ValueError):
        classification_metrics(np.array([], dtype=int), np.array([], dtype=int))
    with pytest.raises(ValueError):
        classification_metrics(np.array([0, 1]), np.array([0]))


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [  # Newcombe (1998), Statistics in Medicine 17, table I, method 3
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        (10, 10, 0.7225, 1.0),
    ],
)
def test_wilson_interval_known_values(successes: int, n: int, low: float, high: float) -> None:
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [(1, 5, 0.21875), (5, 1, 0.21875), (0, 6, 0.03125), (3, 3, 1.0), (0, 0, 1.0), (0, 1, 1.0)],
)
def test_mcnemar_exact_known_values(b: int, c: int, p: float) -> None:
    assert mcnemar_exact_p(b, c) == p


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 300), st.integers(0, 300))
def test_mcnemar_exact_equals_binomial_test(b: int, c: int) -> None:
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact_p(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


# --- the gate through the CLI -----------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "code", "failed"),
    [
        ([], 0, []),
        (["--min-accuracy", "0.9"], 0, []),  # 11 of 12
        (["--min-accuracy", "0.95"], 3, ["min-accuracy"]),
        (["--min-class-recall", "0.8"], 0, []),  # red 4 of 5, green 3 of 3, blue 4 of 4
        (["--min-class-recall", "0.9"], 3, ["min-class-recall"]),
        (["--min-class-recall", "1", "--min-support", "6"], 0, []),  # no class that big
        (["--min-accuracy", "0.95", "--min-class-recall", "0.5", "--top-k", "2"], 3, ["min-"]),
    ],
)
def test_gate_exit_codes(
    canary_set: Path, models: tuple[Path, Path], flags: list[str], code: int, failed: list[str]
) -> None:
    result = invoke(str(canary_set), "--model", str(models[0]), "--workers", "0", *flags)
    assert result.exit_code == code, result.output
    assert ("PASSED" if code == 0 else "FAILED") in result.stdout
    if not flags:
        assert "report only" in result.stdout
    for name in failed:
        assert f"\n  {name}" in result.stderr  # one line per failed check


def test_class_recall_fails_for_a_weak_class_with_enough_images(
    tmp_path: Path, models: tuple[Path, Path]
) -> None:
    folder = image_folder(
        tmp_path / "set",
        {"red": ["red"] * 5, "green": ["green"] * 3 + ["red"] * 2, "blue": ["blue"]},
    )
    args = [str(folder), "--model", str(models[0]), "--workers", "0", "--min-class-recall", "0.8"]
    result = invoke(*args)
    assert result.exit_code == 3, result.output
    assert "green 0.6000 (n=5)" in result.stderr
    assert invoke(*args, "--min-support", "6").exit_code == 0  # green is too small now


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-drop", "0.01"], "--max-drop compares against a baseline"),
        (["--require-significant"], "--require-significant qualifies --max-drop"),
        (["--min-accuracy", "1.5"], "--min-accuracy"),
        (["--alpha", "0"], "--alpha"),
        (["--top-k", "0"], "--top-k"),
    ],
)
def test_bad_usage_exits_2(
    canary_set: Path, models: tuple[Path, Path], flags: list[str], message: str
) -> None:
    result = invoke(str(canary_set), "--model", str(models[0]), "--workers", "0", *flags)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_sets_without_labels_or_sources_exit_2(tmp_path: Path, models: tuple[Path, Path]) -> None:
    image = tmp_path / "one.png"
    noisy(COLORS["red"], (20, 20)).save(image)
    manifest = tmp_path / "paths.csv"
    manifest.write_text("path\none.png\n")
    for source, message in (
        (image, "has no labels"),
        (manifest, "has no labels"),
        (tmp_path / "missing", "source not found"),
    ):
        result = invoke(str(source), "--model", str(models[0]), "--workers", "0")
        assert result.exit_code == 2, result.output
        assert message in result.stderr


def test_help_states_exit_codes_and_example() -> None:
    result = CliRunner().invoke(cli, ["canary", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Example:" in text and "3 the gate failed" in text
    assert "the canary only reports, and exits 0" in text


# --- excluded labels and errors ---------------------------------------------------------


@pytest.mark.parametrize("count_errors", [False, True])
def test_excluded_labels_and_error_images(
    tmp_path: Path, canary_set: Path, models: tuple[Path, Path], count_errors: bool
) -> None:
    image_folder(canary_set, {"purple": ["blue", "red"], "mauve": ["blue"]})
    (canary_set / "green" / "broken.png").write_text("not an image")
    (canary_set / "mauve" / "broken.png").write_bytes(b"")  # excluded wins over error
    report = tmp_path / "report"
    flags = ["--errors-count-as-wrong"] if count_errors else []
    result = invoke(
        str(canary_set), "--model", str(models[0]), "--workers", "0", "--report", str(report),
        "--min-accuracy", "0.9", *flags,
    )  # fmt: skip
    data = read_report(report)
    assert data["n_images"] == 17
    assert data["n_errors"] == 2
    assert {e["label"] for e in data["errors"]} == {"green", "mauve"}
    assert data["n_excluded"] == 4
    assert data["excluded_labels"] == {"purple": 2, "mauve": 2}
    assert "'purple' (2)" in result.stderr and "'mauve' (2)" in result.stderr
    assert "| purple | 2 |" in (report / "report.md").read_text()
    if count_errors:  # 11 right of 13: the broken green image is wrong
        assert data["n_scored"] == 13
        assert data["accuracy"] == 11 / 13
        assert data["per_class"]["green"]["recall"] == 3 / 4
        assert data["per_class"]["green"]["precision"] == 3 / 4  # one red/ image is green
        assert sum(map(sum, data["confusion_matrix"]["matrix"])) == 12
        assert result.exit_code == 3
    else:
        assert data["n_scored"] == 12
        assert data["accuracy"] == 11 / 12
        assert data["per_class"]["green"]["recall"] == 1.0
        assert result.exit_code == 0


# --- the report ------------------------------------------------------------------------


def test_report_files_and_metrics_equal_sklearn_on_predictions(
    tmp_path: Path, canary_set: Path, models: tuple[Path, Path]
) -> None:
    report = tmp_path / "reports" / "canary"
    result = invoke(
        str(canary_set), "--model", str(models[0]), "--report", str(report),
        "--workers", "2", "--batch-size", "3", "--min-accuracy", "0.5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert {p.name for p in report.iterdir()} == {
        "canary.json",
        "predictions.parquet",
        "report.md",
        "confusion_matrix.svg",
        "reliability.svg",
    }
    data = read_report(report)
    for key in (
        "passed", "checks", "accuracy", "accuracy_ci", "topk_accuracy", "n_scored", "n_errors",
        "n_excluded", "excluded_labels", "per_class", "macro_avg", "weighted_avg",
        "confusion_matrix", "model_sha256", "baseline",
    ):  # fmt: skip
        assert key in data, key
    assert data["passed"] is True and data["baseline"] is None
    assert data["checks"] == [
        {
            "name": "min-accuracy",
            "operator": ">=",
            "threshold": 0.5,
            "value": data["accuracy"],
            "passed": True,
            "detail": "",
        }
    ]
    df = pd.read_parquet(report / "predictions.parquet")
    assert len(df) == 12 and {"label", "correct", "pred_label", "probs"} <= set(df.columns)
    calibration = data["calibration"]
    confidence = df["pred_prob"].to_numpy()
    by_hand = sum(
        r["n"] / 12 * abs(r["accuracy"] - r["confidence"]) for r in calibration["reliability"]
    )
    assert calibration["ece"] == pytest.approx(by_hand)
    assert sum(r["n"] for r in calibration["reliability"]) == 12
    assert calibration["reliability"][-1]["confidence"] <= confidence.max() + 1e-6
    names = data["confusion_matrix"]["labels"]
    onehot = np.array([[label == name for name in names] for label in df["label"]], dtype=float)
    assert calibration["brier"] == pytest.approx(
        float(np.mean(np.sum((np.stack(df["probs"].to_numpy()) - onehot) ** 2, axis=1))), abs=1e-6
    )
    assert "expected calibration error" in (report / "report.md").read_text()
    svg = (report / "reliability.svg").read_text()
    assert svg.startswith("<svg") and f"ECE {calibration['ece']:.3f}" in svg
    y_true, y_pred = list(df["label"]), list(df["pred_label"])
    assert data["accuracy"] == accuracy_score(y_true, y_pred) == df["correct"].mean()
    labels = ["red", "green", "blue"]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    assert [data["per_class"][c]["precision"] for c in labels] == precision.tolist()
    assert [data["per_class"][c]["recall"] for c in labels] == recall.tolist()
    assert [data["per_class"][c]["f1"] for c in labels] == f1.tolist()
    assert [data["per_class"][c]["support"] for c in labels] == support.tolist()
    assert data["confusion_matrix"] == {
        "labels": labels,
        "matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    assert data["accuracy_ci"] == list(wilson_interval(11, 12))
    assert data["topk_accuracy"] == 1.0  # top-3 of 3 classes
    markdown = (report / "report.md").read_text()
    assert "**PASSED**" in markdown
    assert "| red | green | 1 | 20.0% |" in markdown  # the green image filed under red/
    assert "| red | 1.0000 | 0.8000 |" in markdown
    assert "](confusion_matrix.svg)" in markdown
    ET.parse(report / "confusion_matrix.svg")  # well-formed, self-contained


def test_heatmap_of_many_classes_shows_the_most_confused() -> None:
    n = 30
    matrix = np.diag(np.full(n, 5))
    matrix[3, 7] = matrix[12, 29] = 4
    svg = confusion_svg([f"class_{i}" for i in range(n)], matrix, max_classes=20)
    root = ET.fromstring(svg)
    cells = [r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.find("*") is not None]
    assert len(cells) == 20 * 20
    assert "20 most-confused of 30 classes" in svg
    for name in ("class_3", "class_7", "class_12", "class_29"):
        assert f">{name}</text>" in svg


def test_library_without_report_dir_leaves_nothing_behind(
    canary_set: Path, models: tuple[Path, Path], tmp_path: Path
) -> None:
    before = set(tmp_path.rglob("*"))
    settings = CanarySettings(
        score=ScoreSettings(model=models[0], pipeline=PipelineOptions(workers=0)),
        min_accuracy=0.99,
    )
    result = run_canary([canary_set], settings)
    assert not result.passed and result.n_scored == 12
    assert result.failure_message().splitlines()[1].strip().startswith("min-accuracy: 0.9167 <")
    assert set(tmp_path.rglob("*")) == before


# --- baseline -------------------------------------------------------------------------


def test_baseline_scored_on_the_same_images(
    tmp_path: Path, canary_set: Path, models: tuple[Path, Path]
) -> None:
    good, swapped = models
    report = tmp_path / "report"
    base = [str(canary_set), "--workers", "0", "--report", str(report), "--max-drop", "0.01"]
    result = invoke(*base, "--model", str(good), "--baseline", str(swapped))
    assert result.exit_code == 0, result.output  # candidate better than the baseline
    data = read_report(report)
    df = pd.read_parquet(report / "predictions.parquet")
    assert data["baseline"]["accuracy"] == accuracy_score(df["label"], df["baseline_pred_label"])
    paired = data["baseline"]["comparison"]
    cand, basel = df["correct"], df["baseline_correct"]
    assert paired["both_right"] == (cand & basel).sum() == 4  # the blue images
    assert paired["only_candidate_right"] == (cand & ~basel).sum() == 7
    assert paired["only_baseline_right"] == (~cand & basel).sum() == 1  # green filed under red
    assert paired["both_wrong"] == 0
    assert paired["mcnemar_p"] == mcnemar_exact_p(7, 1)
    assert paired["top1_changed_share"] == 8 / 12
    assert paired["accuracy_drop"] == (1 - 7) / 12  # baseline minus candidate accuracy
    assert "only baseline right" in result.stdout and "top-1 changed" in result.stdout

    result = invoke(*base, "--model", str(swapped), "--baseline", str(good))
    assert result.exit_code == 3, result.output
    assert "max-drop: 0.5000 > 0.01" in result.stderr
    # 7 against 1 discordant pairs: p = 0.0703, not significant at 0.05 but at 0.1
    result = invoke(
        *base, "--model", str(swapped), "--baseline", str(good), "--require-significant"
    )
    assert result.exit_code == 0, result.output
    assert "not significant" in result.stdout
    result = invoke(
        *base, "--model", str(swapped), "--baseline", str(good), "--require-significant",
        "--alpha", "0.1",
    )  # fmt: skip
    assert result.exit_code == 3, result.output


def test_csv_manifest_with_labels(tmp_path: Path, models: tuple[Path, Path]) -> None:
    folder = image_folder(tmp_path / "imgs", {"x": ["red", "green", "blue", "blue"]})
    files = sorted(p.name for p in (folder / "x").iterdir())
    rows = ["path,label"] + [
        f"imgs/x/{name},{label}"
        for name, label in zip(files, ["red", "green", "blue", "dog"], strict=True)
    ]
    manifest = tmp_path / "labels.csv"
    manifest.write_text("\n".join(rows) + "\n")
    report = tmp_path / "report"
    result = invoke(
        str(manifest), "--model", str(models[0]), "--workers", "0", "--report", str(report)
    )
    assert result.exit_code == 0, result.output
    data = read_report(report)
    assert (data["n_scored"], data["accuracy"], data["excluded_labels"]) == (3, 1.0, {"dog": 1})


# --- the bundled model ----------------------------------------------------------------


def test_bundled_model_on_the_sample_photos(tmp_path: Path) -> None:
    canary = tmp_path / "samples_set"
    for label, name in (
        ("Egyptian cat", "cat"),
        ("espresso", "coffee"),
        ("tripod", "cameraman"),
        ("missile", "rocket"),
    ):
        (canary / label).mkdir(parents=True)
        shutil.copy(SAMPLES / f"{name}.jpg", canary / label)
    shutil.copy(SAMPLES / "rocket.jpg", canary / "espresso" / "not_coffee.jpg")
    report = tmp_path / "report"
    result = invoke(str(canary), "--workers", "0", "--report", str(report), "--min-accuracy", "0.8")
    assert result.exit_code == 0, result.output
    data = read_report(report)
    assert data["accuracy"] == 4 / 5
    assert data["per_class"]["espresso"] == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": 2 / 3,
        "support": 2,
    }
    assert data["per_class"]["missile"]["precision"] == 0.5
    assert data["confusion_matrix"]["labels"] == ["Egyptian cat", "missile", "tripod", "espresso"]
    assert "accuracy        0.8000  95% CI [0.3755, 0.9638]" in result.stdout


def test_calibration_metrics_match_their_definitions_and_sklearn() -> None:
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    from batchscore.metrics import brier_score, expected_calibration_error, reliability

    rng = np.random.default_rng(4)
    confidence = rng.uniform(0.3, 1.0, 500)
    correct = rng.random(500) < confidence**1.5  # overconfident
    table = reliability(confidence, correct)
    prob_true, prob_pred = calibration_curve(correct, confidence, n_bins=15, strategy="uniform")
    np.testing.assert_allclose([r["accuracy"] for r in table], prob_true)
    np.testing.assert_allclose([r["confidence"] for r in table], prob_pred)
    by_hand = sum(r["n"] / 500 * abs(r["accuracy"] - r["confidence"]) for r in table)
    assert expected_calibration_error(confidence, correct) == pytest.approx(by_hand)
    assert expected_calibration_error(confidence, correct) > 0.05  # it is overconfident
    p1 = rng.uniform(0, 1, 300)
    y = (rng.random(300) < p1).astype(int)
    probs = np.stack([1 - p1, p1], axis=1)
    assert brier_score(probs, y) == pytest.approx(2 * brier_score_loss(y, p1))
