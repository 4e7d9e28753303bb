"""The model and the artifacts that travel with it: ONNX file, class map, preprocessing, hash.

`load_model` checks everything once, in the parent, before any image is read: a broken model
or a class map of the wrong length is a one-line configuration error, not a crash in the
middle of the night. It returns a small picklable `ModelSpec`; each process that scores
creates its own ONNX Runtime session from it (`create_session`), because sessions must never
be shared across processes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from batchscore.errors import ModelError
from batchscore.exporters import HF_FILE, TIMM_FILE, exporter_config
from batchscore.heads import HEAD_KEYS, resolve_head
from batchscore.labels import find_labels
from batchscore.onnx_files import final_op, model_sha256
from batchscore.preprocess import tensor_batch
from batchscore.preprocess_config import DEFAULT_PREPROCESS, PreprocessConfig, resolve_preprocess
from batchscore.spec import ModelSpec

# Looked for in a model directory in this order (model_int8.onnx: a folder `quantize` wrote);
# else the folder's only .onnx file.
MODEL_FILENAMES = ("model_fp32.onnx", "model.onnx", "model_int8.onnx")
PREPROCESS_FILENAME = "preprocess.json"
SIZE_KEYS = ("resize_size", "crop_size")
_INPUT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(uint8)": "uint8",
}


def bundled_model_dir() -> Path:
    """The pretrained EfficientNet-Lite0 shipped with batchscore (wheel or source checkout)."""
    package = Path(__file__).resolve().parent
    installed = package / "artifacts"
    return installed if installed.is_dir() else package.parent / "artifacts"


def _find_model_file(location: Path) -> Path:
    if location.is_dir():
        for name in MODEL_FILENAMES:
            if (location / name).is_file():
                return location / name
        found = sorted(p.name for p in location.glob("*.onnx") if p.is_file())
        if len(found) == 1:
            return location / found[0]
        if found:
            raise ModelError(
                f"model directory {location} holds {len(found)} .onnx files ({', '.join(found)}):"
                " pass --model with the one to score"
            )
        raise ModelError(f"no .onnx file in model directory {location}")
    if not location.exists():
        raise ModelError(f"model not found: {location}")
    if location.suffix.lower() != ".onnx":
        raise ModelError(f"model must be an .onnx file or a directory, got {location}")
    if not location.is_file():
        raise ModelError(f"model {location} is not a regular file")
    return location


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {what} {path}: {exc}") from exc


def first_line(exc: BaseException) -> str:
    """ORT errors are multi-line dumps; the first line says what went wrong."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _session_metadata(session: ort.InferenceSession) -> dict[str, str]:
    return dict(session.get_modelmeta().custom_metadata_map)


def _validate_providers(providers: Sequence[str] | None) -> tuple[str, ...]:
    available = ort.get_available_providers()
    if not providers:
        return ("CPUExecutionProvider",)
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise ModelError(f"execution providers {unknown} not available; available: {available}")
    return tuple(providers)


