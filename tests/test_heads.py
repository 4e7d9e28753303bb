"""Every head a model can end in (docs/own-models.md, "Heads"): what is detected, what is asked
for, and what each kind writes.

The tiny models are `tests.models.head_model`: scale * the normalised per-channel means, so a
pure colour's scores are known exactly ((255, 0, 0) gives [2, -2, -2]). The real exports are in
tests/exported (made by tests/exported/make_heads.py), with their frameworks' own outputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from batchscore.cli import cli
from batchscore.errors import ModelError
from batchscore.model import load_model
from batchscore.output import read_metadata
from batchscore.scorer import ZERO_VECTOR
from tests.benchmarks.embedding_noise import night_alerts
from tests.models import head_model, unstable_model

EXPORTED = Path(__file__).resolve().parent / "exported"
REPO = Path(__file__).resolve().parent.parent
PHOTOS = sorted((REPO / "artifacts" / "samples").glob("*.jpg")) + sorted(
    (EXPORTED / "images").glob("*.jpg")
)
TAGS = ["red", "green", "blue"]
COLOURS = {"red": (255, 0, 0), "yellow": (255, 255, 0), "white": (255, 255, 255)}


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1 / (1 + np.exp(-x)))


def _colours(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (12, 12), rgb).save(folder / f"{name}.png")
        paths.append(str(folder / f"{name}.png"))
    return paths


def _score(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["score", *args, "--workers", "0"])
    return result.exit_code, result.output


def _rows(out: Path) -> pd.DataFrame:
    table = pd.read_parquet(out)
    return table.set_index(table["path"].map(lambda p: Path(p).stem))


# --- real exports, compared with their frameworks ---------------------------------------------

HEAD_EXPORTS = {
    # folder: (head, class names, what says so)
    "timm-multilabel-logits": ("multi-label", ["ant", "bee", "cat", "dog", "eel"], "preprocess"),
    "torchvision-multilabel-sigmoid": (
        "multi-label",
        ["ant", "bee", "cat", "dog", "eel"],
        "the graph ends in Sigmoid",
    ),
    "keras-binary": ("binary", ["cat", "dog"], "one output number for two class names"),
}


def _score_photos(tmp_path: Path, folder: Path, *extra: str) -> Path:
    tmp_path.mkdir(exist_ok=True)
    listing = tmp_path / "photos.txt"
    listing.write_text("".join(f"{photo}\n" for photo in PHOTOS))
    out = tmp_path / f"{folder.name}.parquet"
    code, output = _score(
        str(listing), "-o", str(out), "--model", str(folder), "--exact-jpeg", *extra
    )
    assert code == 0, output
    assert output.startswith(f"{len(PHOTOS)} images: {len(PHOTOS)} ok"), output
    return out


@pytest.mark.parametrize("name", HEAD_EXPORTS)
def test_a_real_export_of_each_head_scores_as_its_framework_does(tmp_path: Path, name: str) -> None:
    """timm (BCE logits, head from preprocess.json), torchvision (a final Sigmoid) and Keras
    through tf2onnx (Dense(1, sigmoid), class_indices.json): probabilities to 1e-4 of what the
    framework itself gave for the same photos."""
    head, classes, why = HEAD_EXPORTS[name]
    out = _score_photos(tmp_path, EXPORTED / name)
    expected = json.loads((EXPORTED / name / "expected.json").read_text())["probabilities"]
    table = pd.read_parquet(out)
    for path, probs in zip(table["path"], table["probs"], strict=True):
        np.testing.assert_allclose(probs, expected[Path(path).name], rtol=0, atol=1e-4)
    metadata = read_metadata(out)
    assert metadata["head"] == head and metadata["class_map"] == classes
    assert any(note.startswith(f"head: {head}") and why in note for note in metadata["model_notes"])
    if head == "multi-label":  # each class its own probability: the rows do not sum to one
        sums = np.array([np.sum(p) for p in table["probs"]])
        assert np.abs(sums - 1).max() > 0.5
        for probs, present in zip(table["probs"], table["pred_labels"], strict=True):
            assert list(present) == [c for c, p in zip(classes, probs, strict=True) if p >= 0.5]
        assert len({tuple(p) for p in table["pred_labels"]}) >= 3  # the tags follow the pixels
    else:
        assert set(table["pred_label"]) == set(classes)  # both classes occur on these photos


def test_a_real_image_encoder_writes_its_vectors(tmp_path: Path) -> None:
    """optimum's CLIP vision export: `pooler_output` (the only vector per image beside
    `last_hidden_state`) to 1e-4 of transformers' own, as a fixed-size float32 list."""
    out = _score_photos(tmp_path, EXPORTED / "hf-encoder", "--head", "embedding")
    expected = json.loads((EXPORTED / "hf-encoder" / "expected.json").read_text())["embeddings"]
    schema = pq.read_schema(out)
    assert schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert "pred_label" not in schema.names and "probs" not in schema.names
    table = pd.read_parquet(out)
    for path, vector in zip(table["path"], table["embedding"], strict=True):
        np.testing.assert_allclose(vector, expected[Path(path).name], rtol=0, atol=1e-4)
    notes = read_metadata(out)["model_notes"]
    assert any(note.startswith("output: 'pooler_output', the only one") for note in notes)

    unit = _score_photos(tmp_path / "unit", EXPORTED / "hf-encoder", "--head", "embedding",
                         "--l2-normalize")  # fmt: skip
    for path, vector in zip(*pd.read_parquet(unit)[["path", "embedding"]].T.values, strict=True):
        want = np.asarray(expected[Path(path).name])
        np.testing.assert_allclose(vector, want / np.linalg.norm(want), rtol=0, atol=1e-5)


