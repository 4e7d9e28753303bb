"""The model and the artifacts that travel with it: ONNX file, class map, preprocessing, hash.

`load_model` checks everything once, in the parent, before any image is read: a broken model
or a class map of the wrong length is a one-line configuration error, not a crash in the
middle of the night. It returns a small picklable `ModelSpec`; each process that scores
creates its own ONNX Runtime session from it (`create_session`), because sessions must never
be shared across processes.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from batchscore.errors import ModelError
from batchscore.exporters import HF_FILE, TIMM_FILE, exporter_config
from batchscore.labels import find_labels
from batchscore.onnx_files import final_op, model_sha256
from batchscore.preprocess import tensor_batch
from batchscore.preprocess_config import DEFAULT_PREPROCESS, PreprocessConfig, resolve_preprocess

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


@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to build a session and read its output (picklable)."""

    path: str
    sha256: str
    class_names: tuple[str, ...]
    preprocess: PreprocessConfig
    input_name: str
    input_dtype: str
    fixed_batch: int | None
    providers: tuple[str, ...]
    layout: str = "NCHW"
    channels: int = 3
    output_name: str = ""  # the output read as the class scores
    # One of settings.HEADS: "softmax" one score per class; "multi-label" one probability per
    # class; "binary" one output for two classes (index 1 positive); "embedding" a vector.
    head: str = "softmax"
    thresholds: tuple[float, ...] = ()  # a multi-label head's, one per class
    embedding_size: int = 0
    # What batchscore read or assumed about the model beyond its files (kept in the output's
    # metadata); lines starting with "assumed" are also shown as warnings.
    notes: tuple[str, ...] = ()
    preprocess_sources: tuple[tuple[str, str], ...] = ()  # (key, where its value came from)
    labels_from: str = ""  # where the class names came from

    @functools.cached_property
    def setup_sha256(self) -> str:
        """The identity of what a score depends on: the model (`sha256`), its class names,
        the output it is read from and the resolved preprocessing. A fixed label file or a
        changed config is a new setup, and an incremental run scores again under it."""
        setup = {
            "model_sha256": self.sha256,
            "class_names": list(self.class_names),
            "output_name": self.output_name,
            "preprocess": self.preprocess.identity(),
        }
        if self.head in ("multi-label", "embedding"):  # softmax and binary ids predate heads
            setup["head"] = self.head
        return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def output_width(self) -> int:
        """How many numbers the model gives per image: one for a binary head."""
        if self.head == "embedding":
            return self.embedding_size
        return 1 if self.head == "binary" else self.num_classes

    @property
    def score_width(self) -> int:
        """How many numbers batchscore writes per image: the probabilities, or the vector."""
        return self.embedding_size if self.head == "embedding" else self.num_classes

    @property
    def file_name(self) -> str:
        return Path(self.path).name


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


def resolve_head(
    spec: ModelSpec,
    outputs: np.ndarray,
    *,
    final: str | None,
    given: Mapping[str, str],
    notes: list[str],
    exported: bool = False,
) -> tuple[ModelSpec, dict[str, str]]:
    """What the model's output is and whether it still needs its activation, and where each
    was read: the config's "head" and "output" (`given` says where they were set), else the
    graph (a final Softmax or Sigmoid; one output number is a binary head), else the test
    `outputs` (probability vectors; values outside [0, 1] are no probabilities). What none of
    them tells is asked for in one line."""
    config = spec.preprocess
    width = outputs.shape[1]
    ends_in = final if final in ("Softmax", "Sigmoid") else None
    head = config.head or ("embedding" if spec.head == "embedding" else None)
    head_from = given.get("head", "")
    if head is None:
        if spec.head == "binary":
            head, head_from = "binary", "one output number for two class names"
        elif ends_in == "Sigmoid":
            head, head_from = "multi-label", "the graph ends in Sigmoid"
        elif ends_in == "Softmax":
            head, head_from = "softmax", "the graph ends in Softmax"
        else:
            head, head_from = "softmax", WIDTH_ONLY
    _check_head(spec, head, width, ends_in, head_from)
    _check_head_keys(spec, head, head_from, given)
    if head == "embedding":
        return _embedding_head(spec, width, notes), {"head": head_from or "--head"}
    if "output" in given:
        kind, kind_from = config.output, given["output"]
    elif ends_in is not None:
        kind, kind_from = "probabilities", f"the graph ends in {ends_in}"
    elif not bool(((outputs >= -1e-6) & (outputs <= 1 + 1e-6)).all()):
        kind, kind_from = "logits", "the test outputs leave [0, 1]"
    elif head == "softmax":
        sums_to_one = bool(np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3))
        kind = "probabilities" if sums_to_one else "logits"
        kind_from = (
            "detected: the model's outputs are probability vectors"
            if sums_to_one
            else "the test outputs are not probability vectors"
        )
    else:  # values in [0, 1] and no activation the graph shows: could be either
        raise ModelError(
            f"model {Path(spec.path).name} has a {head} head whose outputs all lie in [0, 1]"
            ' but whose graph ends in no Sigmoid: set "output": "probabilities" or "logits" in'
            " preprocess.json"
        )
    spec = replace(spec, head=head, preprocess=replace(config, output=kind))
    if head == "multi-label":
        spec = replace(spec, thresholds=_thresholds(spec))
    notes.append(f"head: {describe_head(spec)} ({head_from}; output {kind}: {kind_from})")
    if head_from == WIDTH_ONLY and kind == "logits" and "output" not in given and not exported:
        notes.append(  # logits of a BCEWithLogitsLoss model look the same: say so
            f"assumed: model {Path(spec.path).name} ends in no Softmax or Sigmoid and nothing"
            " says how it was trained: its logits are read as one class per image (softmax);"
            ' if it is multi-label, pass --head multi-label; if not, "head": "softmax" in'
            " preprocess.json says so"
        )
    return spec, {"head": head_from, "output": kind_from}


