"""`batchscore monitor`: statistics checked against scipy, and planted drifts caught with the
bundled model on real photos (an unchanged night raises nothing)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import stats
from scipy.spatial.distance import jensenshannon

from batchscore.cli import cli
from batchscore.drift import (
    MIN_EXPECTED,
    chi2_sf,
    chi_square,
    holm,
    js_distance,
    ks_from_histograms,
    pooled,
    psi,
    rise_p_value,
)
from batchscore.monitor import Side, _signals
from batchscore.settings import MonitorSettings
from tests.benchmarks.monitor_noise import SHIFTS, night, unchanged_process
from tests.conftest import COLORS, SAMPLES
from tests.models import color_model
from tests.nights import draw

pairs = st.lists(st.tuples(st.integers(0, 500), st.integers(0, 500)), min_size=2, max_size=12)


@settings(max_examples=60, deadline=None)
@given(pairs)
def test_js_distance_and_chi_square_match_scipy(counts: list[tuple[int, int]]) -> None:
    ref, cur = np.array(counts).T
    if ref.sum() == 0 or cur.sum() == 0:
        return
    assert js_distance(ref, cur) == pytest.approx(
        jensenshannon(ref / ref.sum(), cur / cur.sum(), base=2), abs=1e-9
    )
    statistic, p_value, dof = chi_square(ref, cur)
    kept = np.vstack([ref, cur])[:, (ref + cur) > 0]
    if kept.shape[1] >= 2:
        oracle = stats.chi2_contingency(kept, correction=False)
        assert statistic == pytest.approx(oracle[0], rel=1e-9, abs=1e-9)
        assert p_value == pytest.approx(oracle[1], rel=1e-6, abs=1e-12)
        assert dof == oracle[2]


@pytest.mark.parametrize(
    ("x", "dof"), [(0.5, 1), (3, 2), (30, 10), (100, 50), (400, 300), (1e-3, 3)]
)
def test_chi2_survival_matches_scipy(x: float, dof: int) -> None:
    assert chi2_sf(x, dof) == pytest.approx(stats.chi2.sf(x, dof), rel=1e-9, abs=1e-15)


def test_ks_from_histograms_matches_scipy_to_the_bin_width() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.beta(2, 5, 5000), rng.beta(2.3, 5, 3000)
    edges = np.linspace(0, 1, 10_001)
    statistic, p_value = ks_from_histograms(np.histogram(x, edges)[0], np.histogram(y, edges)[0])
    oracle = stats.ks_2samp(x, y, method="asymp")
    assert statistic == pytest.approx(oracle.statistic, abs=2e-4)
    assert p_value == pytest.approx(oracle.pvalue, rel=0.1)


def test_psi_by_its_definition() -> None:
    ref, cur = np.array([50, 30, 20]), np.array([20, 30, 50])
    p, q = ref / 100, cur / 100
    assert psi(ref, cur) == pytest.approx(float(np.sum((q - p) * np.log(q / p))))
    assert psi(ref, ref) == 0


@pytest.fixture(scope="module")
def nights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A reference (4 photos x 30 draws of one augmentation recipe) and nights of 48 images,
    scored by the bundled model into one dataset each: an unchanged night (the same recipe,
    fresh draws) and four planted shifts."""
    root = tmp_path_factory.mktemp("monitor")
    draw(root / "reference", 30, seed=1)
    same = draw(root / "same", 12, seed=2)
    draw(root / "dark", 12, seed=3, brightness=0.12)
    broken = draw(root / "broken", 12, seed=4)
    for path in broken[::4]:
        path.write_bytes(path.read_bytes()[:300])  # truncated uploads: a quarter of the night
    (root / "png").mkdir()
    for path in same:  # the same pixels as the unchanged night, as PNG
        Image.open(path).save(root / "png" / f"{path.stem}.png")
    draw(root / "one_kind", 48, seed=5, only="cat")
    outputs = {}
    for name in ("reference", "same", "dark", "one_kind", "broken", "png"):
        dataset = root / f"preds_{name}"
        args = ["score", str(root / name), "-o", f"{dataset}/", "--workers", "0", "-q"]
        assert CliRunner().invoke(cli, [*args, "--run-id", f"night-{name}"]).exit_code == 0
        outputs[name] = dataset
    return outputs