def create_session(spec: ModelSpec, threads: int = 1) -> ort.InferenceSession:
    """A session for this process. Spinning is off: idle ORT threads must not burn cores
    that the other worker processes need."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(spec.path, sess_options=options, providers=list(spec.providers))


def load_model(
    location: str | Path | None = None,
    *,
    preprocess_overrides: Mapping[str, Any] | None = None,
    expected_sha256: str | None = None,
    providers: Sequence[str] | None = None,
    labels: str | Path | None = None,
    output_name: str | None = None,
) -> ModelSpec:
    """Find, hash and check a model; raise ModelError with one clear line when it is unusable.

    `labels` names the class-name file (else see `batchscore.labels`); `output_name` picks one
    of several outputs (else the first)."""
    base = Path(location) if location is not None else bundled_model_dir()
    model_path = _find_model_file(base)
    sha256 = model_sha256(model_path)
    if expected_sha256 and not sha256.startswith(expected_sha256.lower()):
        raise ModelError(
            f"model {model_path} has SHA-256 {sha256}, not the expected {expected_sha256}"
        )
    chosen_providers = _validate_providers(providers)
    try:
        probe = ort.InferenceSession(str(model_path), providers=list(chosen_providers))
    except Exception as exc:  # ORT raises its own untyped errors for any broken graph
        raise ModelError(f"cannot load model {model_path}: {first_line(exc)}") from exc
    metadata = _session_metadata(probe)
    folder = model_path.parent

    notes: list[str] = []
    model_config, config_sources = _model_config(folder, metadata)
    overrides = {k: v for k, v in (preprocess_overrides or {}).items() if v is not None}
    sources = dict.fromkeys(DEFAULT_PREPROCESS, "default")
    sources |= config_sources
    if not any(key in layer for layer in (overrides, model_config) for key in SIZE_KEYS):
        given = {**model_config, **overrides}
        model_config = {**model_config, **_size_from_input(probe, model_path, given, notes)}
        sources["resize_size"] = "the model's fixed input size (assumed)"
    sources |= dict.fromkeys(overrides, "command line")
    preprocess = resolve_preprocess(overrides, model_config)
    if preprocess.head == "embedding":  # a vector has no classes: no class map is looked for
        class_names: tuple[str, ...] = ()
        labels_from = "none: an embedding head has no classes"
    else:
        class_names, labels_from = find_labels(
            folder, None if labels is None else Path(labels), metadata
        )
    notes.insert(0, f"labels: {len(class_names)} class names from {labels_from}")

    spec = _check_signature(
        probe,
        model_path=model_path,
        sha256=sha256,
        class_names=class_names,
        preprocess=preprocess,
        providers=chosen_providers,
        output_name=output_name,
        notes=notes,
    )
    outputs = _check_forward(probe, spec)
    spec, head_sources = resolve_head(
        spec,
        outputs,
        final=final_op(model_path, spec.output_name),
        exported=any(where.startswith((HF_FILE, TIMM_FILE)) for where in config_sources.values()),
        given={
            key: sources[key] for key in ("head", "output", *HEAD_KEYS) if sources[key] != "default"
        },
        notes=notes,
    )
    sources |= head_sources
    return replace(
        spec,
        notes=tuple(notes),
        preprocess_sources=tuple(sources.items()),
        labels_from=labels_from,
    )


def _model_config(
    folder: Path, metadata: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The model's own preprocessing config, key by key, and where each key came from: the
    ONNX metadata, under an exporter's files (Hugging Face, timm), under batchscore's
    preprocess.json. A preprocess.json that changes only the mean keeps the exporter's size
    and layout."""
    layers: list[tuple[Any, str]] = []
    if "preprocess" in metadata:
        layers.append((_json_metadata(metadata, "preprocess"), "the model's metadata (preprocess)"))
    exported = exporter_config(folder)
    if exported is not None:
        layers.append(exported)
    preprocess_file = folder / PREPROCESS_FILENAME
    if preprocess_file.is_file():
        layers.append((_read_json(preprocess_file, "preprocess config"), PREPROCESS_FILENAME))
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for config, where in layers:
        if not isinstance(config, dict):
            raise ModelError(f"preprocess config in {where} of {folder} must be a JSON object")
        given = {key: value for key, value in config.items() if value is not None}
        merged |= given
        sources |= dict.fromkeys(given, where)
    return merged, sources