# --- multi-label ------------------------------------------------------------------------------


def test_a_sigmoid_head_keeps_each_class_probability_and_lists_the_present_ones(
    tmp_path: Path,
) -> None:
    """A tagger was softmaxed: its 0.88 for red became 0.96 and its tags were renormalised.
    Now each is kept as the model gives it, and pred_labels lists the tags at or above 0.5."""
    model = head_model(tmp_path / "tagger", final="Sigmoid", class_names=TAGS)
    out = tmp_path / "tags.parquet"
    code, output = _score(*_colours(tmp_path / "img"), "-o", str(out), "--model", str(model))
    assert code == 0, output
    rows = _rows(out)
    np.testing.assert_allclose(rows.loc["red", "probs"], sigmoid(np.array([2, -2, -2])), atol=1e-6)
    assert list(rows.loc["red", "pred_labels"]) == ["red"]
    assert list(rows.loc["yellow", "pred_labels"]) == ["red", "green"]
    assert list(rows.loc["white", "pred_labels"]) == TAGS
    assert rows.loc["yellow", "pred_label"] == "red"  # the top class; ties keep class-map order
    assert rows.loc["red", "pred_prob"] == pytest.approx(sigmoid(np.array(2.0)), abs=1e-6)
    assert read_metadata(out)["thresholds"] == dict.fromkeys(TAGS, 0.5)


def test_thresholds_come_from_a_flag_or_a_file_per_class(tmp_path: Path) -> None:
    model = head_model(tmp_path / "tagger", final="Sigmoid", class_names=TAGS)
    images = _colours(tmp_path / "img")
    per_class = tmp_path / "thresholds.json"
    per_class.write_text(json.dumps({"green": 0.9}))
    out = tmp_path / "tags.parquet"
    code, output = _score(*images, "-o", str(out), "--model", str(model), "--thresholds",
                          str(per_class))  # fmt: skip
    assert code == 0, output
    assert list(_rows(out).loc["yellow", "pred_labels"]) == ["red"]  # green 0.88 < its 0.9
    code, output = _score(*images, "-o", str(out), "--model", str(model), "--threshold", "0.1")
    assert code == 0, output
    assert list(_rows(out).loc["red", "pred_labels"]) == TAGS  # 0.12 >= 0.1
    (model / "preprocess.json").write_text(
        json.dumps(
            {
                "resize_size": [8, 8],
                "mean": [0.5] * 3,
                "std": [0.5] * 3,
                "thresholds": {"gren": 0.9},
            }
        )
    )
    code, output = _score(*images, "-o", str(out), "--model", str(model))
    assert code == 2, output
    assert "thresholds name classes the class map does not have: ['gren']" in output


def test_a_multi_label_head_of_logits_is_read_from_the_config(tmp_path: Path) -> None:
    """BCEWithLogitsLoss training leaves no activation in the graph: the config says which head,
    and each logit goes through the sigmoid, not all through one softmax."""
    model = head_model(tmp_path / "bce", class_names=TAGS)
    images = _colours(tmp_path / "img")
    out = tmp_path / "bce.parquet"
    code, output = _score(*images, "-o", str(out), "--model", str(model), "--head", "multi-label")
    assert code == 0, output
    np.testing.assert_allclose(
        _rows(out).loc["yellow", "probs"], sigmoid(np.array([2, 2, -2])), atol=1e-6
    )
    code, output = _score(*images, "-o", str(out), "--model", str(model))  # no head: softmax
    assert code == 0, output
    assert sum(_rows(out).loc["yellow", "probs"]) == pytest.approx(1.0)