# The signals the trend draws a panel for (by their names in the night's alerts).
_DRAWN = (
    "prediction drift (class mix)",
    "low-confidence share rise (top-1 < 0.5)",
    "error rate rise",
    "estimated accuracy drop",
    "input drift: brightness (Kolmogorov-Smirnov)",
)


def _monitor(dataset: Path, reference: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli, ["monitor", str(dataset), "--reference", str(reference), *extra]
    )
    return result.exit_code, result.output


def _alerts(output: str) -> set[str]:
    """The names of the signals on ALERT lines ("ALERT name: value (floor f, p p)...")."""
    return set(re.findall(r"ALERT\s+(.*?): -?\d", output))


@pytest.mark.slow
def test_an_unchanged_night_raises_nothing_and_planted_drifts_raise_their_signal(
    nights: dict[str, Path], tmp_path: Path
) -> None:
    reference = nights["reference"]
    code, output = _monitor(nights["same"], reference, "--report", str(tmp_path / "report"))
    assert code == 0, output
    assert _alerts(output) == set()
    saved = json.loads((tmp_path / "report" / "monitor.json").read_text())
    assert saved["verdict"] == "ok" and len(saved["signals"]) == 11  # no labels: no accuracy
    assert (tmp_path / "report" / "report.md").read_text().startswith("# Monitor: run night-same")

    code, output = _monitor(nights["one_kind"], reference, "--report", str(tmp_path / "cats"))
    assert code == 3
    report = (tmp_path / "cats" / "report.md").read_text()
    assert "## What moved most: prediction drift (class mix)" in report
    assert re.search(r"\| Egyptian cat \| \d+\.\d% \| 100\.0% \| `[^`]*cat_\d\d\.jpg`", report)
    assert "prediction drift (class mix)" in _alerts(output)
    assert output.splitlines()[1].strip().startswith("ALERT")  # alerts first

    code, output = _monitor(nights["dark"], reference)
    assert code == 3
    assert {
        "low-confidence share rise (top-1 < 0.5)",
        "input drift: brightness (Kolmogorov-Smirnov)",
        "input drift: contrast (Kolmogorov-Smirnov)",
    } <= _alerts(output)
    assert "input drift: format" not in _alerts(output)

    code, output = _monitor(nights["png"], reference)
    assert code == 3
    assert _alerts(output) == {"input drift: format"}

    code, output = _monitor(nights["broken"], reference)
    assert code == 3
    assert "error rate rise" in _alerts(output)


