"""Static INT8 quantization of a model, calibrated on real images through its own preprocessing.

Why static QDQ with per-channel weights: ONNX Runtime's *dynamic* quantization turns every Conv
into ConvInteger and quantizes activations at run time, which made these CNNs 2-4x slower than
fp32 on CPU. Static quantization fixes each activation's range offline, from calibration images,
so ORT fuses DequantizeLinear -> Conv -> QuantizeLinear into int8 QLinearConv kernels (about 2x
faster), and per-channel weight scales keep depthwise convolutions, whose channels differ by
orders of magnitude, accurate.

Int8 is only worth shipping when it agrees with fp32, so `quantize_model` measures that on
held-out images the calibration never saw (top-1 agreement, top-5 overlap, and both again on
the images where fp32 is confident), and times both models in the same run. `onnx` (and
`sympy`, for ORT's shape inference) are needed only here: they are imported on first use
(`pip install '.[quantize]'` from a checkout).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from batchscore import __version__
from batchscore.errors import ConfigError, ModelError
from batchscore.labels import CLASS_MAP_FILENAME
from batchscore.model import (
    PREPROCESS_FILENAME,
    create_session,
    first_line,
    load_model,
    run_model,
)
from batchscore.onnx_files import external_data_files, model_bytes
from batchscore.preprocess import ImageError, load_image, tensor_batch
from batchscore.scorer import probabilities, top_k_indices
from batchscore.settings import CALIBRATION_METHODS, QuantizeOptions
from batchscore.sources import iter_refs, open_sources
from batchscore.spec import ModelSpec

INT8_FILENAME = "model_int8.onnx"
REPORT_FILENAME = "model_int8.report.json"
CONFIDENT = 0.5  # fp32 top-1 probability from which an image counts as confident
TOP_K = 5
SPEED_BATCH = 8  # batchscore's default batch size, one thread: what a worker runs
INSTALL_HINT = "pip install '.[quantize]' from a batchscore checkout"


@dataclass(frozen=True)
class Agreement:
    """int8 against fp32 on a set of images (None when the set is empty)."""

    n: int
    top1: float | None
    top5_overlap: float | None


@dataclass(frozen=True)
class QuantizeReport:
    """What the int8 model costs and buys, measured against fp32 in one run."""

    fp32_model: str
    fp32_sha256: str
    int8_model: str
    int8_sha256: str
    fp32_bytes: int
    int8_bytes: int
    fp32_ms_per_image: float
    int8_ms_per_image: float
    speedup: float
    calibration_images: int
    calibration_sources: tuple[str, ...]
    holdout_images: int
    holdout_source: str  # "split" (from the calibration sources) or the held-out sources
    skipped_images: int
    agreement: Agreement
    confident: Agreement
    excluded_nodes: tuple[str, ...]
    method: str
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def size_ratio(self) -> float:
        return self.fp32_bytes / self.int8_bytes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["excluded_nodes"] = list(self.excluded_nodes)
        data["calibration_sources"] = list(self.calibration_sources)
        data["size_ratio"] = self.size_ratio
        data["confidence_threshold"] = CONFIDENT
        data["speed"] = (
            f"CPU ms per image, 1 thread, batch {SPEED_BATCH}, median of interleaved repeats"
        )
        return data

    def table(self) -> str:
        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        a, c = self.agreement, self.confident
        rows = [
            f"{'':<34}{'fp32':>10}{'int8':>10}",
            f"{'size (MB)':<34}{self.fp32_bytes / 1e6:>10.2f}{self.int8_bytes / 1e6:>10.2f}"
            f"   {self.size_ratio:.2f}x smaller",
            f"{f'inference (ms/img, 1 thread, batch {SPEED_BATCH})':<34}"
            f"{self.fp32_ms_per_image:>10.2f}{self.int8_ms_per_image:>10.2f}"
            f"   {self.speedup:.2f}x faster",
            f"calibration images: {self.calibration_images}; held-out images: "
            f"{self.holdout_images} ({self.holdout_source}); unreadable, skipped: "
            f"{self.skipped_images}",
            f"{'':<34}{'all':>10}{'confident':>10}",
            f"{'held-out images':<34}{a.n:>10}{c.n:>10}   (confident: fp32 top-1 >= {CONFIDENT})",
            f"{'top-1 agreement':<34}{pct(a.top1):>10}{pct(c.top1):>10}",
            f"{'top-5 overlap':<34}{pct(a.top5_overlap):>10}{pct(c.top5_overlap):>10}",
            f"kept in fp32: {', '.join(self.excluded_nodes) or 'none'}; calibration: {self.method}",
        ]
        return "\n".join(rows)


@dataclass(frozen=True)
class _Api:
    """The parts of onnx / onnxruntime.quantization used here (both need `onnx`)."""

    onnx: Any
    quantize_static: Any
    quant_pre_process: Any
    QuantFormat: Any
    QuantType: Any
    CalibrationMethod: Any


def _api() -> _Api:
    try:
        import onnx  # noqa: PLC0415
        from onnxruntime.quantization import (  # noqa: PLC0415
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(f"quantize needs the onnx package: {INSTALL_HINT} ({exc})") from exc
    if importlib.util.find_spec("sympy") is None:  # ORT's symbolic shape inference needs it
        raise ConfigError(f"quantize needs the sympy package: {INSTALL_HINT}")
    return _Api(onnx, quantize_static, quant_pre_process, QuantFormat, QuantType, CalibrationMethod)


class _Reader:
    """Feeds calibration batches to ORT's calibrator (duck-types CalibrationDataReader)."""

    def __init__(self, name: str, tensors: np.ndarray, batch: int, *, fixed: bool) -> None:
        if fixed:  # a fixed batch axis takes only full batches: wrap around the images
            full = -(-len(tensors) // batch) * batch
            tensors = np.resize(tensors, (full, *tensors.shape[1:]))
        self._batches = iter([tensors[i : i + batch] for i in range(0, len(tensors), batch)])
        self._name = name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._name: batch}


