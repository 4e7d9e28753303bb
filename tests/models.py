"""Tiny real ONNX models built with onnx.helper, written with their class map and config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17


def _save(
    graph: onnx.GraphProto,
    folder: Path,
    class_names: list[str],
    preprocess: dict[str, Any] | None,
    filename: str,
) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / filename)
    (folder / "class_map.json").write_text(json.dumps(class_names))
    if preprocess is not None:
        (folder / "preprocess.json").write_text(json.dumps(preprocess))
    return folder


def color_model(
    folder: Path,
    *,
    size: int = 16,
    batch: int | str = "N",
    scale: float = 10.0,
    preprocess: dict[str, Any] | None = None,
    filename: str = "model.onnx",
    class_names: tuple[str, str, str] = ("red", "green", "blue"),
) -> Path:
    """Logits = scale * per-channel mean of the normalised input: predicts the dominant colour."""
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("Mul", ["flat", "scale"], ["logits"]),
        ],
        "color",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])],
        initializer=[helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])],
    )
    config = preprocess or {
        "resize_size": [size, size],
        "interpolation": "bilinear",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "output": "logits",  # trained with softmax: nothing to assume
    }
    return _save(graph, folder, list(class_names), config, filename)


def unstable_model(folder: Path, *, size: int = 8) -> Path:
    """Logits = log of the per-channel mean of the input normalised to [-1, 1]: NaN for an image
    with a channel below mid-grey (log of a negative), finite for a light one. An fp16 export
    that overflows fails the same way on some inputs."""
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("Log", ["flat"], ["logits"]),
        ],
        "unstable",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
    )
    config = {"resize_size": [size, size], "mean": [0.5] * 3, "std": [0.5] * 3, "output": "logits"}
    return _save(graph, folder, ["red", "green", "blue"], config, "model.onnx")


def probe_model(folder: Path, *, size: int = 8, preprocess: dict[str, Any] | None = None) -> Path:
    """Outputs its own input, flattened: the 'probs' column is exactly the tensor it was fed."""
    n_values = 3 * size * size
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["values"], axis=1)],
        "probe",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["N", n_values])],
    )
    config = {
        "resize_size": [size, size],
        "interpolation": "bilinear",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        **(preprocess or {}),
        "output": "probabilities",
    }
    return _save(graph, folder, [f"v{i}" for i in range(n_values)], config, "model.onnx")


def slow_color_model(folder: Path, *, size: int = 16, work: int = 2000) -> Path:
    """`color_model` plus an input-dependent matrix product: each image costs real CPU time,
    so a test can signal a run while it is still busy."""
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("ReduceMean", ["flat"], ["level"], keepdims=1),
            helper.make_node("Mul", ["level", "ones"], ["square"]),
            helper.make_node("MatMul", ["square", "ones"], ["product"]),
            helper.make_node("ReduceSum", ["product"], ["total"], keepdims=0),
            helper.make_node("Mul", ["total", "zero"], ["nothing"]),
            helper.make_node("Mul", ["flat", "scale"], ["scaled"]),
            helper.make_node("Add", ["scaled", "nothing"], ["logits"]),
        ],
        "slow_color",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=[
            helper.make_tensor("scale", TensorProto.FLOAT, [], [10.0]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor(
                "ones",
                TensorProto.FLOAT,
                [work, work],
                np.ones((work, work), dtype=np.float32).tobytes(),
                raw=True,
            ),
        ],
    )
    config = {"resize_size": [size, size], "mean": [0.5] * 3, "std": [0.5] * 3, "output": "logits"}
    return _save(graph, folder, ["red", "green", "blue"], config, "model.onnx")


def head_model(
    folder: Path,
    *,
    final: str | None = None,
    scale: float = 2.0,
    class_names: list[str] | None = None,
    preprocess: dict[str, Any] | None = None,
    tokens: bool = False,
    size: int = 8,
) -> Path:
    """`color_model`'s scores (scale * the normalised per-channel means: red (255, 0, 0) gives
    [scale, -scale, -scale]) through an optional `final` activation (Sigmoid, Softmax), for the
    head kinds. `class_names` None writes no class map; `tokens` adds a first output of one
    vector per token ([N, 4, 3]), as an image encoder's last_hidden_state."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Mul", ["flat", "scale"], ["scores" if final is None else "raw"]),
    ]
    if final is not None:
        nodes.append(helper.make_node(final, ["raw"], ["scores"]))
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])]
    initializer = [helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])]
    if tokens:
        nodes.append(helper.make_node("Unsqueeze", ["flat", "axis"], ["one_token"]))
        nodes.append(helper.make_node("Tile", ["one_token", "repeats"], ["hidden"]))
        outputs.insert(0, helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", 4, 3]))
        initializer += [
            helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
            helper.make_tensor("repeats", TensorProto.INT64, [3], [1, 4, 1]),
        ]
    graph = helper.make_graph(
        nodes,
        "heads",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        outputs,
        initializer=initializer,
    )
    config = {
        "resize_size": [size, size],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        **(preprocess or {}),
    }
    _save(graph, folder, class_names or [], config, "model.onnx")
    if class_names is None:
        (folder / "class_map.json").unlink()
    return folder
