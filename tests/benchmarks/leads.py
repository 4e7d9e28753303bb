"""Checks of the design's measured leads, one process at a time (docs/performance.md, "Why").

Each line prints a CPU cost measured here with time.process_time (median of `--repeats`),
so that the pipeline's choices rest on figures anyone can re-run (it waits for other
processes to leave the CPUs first, up to 30 s):

- JPEG draft decode against a full decode of a 12 MP photo, and what it changes in the tensor;
- normalising through a per-channel table into the batch buffer against numpy arithmetic;
- ONNX Runtime threads and batch size, and thread spinning;
- normalisation inside the ONNX graph (uint8 input) against float32 input;
- dynamic against static (QDQ) int8 quantization.

    python -m tests.benchmarks.leads --workdir /tmp/bench     # reuses bench.py's corpus
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from batchscore.model import bundled_model_dir, load_model
from batchscore.preprocess import load_image, tensor_batch
from batchscore.resize import draft_target
from tests.benchmarks.bench import CORPORA, make_corpus, wait_for_idle


def cpu_ms(func: Callable[[], object], repeats: int) -> float:
    """Median CPU milliseconds of one call (after one warm-up call)."""
    func()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        func()
        times.append((time.process_time() - start) * 1e3)
    return float(statistics.median(times))


def session(
    path: str, threads: int = 1, spinning: bool = False, default: bool = False
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not default:
        options.intra_op_num_threads = threads
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if spinning else "0"
        )
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def decode_leads(paths: Sequence[Path], repeats: int) -> None:
    spec = load_model()

    def full_decode(path: Path) -> Callable[[], object]:
        return lambda: Image.open(path).convert("RGB")

    def draft_decode(path: Path) -> Callable[[], object]:
        def decode() -> Image.Image:
            image = Image.open(path)
            side = draft_target(spec.preprocess, *image.size)  # what load_image asks for
            image.draft("RGB", (side, side))
            return image.convert("RGB")

        return decode

    full = [cpu_ms(full_decode(p), repeats) for p in paths]
    draft = [cpu_ms(draft_decode(p), repeats) for p in paths]
    diffs = [
        np.abs(
            load_image(str(p), spec.preprocess, fast_jpeg=True).pixels.astype(np.int16)
            - load_image(str(p), spec.preprocess, fast_jpeg=False).pixels
        ).mean()
        for p in paths
    ]
    print(
        f"12 MP JPEG decode, CPU ms/image: full {statistics.median(full):.1f},"
        f" draft {statistics.median(draft):.1f}; tensor mean abs difference draft vs full"
        f" (resize 256, crop 224): {statistics.mean(diffs):.2f}/255 ({len(paths)} images)"
    )
    image = load_image(str(paths[0]), spec.preprocess).pixels
    mean = np.asarray(spec.preprocess.mean, np.float32)
    std = np.asarray(spec.preprocess.std, np.float32)
    naive = cpu_ms(lambda: ((np.asarray(image, np.float32) / 255 - mean) / std).transpose(2, 0, 1)
                   .copy(), repeats * 20)  # fmt: skip
    table = cpu_ms(lambda: tensor_batch([image], spec.preprocess, spec.input_dtype), repeats * 20)
    print(
        f"normalise one 224x224 image, CPU ms: numpy arithmetic + transpose {naive:.2f},"
        f" per-channel table into the batch buffer {table:.2f}"
    )


def ort_leads(model: str, repeats: int) -> None:
    batch32 = np.random.default_rng(0).normal(0, 1, (32, 3, 224, 224)).astype(np.float32)
    rows = []
    for label, sess in (
        ("1 thread", session(model, 1)),
        ("2 threads", session(model, 2)),
        ("ORT default (2 threads, spinning)", session(model, default=True)),
    ):
        for size in (1, 8, 32):
            wait_for_idle(30)  # the 2-thread rows need the second core free
            x = batch32[:size]
            wall = []
            cpu = []
            for _ in range(repeats):
                w, c = time.perf_counter(), time.process_time()
                sess.run(None, {"input": x})
                wall.append((time.perf_counter() - w) * 1e3 / size)
                cpu.append((time.process_time() - c) * 1e3 / size)
            rows.append((label, size, statistics.median(cpu), statistics.median(wall)))
    print("ORT, fp32, per image:          batch   CPU ms   wall ms")
    for label, size, cpu_v, wall_v in rows:
        print(f"  {label:<34}{size:>4}{cpu_v:>9.1f}{wall_v:>10.1f}")
    burned = {}
    for spinning in (True, False):
        sess = session(model, 2, spinning=spinning)
        idle = []
        for _ in range(repeats):
            sess.run(None, {"input": batch32[:1]})
            start = time.process_time()
            time.sleep(0.05)  # what a worker does while its next chunk is decoded elsewhere
            idle.append((time.process_time() - start) / 0.05)
        burned[spinning] = statistics.median(idle)
    print(
        f"ORT 2 threads, CPU burned in the 50 ms after a run (share of one core): spinning on"
        f" {burned[True]:.0%}, off {burned[False]:.0%}"
    )


def uint8_lead(model: str, repeats: int) -> None:
    """Prepend (x/255 - mean)/std to the graph and feed uint8; compare with float32 input."""
    import onnx  # the optional extra
    from onnx import TensorProto, helper, numpy_helper

    spec = load_model()
    graph = onnx.load(model)
    mean = np.asarray(spec.preprocess.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.preprocess.std, np.float32).reshape(1, 3, 1, 1)
    nodes = [
        helper.make_node("Cast", ["raw"], ["raw_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["raw_f", "inv255"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["input"]),
    ]
    old_input = graph.graph.input[0]
    graph.graph.input.remove(old_input)
    graph.graph.input.insert(
        0, helper.make_tensor_value_info("raw", TensorProto.UINT8, ["batch", 3, 224, 224])
    )
    graph.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(1 / 255, np.float32), "inv255"),
            numpy_helper.from_array(mean, "mean"),
            numpy_helper.from_array(std, "std"),
        ]
    )
    for node in reversed(nodes):
        graph.graph.node.insert(0, node)
    with tempfile.TemporaryDirectory() as temp:
        path = str(Path(temp) / "uint8.onnx")
        onnx.save(graph, path)
        as_uint8 = session(path)
        as_float = session(model)
        pixels = np.random.default_rng(0).integers(0, 256, (8, 3, 224, 224), dtype=np.uint8)
        floats = ((pixels / 255 - mean) / std).astype(np.float32)
        u = cpu_ms(lambda: as_uint8.run(None, {"raw": pixels}), repeats)
        f = cpu_ms(lambda: as_float.run(None, {"input": floats}), repeats)
    print(
        f"normalisation in the graph, batch 8, 1 thread, CPU ms/image: uint8 input {u / 8:.2f},"
        f" float32 input {f / 8:.2f}; bytes fed per image {pixels[0].nbytes}"
        f" vs {floats[0].nbytes}"
    )


def quantization_lead(model: str, repeats: int) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    static = bundled_model_dir() / "model_int8.onnx"
    x = np.random.default_rng(0).normal(0, 1, (8, 3, 224, 224)).astype(np.float32)
    with tempfile.TemporaryDirectory() as temp:
        dynamic = str(Path(temp) / "dynamic.onnx")
        logging.disable(logging.WARNING)  # ORT's quantizer logs every tensor it skips
        try:
            quantize_dynamic(model, dynamic, weight_type=QuantType.QUInt8)
        finally:
            logging.disable(logging.NOTSET)
        results = {}
        for name, path in (("fp32", model), ("dynamic int8", dynamic), ("static QDQ", static)):
            run = session(str(path)).run
            results[name] = cpu_ms(lambda: run(None, {"input": x}), repeats) / 8  # noqa: B023
    print(
        "int8, batch 8, 1 thread, CPU ms/image: "
        + ", ".join(f"{name} {value:.1f}" for name, value in results.items())
        + f" (dynamic {results['dynamic int8'] / results['fp32']:.1f}x fp32's time,"
        f" static {results['fp32'] / results['static QDQ']:.2f}x faster than fp32)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, help="where bench.py keeps its corpus")
    parser.add_argument("--count", type=int, default=8, help="12 MP photos to decode")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    model = load_model().path
    wait_for_idle(30)
    with tempfile.TemporaryDirectory() as temp:
        root = (args.workdir or Path(temp)) / "corpus"
        paths = make_corpus(root, CORPORA["12mp-jpeg"], args.count)
        decode_leads(paths[: args.count], max(3, args.repeats // 3))
    ort_leads(model, args.repeats)
    uint8_lead(model, args.repeats)
    quantization_lead(model, args.repeats)


if __name__ == "__main__":
    main()