WIDTH_ONLY = "one output number per class name"  # a softmax head read from nothing else


def _check_head(spec: ModelSpec, head: str, width: int, ends_in: str | None, why: str) -> None:
    """A head the config names must fit the graph: one line naming both when it does not."""
    name = Path(spec.path).name
    if head == "binary" and width != 1:
        raise ModelError(
            f"model {name}: head binary ({why}) reads one output number, but output"
            f" {spec.output_name!r} has {width}; two scores for two classes are --head softmax"
        )
    if head in ("softmax", "multi-label") and width == 1:
        raise ModelError(
            f"model {name}: head {head} ({why}) but output {spec.output_name!r} is one number:"
            " a binary head (--head binary, with two class names)"
        )
    clash = {"softmax": "Sigmoid", "multi-label": "Softmax"}.get(head)
    if clash is not None and ends_in == clash:
        makes = "a probability per class (multi-label)" if clash == "Sigmoid" else "one vector"
        raise ModelError(
            f"model {name}: head {head} ({why}) but the graph ends in {clash}, which makes"
            f" {makes}: fix the head, or drop it to read the graph's"
        )


# The keys only some heads read: given for another head, they would be silently ignored.
HEAD_KEYS = {
    "threshold": ("multi-label", "binary"),
    "thresholds": ("multi-label",),
    "l2_normalize": ("embedding",),
}


def _check_head_keys(spec: ModelSpec, head: str, why: str, given: Mapping[str, str]) -> None:
    """A threshold for a softmax head (a BCE model whose head was not given, say) or an
    L2 norm for a classifier is refused, naming the head and how it was read."""
    for key, heads in HEAD_KEYS.items():
        value, default = getattr(spec.preprocess, key), DEFAULT_PREPROCESS[key]
        said = given.get(key) == "command line" or value not in (default, ())
        if key in given and said and head not in heads:
            raise ModelError(
                f"{key} ({given[key]}) applies to {_a(' or '.join(heads))} head, but model"
                f" {Path(spec.path).name} has {_a(head)} head ({why})"
                + (": if it is multi-label, pass --head multi-label" if head == "softmax" else "")
            )


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _embedding_head(spec: ModelSpec, width: int, notes: list[str]) -> ModelSpec:
    spec = replace(spec, head="embedding", embedding_size=width)
    notes.append(f"head: {describe_head(spec)}")
    return spec


def _thresholds(spec: ModelSpec) -> tuple[float, ...]:
    """One threshold per class: "thresholds" by name over "threshold"; an unknown name is a
    typo that would silently leave its class at the default, so it is refused."""
    given = dict(spec.preprocess.thresholds)
    unknown = sorted(set(given) - set(spec.class_names))
    if unknown:
        raise ModelError(
            f"thresholds name classes the class map does not have: {unknown[:5]}"
            f" (the class map: {list(spec.class_names[:5])}...)"
        )
    return tuple(given.get(name, spec.preprocess.threshold) for name in spec.class_names)


def describe_head(spec: ModelSpec) -> str:
    """One line on what the head gives and what batchscore writes from it."""
    logit = spec.preprocess.output == "logits"
    if spec.head == "binary":
        return (
            f"binary, one output read as the {'logit' if logit else 'probability'} of"
            f" {spec.class_names[1]!r} (class index 1); probs are [1 - p, p]; pred_label is"
            f" {spec.class_names[1]!r} when p >= {spec.preprocess.threshold:g}"
        )
    if spec.head == "multi-label":
        cut = sorted(set(spec.thresholds))
        shown = f"{cut[0]:g}" if len(cut) == 1 else f"{cut[0]:g} to {cut[-1]:g} by class"
        return (
            f"multi-label, {spec.num_classes} classes each its own probability"
            f"{' (sigmoid of its logit)' if logit else ''}; pred_labels are those >= {shown}"
        )
    if spec.head == "embedding":
        norm = ", L2-normalised" if spec.preprocess.l2_normalize else ""
        return f"embedding, a vector of {spec.embedding_size} numbers per image{norm}"
    return (
        f"softmax, one class of {spec.num_classes}"
        f"{' (softmax of the logits)' if logit else ' (already probabilities)'}"
    )


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