def test_a_hugging_face_problem_type_says_multi_label(tmp_path: Path) -> None:
    folder = tmp_path / "vit"
    shutil.copytree(EXPORTED / "hf-vit", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "problem_type": "multi_label_classification"})
    )
    spec = load_model(folder)
    assert spec.head == "multi-label" and spec.preprocess.output == "logits"
    assert dict(spec.preprocess_sources)["head"] == (
        "preprocessor_config.json and config.json (problem_type multi_label_classification)"
    )


@pytest.mark.parametrize(
    ("final", "flags", "message"),
    [
        ("Sigmoid", ["--head", "softmax"], "head softmax (command line) but the graph ends in"
         " Sigmoid, which makes a probability per class (multi-label)"),
        ("Softmax", ["--head", "multi-label"], "head multi-label (command line) but the graph"
         " ends in Softmax"),
        (None, ["--head", "binary"], "head binary (command line) reads one output number, but"
         " output 'scores' has 3; two scores for two classes are --head softmax"),
        ("HardSigmoid", ["--head", "multi-label"], "has a multi-label head whose outputs all lie"
         ' in [0, 1] but whose graph ends in no Sigmoid: set "output": "probabilities" or'),
    ],
)  # fmt: skip
def test_a_head_that_cannot_be_read_or_contradicts_the_graph_is_refused_in_one_line(
    tmp_path: Path, final: str | None, flags: list[str], message: str
) -> None:
    model = head_model(tmp_path / "m", final=final, class_names=TAGS)
    image = _colours(tmp_path / "img")[0]
    code, output = _score(image, "-o", str(tmp_path / "out.parquet"), "--model", str(model), *flags)
    assert code == 2 and output.count("\n") == 1, output
    assert message in output
    code, output = _score(  # the output kind given, the same HardSigmoid head scores
        image, "-o", str(tmp_path / "out.parquet"), "--model", str(model), *flags,
        "--model-output", "probabilities",
    )  # fmt: skip
    assert (code == 0) == (final == "HardSigmoid"), output


# --- embeddings -------------------------------------------------------------------------------


def test_an_embedding_needs_no_class_names_and_is_refused_without_a_head(tmp_path: Path) -> None:
    model = head_model(tmp_path / "encoder", class_names=None)
    images = _colours(tmp_path / "img")
    out = tmp_path / "vectors.parquet"
    code, output = _score(*images, "-o", str(out), "--model", str(model))
    assert code == 2, output
    assert "or --head embedding if its output is a vector, not class scores" in output
    code, output = _score(*images, "-o", str(out), "--model", str(model), "--head", "embedding")
    assert code == 0, output
    rows = _rows(out)
    np.testing.assert_allclose(rows.loc["yellow", "embedding"], [2, 2, -2], atol=1e-6)
    assert read_metadata(out)["embedding_size"] == 3
    assert read_metadata(out)["class_map"] == []


def test_an_encoder_with_several_vector_outputs_asks_which(tmp_path: Path) -> None:
    model = head_model(tmp_path / "encoder", class_names=None, tokens=True, final="Tanh")
    spec = load_model(model, preprocess_overrides={"head": "embedding"})
    assert spec.output_name == "scores"  # the only per-image vector beside per-token ones
    with pytest.raises(ModelError, match=r"'hidden' \['N', 4, 3\]"):
        load_model(model, preprocess_overrides={"head": "embedding"}, output_name="hidden")


def test_an_all_zero_vector_cannot_be_normalised_and_is_an_error_row(tmp_path: Path) -> None:
    black = {"mean": [0, 0, 0], "std": [1, 1, 1], "head": "embedding", "l2_normalize": True}
    model = head_model(tmp_path / "encoder", class_names=None, preprocess=black)
    Image.new("RGB", (12, 12), (0, 0, 0)).save(tmp_path / "black.png")
    Image.new("RGB", (12, 12), (0, 0, 255)).save(tmp_path / "blue.png")
    out = tmp_path / "vectors.parquet"
    code, output = _score(str(tmp_path / "black.png"), str(tmp_path / "blue.png"), "-o", str(out),
                          "--model", str(model))  # fmt: skip
    assert code == 0, output
    rows = _rows(out)
    assert rows.loc["black", "status"] == "error" and rows.loc["black", "error"] == ZERO_VECTOR
    assert rows.loc["black", "embedding"] is None
    np.testing.assert_allclose(rows.loc["blue", "embedding"], [0, 0, 1], atol=1e-6)