def _json_metadata(metadata: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise ModelError(f"model metadata '{key}' is not valid JSON: {exc}") from exc


def _check_signature(
    session: ort.InferenceSession,
    *,
    model_path: Path,
    sha256: str,
    class_names: tuple[str, ...],
    preprocess: PreprocessConfig,
    providers: tuple[str, ...],
    output_name: str | None,
    notes: list[str],
) -> ModelSpec:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"model {model_path} must have exactly one input, has {len(inputs)}")
    tensor = inputs[0]
    if tensor.type not in _INPUT_DTYPES:
        raise ModelError(f"model input must be float32, float16 or uint8, got {tensor.type}")
    shape = list(tensor.shape)
    if len(shape) != 4:
        raise ModelError(f"model input must be an image batch (rank 4), got shape {shape}")
    layout = preprocess.layout or _layout(shape, model_path)
    batch, channels, height, width = shape if layout == "NCHW" else [shape[i] for i in (0, 3, 1, 2)]
    if not isinstance(channels, int) and layout == preprocess.layout:
        # A symbolic channel axis (optimum names it num_channels) in a layout the config gives:
        # the preprocessing makes one channel per mean value; a model that wants another number
        # fails the test forward pass below.
        notes.append(
            f"input: channel axis {channels!r} is symbolic; feeding {len(preprocess.mean)}"
            " channel(s), one per mean value"
        )
        channels = len(preprocess.mean)
    if channels not in (1, 3):
        raise ModelError(
            f"model input {shape} read as {layout} has {channels} channels, not 1 or 3; if it is"
            ' the other layout, set "layout" in preprocess.json'
        )
    if len(preprocess.mean) != channels or len(preprocess.std) != channels:
        raise ModelError(
            f"model takes {channels} channel(s) but mean/std have {len(preprocess.mean)}/"
            f"{len(preprocess.std)} values: give one per channel, in preprocess.json or with"
            " --mean/--std"
        )
    want_h, want_w = preprocess.input_size
    for name, dim, want in (("height", height, want_h), ("width", width, want_w)):
        if isinstance(dim, int) and dim != want:
            raise ModelError(
                f"model input {name} is {dim} but preprocessing produces {want_h}x{want_w}"
                f" (input shape {shape}); fix preprocess.json or the crop/resize flags"
            )
    embedding = preprocess.head == "embedding"
    if embedding:
        output = _pick_vector(session, model_path, output_name, notes)
    else:
        output = _pick_output(session, model_path, output_name, len(class_names), notes)
    out_shape = list(output.shape)
    if not _is_scores(out_shape):
        raise ModelError(
            f"model output {output.name!r} must be [batch, {'size' if embedding else 'classes'}]"
            f" or [batch, {'size' if embedding else 'classes'}, 1, 1], got shape {out_shape};"
            f" the model's outputs: {_widths(session)} (pick one with --output-name)"
        )
    head = "embedding" if embedding else "binary" if out_shape[1] == 1 else "softmax"
    if out_shape[1] == 1 and len(class_names) == 1:
        raise ModelError(
            f"model output {output.name!r} is one number (a binary head: the probability or"
            f" logit of class index 1) but the class map has one name, {class_names[0]!r}:"
            " give two, the negative class first (as Keras' class_indices.json orders them)"
        )
    if isinstance(out_shape[1], int) and head == "softmax" and out_shape[1] != len(class_names):
        raise ModelError(
            f"model output {output.name!r} has {out_shape[1]} classes but the class map has"
            f" {len(class_names)}; the model's outputs: {_widths(session)} (if it is a vector,"
            " not class scores: --head embedding)"
        )
    if head == "binary" and len(class_names) != 2:
        raise ModelError(
            f"model output {output.name!r} is one number (a binary head) but the class map has"
            f" {len(class_names)} names: give two, the negative class first"
        )
    fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
    return ModelSpec(
        path=str(model_path.resolve()),
        sha256=sha256,
        class_names=class_names,
        preprocess=preprocess,
        input_name=tensor.name,
        input_dtype=_INPUT_DTYPES[tensor.type],
        fixed_batch=fixed_batch,
        providers=providers,
        layout=layout,
        channels=int(channels),
        output_name=output.name,
        head=head,
    )


def _layout(shape: list[Any], model_path: Path) -> str:
    """NCHW or NHWC, from the axis that holds 1 or 3 channels; both or neither: ask."""
    first, last = shape[1] in (1, 3), shape[3] in (1, 3)
    if first != last:
        return "NCHW" if first else "NHWC"
    raise ModelError(
        f"cannot tell the layout of model {model_path.name} from its input shape {shape}:"
        ' set "layout": "NCHW" or "NHWC" in preprocess.json beside it'
    )


def _pick_output(
    session: ort.InferenceSession,
    model_path: Path,
    name: str | None,
    n_classes: int,
    notes: list[str],
) -> ort.NodeArg:
    """The output named, or else the one the class map fits: with several outputs (features
    and logits, say) the first whose width is the number of class names, noted."""
    outputs = session.get_outputs()
    if name is not None:
        for output in outputs:
            if output.name == name:
                return output
        raise ModelError(
            f"model {model_path} has no output {name!r}; its outputs: {_widths(session)}"
        )
    if len(outputs) == 1:
        return outputs[0]
    widths = (n_classes, 1) if n_classes == 2 else (n_classes,)  # 1: a binary head
    fitting = [o for o in outputs if _is_scores(list(o.shape)) and o.shape[1] in widths]
    if not fitting:
        raise ModelError(
            f"none of the model's outputs has {n_classes} classes, as the class map does:"
            f" {_widths(session)}; fix the class names, or pass --output-name"
        )
    chosen = fitting[0]
    why = "the only one" if len(fitting) == 1 else f"the first of {len(fitting)}"
    notes.append(
        f"output: {chosen.name!r}, {why} of the model's outputs with {n_classes} classes"
        f" ({_widths(session)}); --output-name picks another"
    )
    return chosen