def check_options(options: QuantizeOptions) -> None:
    if options.calibration_count < 1 or options.holdout_count < 1:
        raise ConfigError("calibration and held-out counts must be at least 1")
    if options.method not in CALIBRATION_METHODS:
        raise ConfigError(f"calibration method must be one of {CALIBRATION_METHODS}")
    if options.speed_repeats < 1:
        raise ConfigError("speed repeats must be at least 1")


def quantize_model(
    model: str | Path | None,
    calibration: Sequence[str | Path],
    output_dir: str | Path,
    options: QuantizeOptions | None = None,
    holdout: Sequence[str | Path] = (),
) -> QuantizeReport:
    """Write OUT/model_int8.onnx (+ class map, preprocess.json, report) and return the report.

    Calibration images go through the model's own preprocessing (`load_image` and the
    normalisation table), exactly as `batchscore score` feeds it. Without `holdout` sources, a
    seeded shuffle of the calibration images is split: up to `holdout_count` (at most half)
    are held out, up to `calibration_count` of the rest calibrate.

    Raises ConfigError before writing anything when onnx is missing, a source or the model is
    unusable, or there are too few readable images.
    """
    options = options or QuantizeOptions()
    api, spec = _check_and_load(model, options)
    images = _decode_calibration_and_holdout(spec, calibration, holdout, options)
    out = Path(output_dir)
    target, excluded = _quantize_into(out, api, spec, images.calibration, options)
    measured = _measure(spec, target, images.holdout, options.speed_repeats)
    return _write_report(
        out,
        api=api,
        spec=spec,
        target=target,
        calibration=calibration,
        images=images,
        measured=measured,
        excluded=excluded,
        method=options.method,
    )


@dataclass(frozen=True)
class _Images:
    """The preprocessed calibration and held-out batches, with what the report says of them."""

    calibration: np.ndarray
    holdout: np.ndarray
    skipped: int
    holdout_source: str


@dataclass(frozen=True)
class _Measured:
    """The int8 model as `batchscore score` loads it, timed and compared against fp32."""

    int8: ModelSpec
    fp32_ms: float
    int8_ms: float
    speedup: float
    agreement: Agreement
    confident: Agreement


def _check_and_load(model: str | Path | None, options: QuantizeOptions) -> tuple[_Api, ModelSpec]:
    """Fail on bad options, a missing onnx or an unusable model before decoding any image."""
    check_options(options)
    api, spec = _api(), load_model(model)
    if spec.head == "embedding":
        raise ConfigError(
            "quantize measures int8 against fp32 by class agreement; an embedding model has no"
            " classes, and vector agreement (cosine) is not measured yet"
        )
    return api, spec