def test_an_embedding_dataset_runs_incrementally(tmp_path: Path) -> None:
    model = head_model(tmp_path / "encoder", class_names=None, preprocess={"head": "embedding"})
    folder = tmp_path / "img"
    _colours(folder)
    out = tmp_path / "vectors"
    code, output = _score(str(folder), "-o", str(out), "--model", str(model), "--incremental")
    assert code == 0 and output.startswith("3 images: 3 ok"), output
    Image.new("RGB", (12, 12), (0, 0, 255)).save(folder / "blue.png")
    code, output = _score(str(folder), "-o", str(out), "--model", str(model), "--incremental")
    assert code == 0 and output.startswith("1 image: 1 ok, 0 errors (3 already scored"), output
    table = pd.read_parquet(out)
    assert len(table) == 4 and table["image_id"].is_unique
    result = CliRunner().invoke(cli, ["runs", str(out), "--json"])
    runs = [json.loads(line) for line in result.output.splitlines()]
    assert [r["n_ok"] for r in runs] == [3, 1]
    assert all(r["mean_top1_prob"] is None and r["low_confidence_share"] is None for r in runs)


def test_inspect_names_each_head_and_why(tmp_path: Path) -> None:
    cases = {
        "tagger": (head_model(tmp_path / "t", final="Sigmoid", class_names=TAGS), []),
        "encoder": (head_model(tmp_path / "e", class_names=None), ["--head", "embedding"]),
        "binary": (EXPORTED / "keras-binary", []),
    }
    shown = {}
    for name, (model, flags) in cases.items():
        result = CliRunner().invoke(cli, ["inspect", "--model", str(model), *flags, "--json"])
        assert result.exit_code == 0, result.output
        shown[name] = json.loads(result.output)["head"]
    assert shown["tagger"] == {
        "kind": "multi-label",
        "what": "multi-label, 3 classes each its own probability; pred_labels are those >= 0.5",
        "why": "the graph ends in Sigmoid",
    }
    assert shown["encoder"]["what"] == "embedding, a vector of 3 numbers per image"
    text = CliRunner().invoke(cli, ["inspect", "--model", str(tmp_path / "e"), "--head",
                                    "embedding"]).output  # fmt: skip
    assert "classes    none: an embedding head has no classes\n" in text
    assert "activation not applied (an embedding is written as the model gives it)" in text
    assert shown["encoder"]["why"] == "command line"
    assert shown["binary"]["what"].startswith("binary, one output read as the probability of 'dog'")


# --- what reads the rows ----------------------------------------------------------------------