def _pick_vector(
    session: ort.InferenceSession, model_path: Path, name: str | None, notes: list[str]
) -> ort.NodeArg:
    """An embedding head's output: the one named, or the only one that is a vector per image
    (optimum's encoders also output `last_hidden_state`, a vector per token)."""
    outputs = session.get_outputs()
    if name is not None or len(outputs) == 1:
        return _pick_output(session, model_path, name, 0, notes)
    vectors = [o for o in outputs if _is_scores(list(o.shape))]
    if len(vectors) != 1:
        raise ModelError(
            f"model {model_path.name} has {len(vectors)} outputs that hold one vector per image"
            f" ({_widths(session)}): pass --output-name with the embedding's"
        )
    notes.append(
        f"output: {vectors[0].name!r}, the only one of the model's outputs with one vector per"
        f" image ({_widths(session)}); --output-name picks another"
    )
    return vectors[0]


def _is_scores(shape: list[Any]) -> bool:
    """[batch, classes], or [batch, classes, 1, 1] as a 1x1 convolution head leaves it."""
    return len(shape) == 2 or (len(shape) == 4 and shape[2:] == [1, 1])


def _widths(session: ort.InferenceSession) -> str:
    """Every output of the model with its shape, for a message."""
    return ", ".join(f"{o.name!r} {list(o.shape)}" for o in session.get_outputs())


def run_model(spec: ModelSpec, session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    """The model's raw output for `batch`, as float32. A model exported with a fixed batch axis
    gets its batch in pieces of that size, the last one padded with zeros."""
    if spec.fixed_batch is None:
        (out,) = session.run([spec.output_name], {spec.input_name: batch})
        return np.asarray(out, dtype=np.float32).reshape(len(batch), -1)  # [N, C, 1, 1] too
    size = spec.fixed_batch
    pieces = []
    for start in range(0, len(batch), size):
        piece = batch[start : start + size]
        if len(piece) < size:
            pad = np.zeros((size - len(piece), *piece.shape[1:]), dtype=piece.dtype)
            piece = np.concatenate([piece, pad])
        (out,) = session.run([spec.output_name], {spec.input_name: piece})
        rows = np.asarray(out, dtype=np.float32).reshape(size, -1)
        pieces.append(rows[: min(size, len(batch) - start)])
    return np.concatenate(pieces)


def _check_forward(session: ort.InferenceSession, spec: ModelSpec) -> np.ndarray:
    """One forward pass on a few test images (noise, then a blank one): catches graphs that
    load but cannot run, and returns their outputs."""
    height, width = spec.preprocess.input_size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(2)]
    images.append(np.zeros((height, width, 3), dtype=np.uint8))
    batch = tensor_batch(
        images, spec.preprocess, spec.input_dtype, layout=spec.layout, channels=spec.channels
    )
    try:
        outputs = run_model(spec, session, batch)
    except Exception as exc:  # ORT's runtime errors carry no useful type
        raise ModelError(f"model {spec.path} fails on a test input: {first_line(exc)}") from exc
    if spec.head != "embedding" and outputs.shape[1] != spec.output_width:
        raise ModelError(
            f"model outputs shape {list(outputs.shape)} but the class map has"
            f" {spec.num_classes} classes"
        )
    return outputs


def _size_from_input(
    session: ort.InferenceSession, model_path: Path, given: Mapping[str, Any], notes: list[str]
) -> dict[str, Any]:
    """No input size anywhere: take the model's fixed height and width, on stated defaults, or
    stop. Guessing a size for a dynamic-size model scores it silently wrong."""
    shape = list(session.get_inputs()[0].shape)
    height = width = None
    if len(shape) == 4:
        layout = str(given.get("layout") or _layout(shape, model_path)).upper()
        height, width = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise ModelError(
            f"model {model_path} takes any image size (input shape {shape}) and nothing says"
            f" which to use: looked for {PREPROCESS_FILENAME} beside it and 'preprocess' in its"
            " metadata; write one, or pass --resize-size H,W (and --mean/--std)"
        )
    defaults = [
        f"{key} {DEFAULT_PREPROCESS[key]}"
        for key in ("interpolation", "mean", "std")
        if key not in given
    ]
    notes.append(
        f"assumed: no input size given for {model_path.name}: resizing to its fixed input"
        f" {height}x{width}"
        + (f", with the defaults {', '.join(defaults)}" if defaults else "")
        + f"; write {PREPROCESS_FILENAME} beside it or pass --resize-size/--mean/--std if it"
        " was trained otherwise"
    )
    return {"resize_size": [height, width]}