@pytest.mark.slow
def test_the_window_and_the_reference_can_be_chosen_and_models_must_match(
    nights: dict[str, Path], tmp_path: Path
) -> None:
    dataset = tmp_path / "preds"
    shutil.copytree(nights["reference"], dataset)
    (dataset / "_runs").rename(tmp_path / "first_runs")
    shutil.copytree(nights["one_kind"], dataset, dirs_exist_ok=True)  # a second night
    shutil.copytree(tmp_path / "first_runs", dataset / "_runs", dirs_exist_ok=True)
    code, output = _monitor(dataset, nights["reference"])  # newest: the cats
    assert code == 3 and output.startswith("run night-one_kind")
    code, output = _monitor(dataset, nights["reference"], "--run", "night-reference")
    assert code == 0, output
    report = tmp_path / "report"
    _monitor(dataset, nights["reference"], "--report", str(report))
    saved = json.loads((report / "monitor.json").read_text())
    assert [night["run_id"] for night in saved["trend"]] == ["night-reference", "night-one_kind"]
    assert saved["trend"][0]["js_distance"] == 0 and saved["trend"][1]["js_distance"] > 0.1
    assert saved["classes"]["names"][0] == "Egyptian cat"  # the cats' night leads
    for picture in ("trend.svg", "classes.svg"):
        svg = ElementTree.parse(report / picture).getroot()
        assert svg.tag.endswith("svg") and len(list(svg.iter())) > 10
    assert [night["verdict"] for night in saved["trend"]] == ["ok", "alert"]
    cats = saved["trend"][1]["signals"]["class mix (Jensen-Shannon)"]
    assert cats["alert"] and cats["value"] > cats["band"][1]  # outside its null band
    quiet = saved["trend"][0]["signals"]["class mix (Jensen-Shannon)"]
    assert quiet["band"][0] <= quiet["value"] <= quiet["band"][1]
    trend = ElementTree.parse(report / "trend.svg").getroot()
    texts = [t.text or "" for t in trend.iter() if t.tag.endswith("text")]
    dates = [t for t in texts if re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", t)]
    assert len(dates) == 2 and not any("night-" in t for t in texts)  # nights by date
    assert "input drift: brightness (KS)" in texts  # input drift is drawn
    bands = [e for e in trend.iter() if e.tag.endswith("rect") and e.get("fill") == "#ddd"]
    rings = [e for e in trend.iter() if e.tag.endswith("circle") and e.get("fill") == "none"]
    drawn_alerts = [name for name in saved["trend"][1]["alerts"] if name in _DRAWN]
    assert bands and len(rings) == len(drawn_alerts) > 0  # each alert drawn is ringed
    classes = ElementTree.parse(report / "classes.svg").getroot()
    ticks = [t.text or "" for t in classes.iter() if t.get("text-anchor") == "end"]
    assert ticks and all(re.fullmatch(r"\d+%", t) for t in ticks), ticks
    labels = [t.text or "" for t in classes.iter() if t.get("transform")]
    assert labels and max(map(len, labels)) <= 18
    assert "![trend](trend.svg)" in (report / "report.md").read_text()
    canary = tmp_path / "canary"
    canary.mkdir()
    part = next(nights["reference"].glob("run_date=*/*.parquet"))
    shutil.copy(part, canary / "predictions.parquet")  # what `canary --report` keeps
    assert _monitor(nights["same"], canary)[0] == 0
    date = part.parent.name.split("=", 1)[1]
    by_date = tmp_path / "by_date"
    _monitor(dataset, nights["reference"], "--date", date, "--report", str(by_date))
    saved = json.loads((by_date / "monitor.json").read_text())
    assert saved["window"] == f"date {date}" and saved["sides"]["window"]["rows"] == 120 + 48
    code, output = _monitor(nights["same"], nights["reference"], "--run", "x", "--since", "3d")
    assert code == 2 and "choose one of" in output

    other = color_model(tmp_path / "other", size=224)
    images = tmp_path / "few"
    images.mkdir()
    shutil.copy(SAMPLES / "cat.jpg", images)
    scored = tmp_path / "other_preds"
    args = ["score", str(images), "-o", f"{scored}/", "--model", str(other), "--workers", "0"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    code, output = _monitor(scored, nights["reference"])
    assert code == 2 and "--allow-model-change" in output
    code, output = _monitor(scored, nights["reference"], "--allow-model-change")
    assert code in (0, 3)
    assert len(pd.read_parquet(scored)) == 1


def _labelled_night(folder: Path, n: int, alpha: float, seed: int) -> Path:
    """Images mixing the three colours with Dirichlet(alpha) weights; the label is the main
    colour, wrong one time in five (labels are noisy in real life too). A larger alpha makes
    the mixtures, and so the colour model, less sure."""
    rng = np.random.default_rng(seed)
    names = ["red", "green", "blue"]
    palette = np.array([COLORS[name] for name in names], dtype=np.float64)
    folder.mkdir(parents=True)
    rows = ["path,label"]
    for i in range(n):
        weights = rng.dirichlet([alpha] * 3)
        pixel = np.clip(weights @ palette + rng.normal(0, 8, (8, 8, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:04d}.png"
        Image.fromarray(pixel).save(path)
        label = int(np.argmax(weights)) if rng.random() > 0.2 else int(rng.integers(0, 3))
        rows.append(f"{path},{names[label]}")
    manifest = folder / "labels.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


@pytest.mark.slow
def test_the_accuracy_estimated_without_labels_tracks_the_true_accuracy(tmp_path: Path) -> None:
    """Calibrated on a labelled reference, the estimate for a night from the same process and
    for a harder night is compared with their true accuracy (known here: they have labels too,
    which `monitor` does not read on the monitored side)."""
    model = color_model(tmp_path / "model", size=8)
    scored = {}
    for name, alpha, seed in (("reference", 1.0, 1), ("same", 1.0, 2), ("harder", 12.0, 3)):
        manifest = _labelled_night(tmp_path / name, 400, alpha, seed)
        dataset = tmp_path / f"preds_{name}"
        args = ["score", str(manifest), "-o", f"{dataset}/", "--model", str(model)]
        assert CliRunner().invoke(cli, [*args, "--workers", "0", "-q"]).exit_code == 0
        scored[name] = dataset
    estimates = {}
    for name in ("same", "harder"):
        report = tmp_path / f"report_{name}"
        _monitor(scored[name], scored["reference"], "--report", str(report))
        signals = json.loads((report / "monitor.json").read_text())["signals"]
        [accuracy] = [s for s in signals if s["name"].startswith("estimated accuracy drop")]
        details = accuracy["details"]
        truth = float(pd.read_parquet(scored[name])["correct"].mean())
        low, high = details["interval"]
        assert abs(details["estimated_accuracy"] - truth) < 0.06, (name, details, truth)
        assert low - 0.03 <= truth <= high + 0.03, (name, details, truth)
        estimates[name] = (details["estimated_accuracy"], truth, accuracy)
    assert estimates["harder"][1] < estimates["same"][1] - 0.05  # the harder night is harder
    same, harder = estimates["same"][2], estimates["harder"][2]
    assert same["verdict"] == "ok" and same["p_value"] > 0.05
    # The harder night's rows sit in probability bins where the reference has few labelled
    # rows, so the calibration there is unsure: the drop is clear before the correction across
    # signals, and the night alerts on the signals that see it without labels.
    assert harder["value"] > 0.05 and harder["p_value"] < 0.01


def test_a_class_whose_confidence_drops_is_seen_even_when_the_overall_share_is_not(
    tmp_path: Path,
) -> None:
    """Two classes, 200 predictions each; one night the green ones turn unsure (mixed with
    blue) while the red ones get surer: the overall low-confidence share barely moves."""
    rng = np.random.default_rng(5)
    model = color_model(tmp_path / "model", size=8, scale=4.0)

    def night(name: str, green_mix: float, red_mix: float) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for i in range(200):
            for base, other, mix in (("green", "blue", green_mix), ("red", "blue", red_mix)):
                color = (1 - mix) * np.array(COLORS[base]) + mix * np.array(COLORS[other])
                pixels = np.clip(color + rng.normal(0, 6, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{base}_{i:03d}.png")
        dataset = tmp_path / f"preds_{name}"
        args = ["score", str(folder), "-o", f"{dataset}/", "--model", str(model), "-q"]
        assert CliRunner().invoke(cli, [*args, "--workers", "0"]).exit_code == 0
        return dataset

    reference = night("reference", 0.25, 0.45)
    shifted = night("shifted", 0.45, 0.25)
    report = tmp_path / "report"
    _monitor(shifted, reference, "--report", str(report))
    signals = {s["name"]: s for s in json.loads((report / "monitor.json").read_text())["signals"]}
    overall = signals["low-confidence share rise (top-1 < 0.5)"]
    worst = signals["low-confidence share rise, worst class"]
    assert abs(overall["value"]) < 0.1 and not overall["alert"]
    assert worst["alert"] and worst["details"]["class"] == "green", worst


def test_input_statistics_are_written_and_mean_what_they_say(tmp_path: Path) -> None:
    """Brightness and contrast against numpy on every pixel of what the model got (the column is
    computed on every 4th row and column), saturation 0 for gray, the format as Pillow names it."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(gray).convert("RGB").save(folder / "gray.png")
    Image.new("RGB", (64, 64), (200, 40, 40)).save(folder / "red.jpg", quality=100)
    model = color_model(tmp_path / "model", size=64)
    out = tmp_path / "out.parquet"
    args = ["score", str(folder), "-o", str(out), "--model", str(model), "--workers", "0"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    rows = pd.read_parquet(out).set_index("format")
    assert rows.loc["PNG", "brightness"] == pytest.approx(gray.mean() / 255, abs=0.02)
    assert rows.loc["PNG", "contrast"] == pytest.approx(gray.std() / 255, abs=0.02)
    assert rows.loc["PNG", "saturation"] == pytest.approx(0.0, abs=1e-6)
    assert rows.loc["JPEG", "saturation"] == pytest.approx(160 / 255, abs=0.03)
    assert rows.loc["JPEG", "contrast"] == pytest.approx(0.0, abs=0.01)


# ------------------------------------------------------------------ the noise model

tables = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), min_size=2, max_size=30)


@settings(max_examples=60, deadline=None)
@given(tables)
def test_pooled_chi_square_is_scipys_on_the_pooled_table(counts: list[tuple[int, int]]) -> None:
    ref, cur = (np.array(side) for side in zip(*counts, strict=True))
    if ref.sum() == 0 or cur.sum() == 0:
        return
    a, b = pooled(ref, cur)
    assert a.sum() == ref.sum() and b.sum() == cur.sum()  # nothing lost, only merged
    expected = (a + b) * min(ref.sum(), cur.sum()) / (ref.sum() + cur.sum())
    assert (expected[:-1] >= MIN_EXPECTED).all()  # all but the "other" column are common
    _, p_value, _ = chi_square(a, b)
    kept = np.vstack([a, b])[:, (a + b) > 0]
    if kept.shape[1] >= 2:
        oracle = stats.chi2_contingency(kept, correction=False)
        assert p_value == pytest.approx(oracle[1], rel=1e-6, abs=1e-12)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400), st.data())
def test_the_rise_test_is_fishers_or_the_two_proportion_z(
    n_ref: int, n_cur: int, data: st.DataObject
) -> None:
    hits_ref = data.draw(st.integers(0, n_ref))
    hits_cur = data.draw(st.integers(0, n_cur))
    p_value = rise_p_value(hits_ref, n_ref, hits_cur, n_cur)
    hits, n = hits_ref + hits_cur, n_ref + n_cur
    if min(hits, n - hits) * min(n_ref, n_cur) / n < MIN_EXPECTED:
        table = [[hits_cur, n_cur - hits_cur], [hits_ref, n_ref - hits_ref]]
        oracle = stats.fisher_exact(table, alternative="greater").pvalue
    else:
        share = hits / n
        z = (hits_cur / n_cur - hits_ref / n_ref) / np.sqrt(
            share * (1 - share) * (1 / n_ref + 1 / n_cur)
        )
        oracle = stats.norm.sf(z)
    assert p_value == pytest.approx(oracle, rel=1e-6, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=12))
def test_holm_by_its_definition(p_values: list[float]) -> None:
    """Adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)), in sorted order."""
    m = len(p_values)
    ordered = sorted(range(m), key=lambda i: p_values[i])
    want = {}
    for rank, i in enumerate(ordered):
        want[i] = max(min(1.0, (m - j) * p_values[ordered[j]]) for j in range(rank + 1))
    assert holm(p_values) == pytest.approx([want[i] for i in range(m)])


def test_unchanged_simulated_nights_rarely_alert_and_planted_shifts_are_caught() -> None:
    """A seeded share of tests/benchmarks/monitor_noise.py (its docs give the full figures):
    nights drawn from the reference's process, not its rows again."""
    process = unchanged_process()
    defaults = MonitorSettings()
    for n in (200, 2_000):
        alerted = [
            bool(night(process, process, n, seed=i, settings=defaults)[0]) for i in range(30)
        ]
        assert sum(alerted) <= 1, (n, alerted)  # at 1% a night, 2 of 30 happens 3.6% of times
        for name, shift in SHIFTS.items():
            caught = [bool(night(process, shift(process), n, seed=i, settings=defaults)[0])
                      for i in range(5)]  # fmt: skip
            assert all(caught) or (n == 200 and sum(caught) >= 4), (name, n, caught)


def _side(rows: list[dict[str, object]]) -> Side:
    side = Side()
    columns = {key: [row.get(key) for row in rows] for key in ("status", "pred_label")}
    batch = pa.RecordBatch.from_pydict(
        {
            **columns,
            "pred_prob": pa.array([row.get("pred_prob") for row in rows], pa.float32()),
            "model_sha256": ["m"] * len(rows),
            "correct": pa.array([row.get("correct") for row in rows], pa.bool_()),
            "label": pa.array([row.get("label") for row in rows], pa.string()),
        }
    )
    side.add(batch)
    return side


def test_a_nan_or_infinite_probability_is_an_error_not_a_prediction() -> None:
    side = _side(
        [
            {"status": "ok", "pred_label": "cat", "pred_prob": float("nan")},
            {"status": "ok", "pred_label": "cat", "pred_prob": float("inf")},
            {"status": "ok", "pred_label": "dog", "pred_prob": 0.2},
        ]
    )
    assert side.n_errors == 2 and side.n_ok == 1
    assert side.classes == {"dog": 1} and side.confidence.sum() == 1  # no NaN binned as 0


def test_unlabelled_canary_rows_are_left_out_of_the_reference_accuracy() -> None:
    """A canary's predictions.parquet writes `correct` false for an image with no label: the
    reference accuracy counted them as wrong (0.802 where the canary printed 0.8843)."""
    rows = [{"status": "ok", "pred_label": "cat", "pred_prob": 0.9, "label": "cat",
             "correct": i < 80} for i in range(100)]  # fmt: skip
    rows += [{"status": "ok", "pred_label": "cat", "pred_prob": 0.9, "label": None,
              "correct": False}] * 37  # fmt: skip
    side = _side(rows)
    assert side.labelled.sum() == 100 and side.right.sum() / side.labelled.sum() == 0.8


def test_an_all_error_night_is_reported_as_errors_not_drift() -> None:
    base = _side(
        [{"status": "ok", "pred_label": f"c{i % 5}", "pred_prob": 0.8} for i in range(200)]
    )
    night_rows = [{"status": "error"} for _ in range(60)]
    signals = {s.name: s for s in _signals(base, _side(night_rows), MonitorSettings())}
    assert {name for name, s in signals.items() if s.alert} == {"error rate rise"}
    assert signals["prediction drift (class mix)"].verdict == "insufficient data"
    assert signals["confidence drift (Kolmogorov-Smirnov)"].verdict == "insufficient data"


def test_a_window_too_small_to_judge_says_so_and_never_alerts(
    nights: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "few"
    folder.mkdir()
    for sample in sorted(SAMPLES.glob("*.jpg")):
        shutil.copy(sample, folder)
    dataset = tmp_path / "preds_few"
    args = ["score", str(folder), "-o", f"{dataset}/", "--workers", "0", "-q"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    code, output = _monitor(dataset, nights["reference"], "--report", str(tmp_path / "r"))
    assert code == 0, output
    assert output.splitlines()[0].endswith(": insufficient data")
    assert "4 in the window; 30 needed" in output and "ALERT" not in output
    saved = json.loads((tmp_path / "r" / "monitor.json").read_text())
    assert saved["verdict"] == "insufficient data" and saved["alert"] is False


def _tagged(rates: np.ndarray, n: int, rng: np.random.Generator) -> pa.RecordBatch:
    """`n` rows of a multi-label model whose label j is predicted with probability rates[j]."""
    present = rng.random((n, len(rates))) < rates
    names = np.array([f"tag_{j:02d}" for j in range(len(rates))])
    return pa.RecordBatch.from_pydict(
        {
            "status": ["ok"] * n,
            "pred_label": names[rng.integers(0, len(rates), n)],
            "pred_prob": rng.uniform(0.5, 1.0, n),
            "model_sha256": ["model"] * n,
            "pred_labels": [names[row].tolist() for row in present],
        }
    )


def test_a_multi_label_models_label_rates_alert_on_a_shift_not_on_noise() -> None:
    """20 labels at rates from 1% to 60%: 100 unchanged nights of 500 rows against a 2,000-row
    reference, each drawn afresh, alert on the label-rate signal at about alpha (0.01); a night
    where one label's rate rises 10 points alerts nearly always."""
    rates = np.linspace(0.01, 0.6, 20)
    settings = MonitorSettings()
    name = "label positive rate change, worst label"
    false_alarms, caught = 0, 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        base, night = Side(), Side()
        base.add(_tagged(rates, 2000, rng))
        shifted = rates.copy()
        if seed % 10 == 0:
            shifted[7] += 0.10
        night.add(_tagged(shifted, 500, rng))
        signal = next(s for s in _signals(base, night, settings) if s.name == name)
        if seed % 10 == 0:
            caught += signal.alert
            assert signal.details["label"] == "tag_07" or not signal.alert
        else:
            false_alarms += signal.alert
    assert false_alarms <= 3, false_alarms  # of 90; alpha 0.01 expects about 1
    assert caught >= 8, caught  # of 10
    line = signal.line()
    assert line.startswith(("ok    label positive rate", "ALERT label positive rate"))
    assert "of images" in line