def test_diff_compares_two_encoders_runs_by_cosine(tmp_path: Path) -> None:
    """The same images through an encoder twice, the second with another mean: each image's
    cosine similarity is scikit-learn's, an image below --min-cosine counts as changed."""
    from sklearn.metrics.pairwise import cosine_similarity

    model = head_model(tmp_path / "encoder", class_names=None, preprocess={"head": "embedding"})
    images = _colours(tmp_path / "img")
    Image.new("RGB", (12, 12), (128, 128, 128)).save(tmp_path / "img" / "grey.png")
    images.append(str(tmp_path / "img" / "grey.png"))
    old, new = tmp_path / "old.parquet", tmp_path / "new.parquet"
    assert _score(*images, "-o", str(old), "--model", str(model))[0] == 0
    assert _score(*images, "-o", str(new), "--model", str(model), "--mean", "0.4,0.5,0.5")[0] == 0
    a, b = (np.vstack(_rows(p).sort_index()["embedding"]) for p in (old, new))
    want = np.diag(cosine_similarity(b, a))
    changed = tmp_path / "changed.parquet"
    result = CliRunner().invoke(
        cli, ["diff", str(old), str(new), "-o", str(changed), "--json", "--min-cosine", "0.99"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.split("\n1 changed")[0])
    assert report["cosine"]["mean"] == pytest.approx(want.mean(), abs=1e-6)
    assert report["cosine"]["min"] == pytest.approx(want.min(), abs=1e-6)
    assert report["n_changed"] == int((want < 0.99).sum()) == 1  # grey: [0.008, ...] and [0.2, ...]
    written = pd.read_parquet(changed)
    assert [Path(p).stem for p in written["path"]] == ["grey"]
    assert written["cosine"].iloc[0] == pytest.approx(want.min(), abs=1e-6)
    result = CliRunner().invoke(cli, ["diff", str(old), str(new), "--max-changed-share", "0.1"])
    assert result.exit_code == 3
    assert "1 of 4 compared images changed (cosine below 0.99) (25.0%)" in result.output


def test_what_cannot_read_an_encoders_rows_says_so_in_one_line(tmp_path: Path) -> None:
    model = head_model(tmp_path / "encoder", class_names=None, preprocess={"head": "embedding"})
    (tmp_path / "set" / "red").mkdir(parents=True)
    Image.new("RGB", (12, 12), (255, 0, 0)).save(tmp_path / "set" / "red" / "a.png")
    result = CliRunner().invoke(
        cli, ["canary", str(tmp_path / "set"), "--model", str(model), "--workers", "0"]
    )
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "an embedding model has no classes to measure" in result.output
    out = tmp_path / "night"
    assert _score(str(tmp_path / "set"), "-o", str(out), "--model", str(model))[0] == 0
    args = ["quantize", "--model", str(model), "--calibration", str(tmp_path / "set")]
    result = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "int8")])
    assert result.exit_code == 2 and "an embedding model has no classes" in result.output
    classes = tmp_path / "classes.parquet"
    tagger = head_model(tmp_path / "tagger", final="Sigmoid", class_names=TAGS)
    assert _score(str(tmp_path / "set"), "-o", str(classes), "--model", str(tagger))[0] == 0
    result = CliRunner().invoke(cli, ["diff", str(tmp_path / "night"), str(classes)])
    assert result.exit_code == 2
    assert "a diff compares two scorings of the same kind" in result.output
    shutil.copy(classes, tmp_path / "again.parquet")
    args = ["diff", str(classes), str(tmp_path / "again.parquet"), "--min-cosine", "0.5"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "--min-cosine compares embeddings" in result.output


# --- the canary on a multi-label set ------------------------------------------------------------

# Each colour's true tags; the tagger (red 0.88 where the red channel is full, ...) gets white
# and cyan partly wrong, so every metric is below 1 and the averages differ.
TRUTH = {
    "red": ["red"],
    "yellow": ["red", "green"],
    "white": ["red", "green"],
    "green": ["green"],
    "cyan": ["green"],
    "magenta": ["red", "blue"],
    "black": [],
}
RGB = {
    "red": (255, 0, 0),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "green": (0, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "black": (0, 0, 0),
}


def _multi_label_set(folder: Path, kind: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in RGB.items():
        Image.new("RGB", (12, 12), rgb).save(folder / f"{name}.png")
    rows = [{"path": f"{name}.png", "label": tags} for name, tags in TRUTH.items()]
    if kind == "jsonl":
        manifest = folder / "set.jsonl"
        manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif kind == "parquet":
        manifest = folder / "set.parquet"
        pq.write_table(pa.Table.from_pylist(rows), manifest)
    else:  # a CSV cell: names separated by |, or a JSON list ([] for none of the tags)
        manifest = folder / "set.csv"
        cells = ["|".join(tags) if tags else "[]" for tags in TRUTH.values()]
        manifest.write_text(
            "path,label\n" + "".join(f"{n}.png,{c}\n" for n, c in zip(TRUTH, cells, strict=True))
        )
    return manifest


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv"])
def test_a_multi_label_canary_measures_as_scikit_learn_does(tmp_path: Path, kind: str) -> None:
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        f1_score,
        precision_recall_fscore_support,
    )

    manifest = _multi_label_set(tmp_path / "set", kind)
    model = head_model(tmp_path / "tagger", final="Sigmoid", class_names=TAGS)
    report = tmp_path / "report"
    result = CliRunner().invoke(
        cli, ["canary", str(manifest), "--model", str(model), "--workers", "0", "-q",
              "--report", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    measured = json.loads((report / "canary.json").read_text())
    rows = pd.read_parquet(report / "predictions.parquet")
    stems = [Path(p).stem for p in rows["path"]]
    y_true = np.array([[tag in TRUTH[s] for tag in TAGS] for s in stems])
    y_pred = np.array([[tag in list(p) for tag in TAGS] for p in rows["pred_labels"]])
    scores = np.vstack(rows["probs"])
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, average=None, zero_division=0
    )
    for j, tag in enumerate(TAGS):
        got = measured["per_label"][tag]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(
            (precision[j], recall[j], f1[j], support[j])
        )
        assert got["average_precision"] == pytest.approx(
            average_precision_score(y_true[:, j], scores[:, j])
        )
    assert measured["micro"]["f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro"))
    assert measured["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert measured["map"] == pytest.approx(average_precision_score(y_true, scores))
    assert measured["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert 0 < measured["accuracy"] < measured["micro"]["f1"] < 1  # the set is not too easy
    assert "## Per-label metrics" in (report / "report.md").read_text()
    assert not (report / "confusion_matrix.svg").exists()


def test_the_multi_label_gates_and_the_baseline(tmp_path: Path) -> None:
    manifest = _multi_label_set(tmp_path / "set", "jsonl")
    model = head_model(tmp_path / "tagger", final="Sigmoid", class_names=TAGS)
    args = ["canary", str(manifest), "--model", str(model), "--workers", "0", "-q"]
    result = CliRunner().invoke(cli, [*args, "--min-micro-f1", "0.99", "--min-map", "0.5"])
    assert result.exit_code == 3, result.output
    assert "min-micro-f1" in result.output.split("FAILED")[-1]
    assert "min-map" not in result.output.split("canary gate failed")[-1]  # mAP passed

    # The baseline over-tags (its sigmoid never falls below 0.38, its threshold is 0.3): worse
    # on the same images, which the exact-match pairs show.
    baseline = head_model(tmp_path / "baseline", final="Sigmoid", class_names=TAGS, scale=0.5)
    config = {"resize_size": [8, 8], "mean": [0.5] * 3, "std": [0.5] * 3, "threshold": 0.3}
    (baseline / "preprocess.json").write_text(json.dumps(config))
    result = CliRunner().invoke(
        cli,
        [*args, "--baseline", str(baseline), "--max-drop", "0", "--report", str(tmp_path / "r")],
    )
    assert result.exit_code == 0, result.output  # the candidate is better: no drop
    compared = json.loads((tmp_path / "r" / "canary.json").read_text())
    assert compared["baseline"]["accuracy"] < compared["accuracy"]
    assert compared["baseline"]["comparison"]["only_candidate_right"] > 0
    assert "labels changed" in result.output

    single = tmp_path / "single"
    (single / "red").mkdir(parents=True)
    Image.new("RGB", (12, 12), (255, 0, 0)).save(single / "red" / "a.png")
    result = CliRunner().invoke(cli, ["canary", str(single), "--min-map", "0.5", "--workers", "0"])
    assert result.exit_code == 2 and "--min-map gate multi-label models" in result.output


def test_a_multi_label_image_the_model_answers_nan_for_counts_as_wrong(tmp_path: Path) -> None:
    """unstable_model's log of a negative mean is NaN for a dark image: an error row, which the
    canary counts (every label missed) instead of leaving it out."""
    model = unstable_model(tmp_path / "m")
    folder = tmp_path / "set"
    folder.mkdir()
    Image.new("RGB", (12, 12), (255, 255, 255)).save(folder / "white.png")
    Image.new("RGB", (12, 12), (0, 0, 0)).save(folder / "black.png")
    rows = [{"path": "white.png", "label": TAGS}, {"path": "black.png", "label": ["red"]}]
    (folder / "set.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = tmp_path / "report"
    result = CliRunner().invoke(
        cli,
        ["canary", str(folder / "set.jsonl"), "--model", str(model), "--head", "multi-label",
         "--model-output", "logits", "--workers", "0", "-q", "--report", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    measured = json.loads((report / "canary.json").read_text())
    assert measured["n_scored"] == 2 and measured["n_errors"] == 1
    assert measured["errors"][0]["error"] == "model output is not finite (NaN or Inf)"
    assert measured["per_label"]["red"]["recall"] == 0.5  # white's red found, black's missed


def test_a_key_the_head_does_not_read_is_refused_not_ignored(tmp_path: Path) -> None:
    """The BCE user who forgot --head multi-label but gave a threshold would get a softmax head
    and no pred_labels, silently: refused, with the flag to pass."""
    images = _colours(tmp_path / "img")
    out = str(tmp_path / "out.parquet")
    logits = head_model(tmp_path / "bce", class_names=TAGS)
    code, output = _score(*images, "-o", out, "--model", str(logits), "--threshold", "0.3")
    assert code == 2 and output.count("\n") == 1, output
    assert "threshold (command line) applies to a multi-label or binary head, but model" in output
    assert "has a softmax head (one output number per class name): if it is multi-label" in output
    tagger = head_model(tmp_path / "tagger", final="Sigmoid", class_names=TAGS)
    code, output = _score(*images, "-o", out, "--model", str(tagger), "--l2-normalize")
    assert code == 2 and "l2_normalize (command line) applies to an embedding head" in output
    encoder = head_model(tmp_path / "encoder", class_names=None)
    code, output = _score(*images, "-o", out, "--model", str(encoder), "--head", "embedding",
                          "--threshold", "0.3")  # fmt: skip
    assert code == 2 and "has an embedding head" in output


def test_a_binary_heads_decision_threshold(tmp_path: Path) -> None:
    """pred_label is the positive class when p >= the threshold (0.5 by default): at 0.8, an
    image at p 0.7 is the negative class, with its probability 0.3."""
    default = pd.read_parquet(_score_photos(tmp_path / "a", EXPORTED / "keras-binary"))
    strict = pd.read_parquet(
        _score_photos(tmp_path / "b", EXPORTED / "keras-binary", "--threshold", "0.8")
    )
    p = np.array([probs[1] for probs in default["probs"]])
    assert list(default["pred_label"]) == ["dog" if x >= 0.5 else "cat" for x in p]
    assert list(strict["pred_label"]) == ["dog" if x >= 0.8 else "cat" for x in p]
    assert ((p >= 0.5) & (p < 0.8)).any()  # the threshold changes some decisions
    np.testing.assert_allclose(strict["pred_prob"], np.where(p >= 0.8, p, 1 - p), rtol=0, atol=1e-6)


def test_monitor_watches_a_multi_label_models_label_rates(tmp_path: Path) -> None:
    tagger = head_model(tmp_path / "tagger", final="Sigmoid", class_names=TAGS)
    reference, night = tmp_path / "reference", tmp_path / "night"
    for folder, colours in ((reference, [(255, 0, 0), (0, 255, 0)]), (night, [(255, 0, 0)])):
        folder.mkdir()
        for i in range(40):
            Image.new("RGB", (12, 12), colours[i % len(colours)]).save(folder / f"{i:02d}.png")
    for folder in (reference, night):
        code, output = _score(str(folder), "-o", str(tmp_path / f"{folder.name}-out"),
                              "--model", str(tagger))  # fmt: skip
        assert code == 0, output
    result = CliRunner().invoke(
        cli,
        ["monitor", str(tmp_path / "night-out"), "--reference", str(tmp_path / "reference-out")],
    )
    assert result.exit_code == 3, result.output
    line = next(x for x in result.output.splitlines() if "label positive rate" in x)
    assert line.strip().startswith("ALERT label positive rate change, worst label: 0.5000")
    assert line.endswith("green 50% -> 0% of images")


def test_an_encoders_unchanged_nights_rarely_alert_and_a_shift_is_caught() -> None:
    """A seeded share of tests/benchmarks/embedding_noise.py (docs/monitor.md has the figures)."""
    alarms = sum(bool(night_alerts(2_000, seed)) for seed in range(30))
    caught = sum(
        "embedding drift" in " ".join(night_alerts(2_000, 10_000 + s, 0.5)) for s in range(10)
    )
    assert alarms <= 1, alarms  # alpha 0.01 expects 0.3 of 30
    assert caught >= 9, caught


def test_monitor_watches_an_encoders_vectors(tmp_path: Path) -> None:
    """The real encoder on nights drawn from one recipe: a fresh night is ok, a dark one
    alerts on the vectors' direction (and on brightness)."""
    from tests.nights import draw

    encoder = EXPORTED / "hf-encoder"
    args = ["--model", str(encoder), "--head", "embedding"]
    for name, seed, brightness in (("reference", 1, 1.0), ("fresh", 2, 1.0), ("dark", 3, 0.3)):
        draw(tmp_path / name, per_photo=8, seed=seed, brightness=brightness)
    assert _score(str(tmp_path / "reference"), "-o", str(tmp_path / "ref"), *args)[0] == 0
    verdicts = {}
    for night in ("fresh", "dark"):
        out = str(tmp_path / "nights")
        code, output = _score(str(tmp_path / night), "-o", out, *args, "--run-id", night)
        assert code == 0, output
        result = CliRunner().invoke(
            cli, ["monitor", out, "--reference", str(tmp_path / "ref"), "--report",
                  str(tmp_path / f"report-{night}")],
        )  # fmt: skip
        verdicts[night] = (result.exit_code, result.output)
    assert verdicts["fresh"][0] == 0, verdicts["fresh"][1]
    assert verdicts["dark"][0] == 3, verdicts["dark"][1]
    assert "ALERT embedding drift (random projections, Kolmogorov-Smirnov)" in verdicts["dark"][1]
    trend = (tmp_path / "report-dark" / "trend.svg").read_text()
    assert "embedding drift (largest KS of 32 directions)" in trend


def test_diff_compares_a_multi_label_models_label_sets(tmp_path: Path) -> None:
    """Rescoring a tagger at a lower threshold: an image whose set of predicted labels changed
    is changed, and the mean Jaccard similarity is scikit-learn's (samples average)."""
    from sklearn.metrics import jaccard_score

    manifest = _multi_label_set(tmp_path / "set", "jsonl")
    tagger = head_model(tmp_path / "tagger", final="Sigmoid", class_names=TAGS)
    old, new = tmp_path / "old.parquet", tmp_path / "new.parquet"
    assert _score(str(manifest), "-o", str(old), "--model", str(tagger))[0] == 0
    code, output = _score(
        str(manifest), "-o", str(new), "--model", str(tagger), "--threshold", "0.1"
    )
    assert code == 0, output
    changed = tmp_path / "changed.parquet"
    result = CliRunner().invoke(cli, ["diff", str(old), str(new), "-o", str(changed), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    a, b = (_rows(p).sort_index()["pred_labels"] for p in (old, new))
    y_a = np.array([[t in list(x) for t in TAGS] for x in a])
    y_b = np.array([[t in list(x) for t in TAGS] for x in b])
    assert report["mean_jaccard"] == pytest.approx(
        jaccard_score(y_a, y_b, average="samples", zero_division=1.0)
    )
    assert report["n_changed"] == int((y_a != y_b).any(axis=1).sum()) > 0
    written = pd.read_parquet(changed)
    assert list(written.columns[-2:]) == ["a_labels", "b_labels"]
    assert all(set(b_.split("|")) == set(TAGS) for b_ in written["b_labels"])
    text = CliRunner().invoke(cli, ["diff", str(old), str(new)]).output
    assert "changed labels (the set of predicted labels):" in text and "changed top-1" not in text


def test_what_the_user_trials_found(tmp_path: Path) -> None:
    """An encoder diff with no image in common says there is nothing to compare (it crashed);
    a canary's unlabelled images are not called 'label unknown'; a binary canary has no top-2."""
    encoder = head_model(tmp_path / "encoder", class_names=None, preprocess={"head": "embedding"})
    images = _colours(tmp_path / "a")
    Image.new("RGB", (12, 12), (0, 0, 255)).save(tmp_path / "blue.png")
    one, other = tmp_path / "one.parquet", tmp_path / "other.parquet"
    assert _score(*images, "-o", str(one), "--model", str(encoder))[0] == 0
    assert _score(str(tmp_path / "blue.png"), "-o", str(other), "--model", str(encoder))[0] == 0
    result = CliRunner().invoke(cli, ["diff", str(one), str(other)])
    assert result.exit_code == 0 and result.output.endswith("nothing to compare\n"), result.output
    result = CliRunner().invoke(cli, ["diff", str(one), str(other), "--max-changed-share", "0.1"])
    assert result.exit_code == 3 and "no image was scored ok on both sides" in result.output

    folder = tmp_path / "set"
    _multi_label_set(folder, "jsonl")
    with (folder / "set.jsonl").open("a") as manifest:
        manifest.write(json.dumps({"path": "red.png", "label": None}) + "\n")
    tagger = head_model(tmp_path / "tagger", final="Sigmoid", class_names=TAGS)
    result = CliRunner().invoke(
        cli, ["canary", str(folder / "set.jsonl"), "--model", str(tagger), "--workers", "0", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert "1 excluded (0 with a label unknown to the model, 1 without a label)" in result.output

    (tmp_path / "binary" / "dog").mkdir(parents=True)
    shutil.copy(PHOTOS[0], tmp_path / "binary" / "dog" / "a.jpg")
    result = CliRunner().invoke(
        cli, ["canary", str(tmp_path / "binary"), "--model", str(EXPORTED / "keras-binary"),
              "--workers", "0", "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "top-2 accuracy" not in result.output