def _decode_calibration_and_holdout(
    spec: ModelSpec,
    calibration: Sequence[str | Path],
    holdout: Sequence[str | Path],
    options: QuantizeOptions,
) -> _Images:
    """Calibrate and measure on disjoint images: separate sources, or a seeded split of one."""
    rng = random.Random(options.seed)
    if holdout:
        calib_images, skipped_c = _decode(calibration, spec, options.calibration_count, rng)
        held_images, skipped_h = _decode(holdout, spec, options.holdout_count, rng)
        skipped = skipped_c + skipped_h
        holdout_source = ", ".join(str(h) for h in holdout)
    else:
        wanted = options.calibration_count + options.holdout_count
        images, skipped = _decode(calibration, spec, wanted, rng)
        n_held = min(options.holdout_count, len(images) // 2)
        held_images, calib_images = images[:n_held], images[n_held:]
        calib_images = calib_images[: options.calibration_count]
        holdout_source = "split"
    if not calib_images or not held_images:
        raise ConfigError(
            f"need readable images to calibrate ({len(calib_images)}) and to hold out"
            f" ({len(held_images)}); give more calibration images or a --holdout source"
        )
    return _Images(
        calibration=_tensors(spec, calib_images),
        holdout=_tensors(spec, held_images),
        skipped=skipped,
        holdout_source=holdout_source,
    )


def _quantize_into(
    out: Path, api: _Api, spec: ModelSpec, calib: np.ndarray, options: QuantizeOptions
) -> tuple[Path, tuple[str, ...]]:
    """Quantize in a temporary folder, so that a rejected graph leaves no int8 file in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / INT8_FILENAME
    with tempfile.TemporaryDirectory(prefix="batchscore-quantize-") as temp:
        prepared = Path(temp) / "prepared.onnx"
        quantized = Path(temp) / INT8_FILENAME
        try:
            _pre_process(api, _with_image_size(api.onnx.load(spec.path), spec), prepared)
            excluded = _excluded_nodes(api.onnx.load(str(prepared)), options)
            api.quantize_static(
                str(prepared),
                str(quantized),
                _Reader(
                    spec.input_name,
                    calib,
                    spec.fixed_batch or SPEED_BATCH,
                    fixed=spec.fixed_batch is not None,
                ),
                quant_format=api.QuantFormat.QDQ,
                per_channel=True,
                activation_type=api.QuantType.QUInt8,
                weight_type=api.QuantType.QInt8,
                nodes_to_exclude=list(excluded),
                calibrate_method=_method(api, options.method),
                calibration_providers=["CPUExecutionProvider"],
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        except ConfigError:
            raise
        except Exception as exc:  # ORT's quantizer raises untyped errors for graphs it rejects
            raise ModelError(f"cannot quantize {spec.path}: {first_line(exc)}") from exc
        _stamp(api, quantized, spec, options, excluded)
        _copy_beside(spec, out)
        shutil.move(str(quantized), target)
    return target, excluded


ORT_SHAPE_DUMP = "sym_shape_infer_temp.onnx"  # where ORT dumps a graph it could not infer


def _pre_process(api: _Api, model: Any, prepared: Path) -> None:
    """ORT's quantization pre-processing, leaving nothing behind: when its symbolic shape
    inference gives up, ORT dumps the graph (and its weights, under a random name) into the
    working directory before raising. What it dumped during this call is removed."""
    dump = Path(ORT_SHAPE_DUMP)
    dumped_before = dump.exists()
    try:
        api.quant_pre_process(model, str(prepared))
    except Exception:
        if not dumped_before and dump.is_file():
            with contextlib.suppress(ModelError, OSError):  # the error to report is ORT's
                for path in external_data_files(dump, dump.read_bytes()):
                    path.unlink()
            dump.unlink(missing_ok=True)
        raise


def _with_image_size(model: Any, spec: ModelSpec) -> Any:
    """The graph, its external data read in, its image axes fixed to the size batchscore feeds.

    ORT's pre-processing saves the graph again in a folder of its own, where external data is
    not found, and its symbolic shape inference gives up on symbolic height and width (both
    seen on torch's dynamo exports). The batch axis stays as it is."""
    height, width = spec.preprocess.input_size
    (tensor,) = (t for t in model.graph.input if t.name == spec.input_name)
    dims = tensor.type.tensor_type.shape.dim
    axes = (2, 3) if spec.layout == "NCHW" else (1, 2)
    for axis, size in zip(axes, (height, width), strict=True):
        dims[axis].dim_value = size
    return model


def _measure(spec: ModelSpec, target: Path, held: np.ndarray, repeats: int) -> _Measured:
    """Int8 is only worth shipping if it agrees with fp32 and runs faster: measure both."""
    int8 = load_model(target)  # the same checks `batchscore score --model` runs
    fp32_ms, int8_ms, speedup = _speed(spec, int8, held, repeats)
    agreement, confident = _agreement(spec, int8, held)
    return _Measured(int8, fp32_ms, int8_ms, speedup, agreement, confident)


def _write_report(
    out: Path,
    *,
    api: _Api,
    spec: ModelSpec,
    target: Path,
    calibration: Sequence[str | Path],
    images: _Images,
    measured: _Measured,
    excluded: tuple[str, ...],
    method: str,
) -> QuantizeReport:
    """Saved beside the int8 file, so whoever ships it sees what it costs and buys, and how."""
    report = QuantizeReport(
        fp32_model=_shown(Path(spec.path), out),
        fp32_sha256=spec.sha256,
        int8_model=_shown(target, out),
        int8_sha256=measured.int8.sha256,
        fp32_bytes=model_bytes(Path(spec.path)),
        int8_bytes=target.stat().st_size,
        fp32_ms_per_image=measured.fp32_ms,
        int8_ms_per_image=measured.int8_ms,
        speedup=measured.speedup,
        calibration_images=len(images.calibration),
        calibration_sources=tuple(str(c) for c in calibration),
        holdout_images=len(images.holdout),
        holdout_source=images.holdout_source,
        skipped_images=images.skipped,
        agreement=measured.agreement,
        confident=measured.confident,
        excluded_nodes=excluded,
        method=method,
        versions={
            "batchscore": __version__,
            "onnxruntime": ort.__version__,
            "onnx": str(api.onnx.__version__),
        },
    )
    (out / REPORT_FILENAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _shown(path: Path, out: Path) -> str:
    """A path as the report shows it: relative to the output folder when inside it."""
    try:
        return str(path.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path.resolve())


def _decode(
    sources: Sequence[str | Path], spec: ModelSpec, limit: int, rng: random.Random
) -> tuple[list[np.ndarray], int]:
    """Up to `limit` preprocessed images, from a seeded shuffle; also how many failed."""
    refs = list(iter_refs(open_sources(sources)))
    paths = [ref.path for ref in refs if ref.path and not ref.problem]
    rng.shuffle(paths)
    images: list[np.ndarray] = []
    skipped = len(refs) - len(paths)  # manifest rows without a usable path
    for path in paths:
        if len(images) == limit:
            break
        try:
            images.append(np.ascontiguousarray(load_image(path, spec.preprocess).pixels))
        except ImageError:
            skipped += 1
    return images, skipped


def _tensors(spec: ModelSpec, images: list[np.ndarray]) -> np.ndarray:
    """The batch `batchscore score` would feed."""
    return tensor_batch(
        images, spec.preprocess, spec.input_dtype, layout=spec.layout, channels=spec.channels
    )


def _method(api: _Api, name: str) -> Any:
    methods = {
        "minmax": api.CalibrationMethod.MinMax,
        "entropy": api.CalibrationMethod.Entropy,
        "percentile": api.CalibrationMethod.Percentile,
    }
    return methods[name]


def _excluded_nodes(model: Any, options: QuantizeOptions) -> tuple[str, ...]:
    """Node names to keep in fp32: the first conv, the classifier, and any named ones."""
    nodes = list(model.graph.node)
    names = {node.name for node in nodes}
    unknown = [name for name in options.exclude_nodes if name not in names]
    if unknown:
        convs = [n.name for n in nodes if n.op_type in ("Conv", "Gemm", "MatMul")]
        raise ConfigError(
            f"no node named {unknown} in the model; its Conv/Gemm/MatMul nodes are e.g."
            f" {convs[:3]} ... {convs[-2:]}"
        )
    excluded = list(options.exclude_nodes)
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    heads = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")] or convs
    if options.keep_first_conv and convs:
        excluded.append(convs[0])
    if options.keep_classifier and heads:
        excluded.append(heads[-1])
    return tuple(dict.fromkeys(excluded))


def _stamp(
    api: _Api, path: Path, spec: ModelSpec, options: QuantizeOptions, excluded: tuple[str, ...]
) -> None:
    """Provenance in the file itself: which fp32 model, how it was quantized."""
    model = api.onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key = "quantization"
    entry.value = json.dumps(
        {
            "from_sha256": spec.sha256,
            "format": "QDQ",
            "per_channel": True,
            "activations": "uint8",
            "weights": "int8",
            "calibration": options.method,
            "kept_fp32": list(excluded),
            "tool": f"batchscore {__version__} quantize, onnxruntime {ort.__version__}",
        }
    )
    api.onnx.save(model, str(path))


def _copy_beside(spec: ModelSpec, out: Path) -> None:
    """class_map.json and preprocess.json next to the int8 file, so `--model` finds them: the
    names and config as resolved for the fp32 model, wherever those came from."""
    (out / CLASS_MAP_FILENAME).write_text(json.dumps(list(spec.class_names), indent=2) + "\n")
    config = {**spec.preprocess.identity(), "head": spec.head}  # the head as read, said
    (out / PREPROCESS_FILENAME).write_text(json.dumps(config, indent=2) + "\n")


def _batches(tensors: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(tensors), SPEED_BATCH):
        yield tensors[start : start + SPEED_BATCH]


def _probs(spec: ModelSpec, session: ort.InferenceSession, tensors: np.ndarray) -> np.ndarray:
    outputs = [run_model(spec, session, batch) for batch in _batches(tensors)]
    return probabilities(spec, np.concatenate(outputs))


def _speed(
    fp32: ModelSpec, int8: ModelSpec, tensors: np.ndarray, repeats: int
) -> tuple[float, float, float]:
    """CPU ms per image of each model and their ratio, runs interleaved so that both see the
    same machine load; CPU time, not wall time, because the machine may be shared."""
    batch = np.resize(tensors, (SPEED_BATCH, *tensors.shape[1:]))  # repeats images if too few
    sessions = [create_session(fp32), create_session(int8)]
    for session, spec in zip(sessions, (fp32, int8), strict=True):
        run_model(spec, session, batch)  # warm-up
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for i, (session, spec) in enumerate(zip(sessions, (fp32, int8), strict=True)):
            start = time.process_time()
            run_model(spec, session, batch)
            times[i].append((time.process_time() - start) * 1e3 / SPEED_BATCH)
    ratios = [a / b for a, b in zip(times[0], times[1], strict=True) if b > 0]
    return (
        statistics.median(times[0]),
        statistics.median(times[1]),
        statistics.median(ratios) if ratios else float("nan"),
    )


def _agreement(
    fp32: ModelSpec, int8: ModelSpec, tensors: np.ndarray
) -> tuple[Agreement, Agreement]:
    """(all held-out images, those where fp32's top-1 probability >= CONFIDENT)."""
    reference = _probs(fp32, create_session(fp32), tensors)
    candidate = _probs(int8, create_session(int8), tensors)
    k = min(TOP_K, reference.shape[1])
    top_ref, top_new = top_k_indices(reference, k), top_k_indices(candidate, k)
    same_top1 = top_ref[:, 0] == top_new[:, 0]
    overlap = np.array(
        [len(set(a) & set(b)) / k for a, b in zip(top_ref.tolist(), top_new.tolist(), strict=True)]
    )
    confident = reference.max(axis=1) >= CONFIDENT
    return _summary(same_top1, overlap), _summary(same_top1[confident], overlap[confident])


def _summary(same_top1: np.ndarray, overlap: np.ndarray) -> Agreement:
    n = len(same_top1)
    if n == 0:
        return Agreement(n=0, top1=None, top5_overlap=None)
    return Agreement(n=n, top1=float(same_top1.mean()), top5_overlap=float(overlap.mean()))
