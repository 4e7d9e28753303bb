"""`batchscore quantize`: a real (small) conv net quantized on real photos, and the shipped int8."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from batchscore.cli import cli
from batchscore.errors import ConfigError
from batchscore.model import load_model
from batchscore.quantize import (
    INT8_FILENAME,
    REPORT_FILENAME,
    QuantizeOptions,
    quantize_model,
)
from batchscore.scorer import Scorer
from batchscore.settings import PipelineOptions
from tests.conftest import REPO, SAMPLES

ARTIFACTS = REPO / "artifacts"
CLASSES = [f"class_{i}" for i in range(10)]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


Layer = tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]


def _conv(name: str, x: str, c_in: int, c_out: int, stride: int, rng: np.random.Generator) -> Layer:
    weight = rng.normal(0, (2 / (9 * c_in)) ** 0.5, (c_out, c_in, 3, 3)).astype(np.float32)
    bias = rng.normal(0, 0.1, c_out).astype(np.float32)
    node = helper.make_node(
        "Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.y"], name=name,
        pads=[1, 1, 1, 1], strides=[stride, stride],
    )  # fmt: skip
    relu = helper.make_node("Relu", [f"{name}.y"], [f"{name}.r"], name=f"{name}.relu")
    inits = [
        numpy_helper.from_array(weight, f"{name}.w"),
        numpy_helper.from_array(bias, f"{name}.b"),
    ]
    return [node, relu], inits, f"{name}.r"


def small_convnet(folder: Path, size: int = 32, batch: int | str = "N") -> Path:
    """Three Conv+Relu, GlobalAveragePool, Gemm: random but fixed weights, 10 classes."""
    rng = np.random.default_rng(7)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "input"
    layers = (("conv1", 3, 8, 1), ("conv2", 8, 16, 2), ("conv3", 16, 16, 1))
    for name, c_in, c_out, stride in layers:
        layer, weights, x = _conv(name, x, c_in, c_out, stride, rng)
        nodes += layer
        inits += weights
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    inits += [
        numpy_helper.from_array(rng.normal(0, 0.5, (10, 16)).astype(np.float32), "fc.w"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc.b"),
    ]
    graph = helper.make_graph(
        nodes,
        "small_convnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx")
    (folder / "class_map.json").write_text(json.dumps(CLASSES))
    preprocess = {"resize_size": 36, "crop_size": size, "mean": [0.5] * 3, "std": [0.25] * 3}
    (folder / "preprocess.json").write_text(json.dumps(preprocess))
    return folder


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Real photos: the bundled samples, plus a crop and a flip of each (12 images)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for sample in sorted(SAMPLES.glob("*.jpg")):
        image = Image.open(sample).convert("RGB")
        image.save(folder / sample.name)
        w, h = image.size
        image.crop((w // 4, h // 4, w, h)).save(folder / f"crop_{sample.name}")
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / f"flip_{sample.name}")
    return folder


def test_quantize_writes_a_model_that_scores_and_a_report(tmp_path: Path, photos: Path) -> None:
    model_dir = small_convnet(tmp_path / "fp32")
    out = tmp_path / "int8"
    code, output = run(
        "quantize",
        "--model",
        str(model_dir),
        "--calibration",
        str(photos),
        "-o",
        str(out),
        "--holdout-count",
        "4",
    )
    assert code == 0, output
    assert "top-1 agreement" in output
    for name in (INT8_FILENAME, "class_map.json", "preprocess.json", REPORT_FILENAME):
        assert (out / name).is_file(), name
    report = json.loads((out / REPORT_FILENAME).read_text())
    assert report["holdout_images"] == 4
    assert report["calibration_images"] == 8  # the rest: held-out images never calibrate
    assert report["agreement"]["n"] == 4
    assert 0.0 <= report["agreement"]["top1"] <= 1.0
    assert 0.0 <= report["agreement"]["top5_overlap"] <= 1.0
    assert report["int8_bytes"] > 0
    assert report["speedup"] > 0
    ops = {node.op_type for node in onnx.load(out / INT8_FILENAME).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # static QDQ, not ConvInteger
    assert "ConvInteger" not in ops

    preds = tmp_path / "preds.parquet"
    args = ["score", str(photos), "-o", str(preds), "--workers", "0"]
    code, output = run(*args, "--model", str(out / INT8_FILENAME))
    assert code == 0, output
    rows = pd.read_parquet(preds)
    assert len(rows) == 12
    assert (rows["status"] == "ok").all()
    assert set(rows["pred_label"]) <= set(CLASSES)


def test_kept_layers_stay_fp32(tmp_path: Path, photos: Path) -> None:
    options = QuantizeOptions(keep_first_conv=True, keep_classifier=True, holdout_count=2)
    report = quantize_model(small_convnet(tmp_path / "fp32"), [photos], tmp_path / "out", options)
    assert report.excluded_nodes == ("conv1", "fc")
    graph = onnx.load(tmp_path / "out" / INT8_FILENAME).graph
    produced_by = {output: node for node in graph.node for output in node.output}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm"):
            weight_source = produced_by.get(node.input[1])
            dequantized = weight_source is not None and weight_source.op_type == "DequantizeLinear"
            assert dequantized == (node.name not in ("conv1", "fc")), node.name


@pytest.mark.parametrize("batch", [1, 3])
def test_a_model_with_a_fixed_batch_axis_quantizes_as_it_scores(
    tmp_path: Path, photos: Path, batch: int
) -> None:
    """`score` pads the last piece for a fixed batch axis; quantize runs the model the same
    way (calibration, agreement and speed), so a batch-1 export is no longer refused."""
    options = QuantizeOptions(calibration_count=5, holdout_count=4, speed_repeats=2)
    fp32 = small_convnet(tmp_path / "fp32", batch=batch)
    report = quantize_model(fp32, [photos], tmp_path / "out", options)
    assert (report.calibration_images, report.holdout_images) == (5, 4)
    assert report.agreement.n == 4 and report.agreement.top1 is not None
    int8 = tmp_path / "out" / INT8_FILENAME
    assert load_model(int8).fixed_batch == batch
    preds = tmp_path / "preds.parquet"
    code, output = run(
        "score", str(photos), "-o", str(preds), "--workers", "0", "--model", str(int8)
    )
    assert code == 0, output
    assert (pd.read_parquet(preds)["status"] == "ok").sum() == 12


def test_separate_holdout_source_is_used_as_given(tmp_path: Path, photos: Path) -> None:
    options = QuantizeOptions(calibration_count=5)
    report = quantize_model(
        small_convnet(tmp_path / "fp32"), [photos], tmp_path / "out", options, holdout=[SAMPLES]
    )
    assert (report.calibration_images, report.holdout_images) == (5, 4)
    assert report.holdout_source == str(SAMPLES)


def test_missing_calibration_source_exits_2(tmp_path: Path) -> None:
    code, output = run(
        "quantize", "--calibration", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")
    )
    assert code == 2
    assert "source not found" in output
    assert not (tmp_path / "out").exists()


def test_unknown_node_to_keep_exits_2(tmp_path: Path, photos: Path) -> None:
    model_dir = small_convnet(tmp_path / "fp32")
    code, output = run(
        "quantize",
        "--model",
        str(model_dir),
        "--calibration",
        str(photos),
        "-o",
        str(tmp_path / "out"),
        "--exclude-node",
        "no_such_node",
    )
    assert code == 2
    assert "no_such_node" in output


@pytest.mark.parametrize("package", ["onnx", "sympy"])
def test_missing_optional_package_says_how_to_install(
    tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch, package: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # as if it were not installed
    with pytest.raises(
        ConfigError, match=r"pip install '\.\[quantize\]' from a batchscore checkout"
    ):
        quantize_model(None, [photos], tmp_path / "out")


def test_shipped_int8_model_agrees_with_fp32_on_confident_samples() -> None:
    fp32 = load_model(ARTIFACTS)
    int8 = load_model(ARTIFACTS / INT8_FILENAME)  # class map and preprocess found beside it
    assert int8.class_names == fp32.class_names
    assert int8.preprocess == fp32.preprocess
    assert (ARTIFACTS / INT8_FILENAME).stat().st_size < 6_000_000
    samples = sorted(str(p) for p in SAMPLES.glob("*.jpg"))
    scorer = Scorer([fp32, int8], PipelineOptions(workers=0))
    output = scorer.score([(path, None, None) for path in samples])
    assert output.errors == [None] * len(samples)
    reference, candidate = output.scores
    confident = reference.probs.max(axis=1) >= 0.5
    assert confident.sum() >= 2  # coffee and cameraman
    same = reference.topk[:, 0] == candidate.topk[:, 0]
    assert same[confident].all()
    report = json.loads((ARTIFACTS / REPORT_FILENAME).read_text())
    assert report["int8_sha256"] == int8.sha256  # the report describes this very file
    assert report["confident"]["top1"] >= 0.95


def test_a_dynamo_export_with_external_data_and_any_image_size_quantizes(
    tmp_path: Path, photos: Path
) -> None:
    """torch's dynamo exporter (through timm) wrote model.onnx + model.onnx.data with symbolic
    height and width: ORT's pre-processing could read neither. The report counts the data file
    in the fp32 size, and the int8 folder scores."""
    exported = REPO / "tests" / "exported" / "timm-nfnet-external-data"
    options = QuantizeOptions(calibration_count=5, holdout_count=4, speed_repeats=2)
    report = quantize_model(exported, [photos], tmp_path / "out", options)
    on_disk = sum(f.stat().st_size for f in exported.glob("model.onnx*"))
    assert report.fp32_bytes == on_disk > 3 * (exported / "model.onnx").stat().st_size
    assert report.agreement.n == 4
    preds = tmp_path / "preds.parquet"
    code, output = run(
        "score", str(photos), "-o", str(preds), "--workers", "0", "--model", str(tmp_path / "out")
    )
    assert code == 0, output
    assert (pd.read_parquet(preds)["status"] == "ok").sum() == 12


def test_a_graph_ort_cannot_infer_leaves_nothing_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With symbolic height and width, ORT's symbolic shape inference gives up and dumps the
    graph and its weights into the working directory; batchscore removes that dump (quantize
    itself fixes the image axes first, so this path needs a graph ORT cannot infer anyway)."""
    from batchscore.quantize import _api, _pre_process

    monkeypatch.chdir(tmp_path)
    model = onnx.load(str(REPO / "tests" / "exported" / "timm-nfnet-external-data" / "model.onnx"))
    with pytest.raises(Exception, match="Incomplete symbolic shape inference"):
        _pre_process(_api(), model, tmp_path / "prepared.onnx")
    assert list(tmp_path.iterdir()) == []
