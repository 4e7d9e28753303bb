"""One chunk of images in, one model's scores out: the work every engine (and quantize) shares.

A `Scorer` holds one ONNX Runtime session per model and decodes each image once per distinct
preprocessing. It returns probabilities and top-k indices only, never pixels, so an engine can
run it in a worker process and send back 4 bytes per class per image.

What a decoder prints is not the user's business at 3 a.m.: Pillow's Python warnings and the
C libraries' messages on file descriptor 2 (libtiff writes there) are caught around each image
and land in that image's `warning` column, never on the terminal or in cron mail.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from itertools import islice

import numpy as np
import onnxruntime as ort

from batchscore.model import create_session, first_line, run_model
from batchscore.preprocess import ImageError, ImageStats, image_stats, load_image, tensor_batch
from batchscore.preprocess_config import PreprocessConfig
from batchscore.settings import PipelineOptions
from batchscore.sources import ImageRef
from batchscore.spec import ModelSpec

WORKER_DIED = "worker process died while decoding or scoring this image (crash or out-of-memory)"


NOT_FINITE = "model output is not finite (NaN or Inf)"
ZERO_VECTOR = "model output is all zeros: an embedding of no length cannot be L2-normalised"


@dataclass
class ModelScores:
    """One model's scores for a chunk: rows of error images are all zero."""

    probs: np.ndarray  # [n, classes] float32; an embedding head's vectors [n, size]
    topk: np.ndarray  # [n, k] int32, best first ([n, 0] for an embedding)


@dataclass
class ChunkOutput:
    """What a worker sends back for a chunk (no pixels, no manifest fields)."""

    errors: list[str | None]
    widths: list[int | None]
    heights: list[int | None]
    scores: list[ModelScores]
    warnings: list[str | None]
    stats: list[ImageStats | None]  # of the first preprocessing's decode, for monitoring


@dataclass
class ChunkResult:
    """A chunk's refs with their outputs, handed to the writer in input order."""

    refs: list[ImageRef]
    output: ChunkOutput
    finished_at: datetime


# (path, problem, bytes already read from an object store) per image
Task = list[tuple[str | None, str | None, bytes | None]]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probs: np.ndarray = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
    return probs


def top_k_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values per row, best first; ties keep class-map order."""
    order: np.ndarray = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return order.astype(np.int32)


class Scorer:
    """Per-process state: one session per model and reusable batch buffers."""

    def __init__(self, specs: Sequence[ModelSpec], options: PipelineOptions) -> None:
        self.specs = list(specs)
        self.options = options
        self.sessions = [create_session(spec, options.threads_per_worker) for spec in specs]
        self.configs = list(dict.fromkeys(spec.preprocess for spec in specs))

    def score(self, task: Task) -> ChunkOutput:
        n = len(task)
        errors: list[str | None] = [problem for _, problem, _ in task]
        widths: list[int | None] = [None] * n
        heights: list[int | None] = [None] * n
        notes: list[list[str]] = [[] for _ in range(n)]
        stats: list[ImageStats | None] = [None] * n
        pixels: dict[PreprocessConfig, list[np.ndarray | None]] = {}
        for config in self.configs:  # decode once per distinct preprocessing, not per model
            pixels[config] = [None] * n
            for i, (path, _, data) in enumerate(task):
                if errors[i] is not None or path is None:
                    continue
                with c_stderr_into(notes[i]):
                    try:
                        decoded = load_image(
                            path,
                            config,
                            max_pixels=self.options.max_pixels,
                            fast_jpeg=self.options.fast_jpeg,
                            data=data,
                        )
                    except ImageError as exc:
                        errors[i] = str(exc)
                        continue
                notes[i] += decoded.warnings
                pixels[config][i] = decoded.pixels
                widths[i], heights[i] = decoded.width, decoded.height
                if stats[i] is None:
                    stats[i] = image_stats(decoded)
        all_probs = [
            self._infer(spec, session, pixels[spec.preprocess], errors)
            for spec, session in zip(self.specs, self.sessions, strict=True)
        ]
        for i, error in enumerate(errors):
            if error is not None:  # also clears scores of an image a later model rejected
                widths[i] = heights[i] = stats[i] = None
                for probs in all_probs:
                    probs[i] = 0.0
        scores = [
            ModelScores(probs=probs, topk=ranked(spec, probs, self.options.top_k))
            for spec, probs in zip(self.specs, all_probs, strict=True)
        ]
        warnings = [
            "; ".join(dict.fromkeys(found)) if found and error is None else None
            for found, error in zip(notes, errors, strict=True)
        ]
        return ChunkOutput(errors, widths, heights, scores, warnings, stats)

    def _infer(
        self,
        spec: ModelSpec,
        session: ort.InferenceSession,
        images: list[np.ndarray | None],
        errors: list[str | None],
    ) -> np.ndarray:
        probs = np.zeros((len(images), spec.score_width), dtype=np.float32)
        ok = [i for i, image in enumerate(images) if image is not None and errors[i] is None]
        if not ok:
            return probs
        pixels = [images[i] for i in ok]
        batch = tensor_batch(
            pixels,  # type: ignore[arg-type]
            spec.preprocess,
            spec.input_dtype,
            layout=spec.layout,
            channels=spec.channels,
        )
        try:
            outputs = run_model(spec, session, batch)
        except Exception:  # isolate the image ORT rejects instead of failing the chunk
            outputs = np.zeros((len(ok), spec.output_width), dtype=np.float32)
            for row, i in enumerate(ok):
                try:
                    outputs[row] = run_model(spec, session, batch[row : row + 1])[0]
                except Exception as exc:
                    errors[i] = f"inference failed: {first_line(exc)}"
        finite = np.isfinite(outputs).all(axis=1)
        # an all-zero vector has no direction to L2-normalise to
        empty = np.all(outputs == 0, axis=1) & spec.preprocess.l2_normalize
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            probs[ok] = probabilities(spec, outputs)
        for i, good, nothing in zip(ok, finite.tolist(), empty.tolist(), strict=True):
            if errors[i] is None and not good:  # an fp16 overflow, a NaN weight: no prediction
                errors[i] = NOT_FINITE
            elif errors[i] is None and nothing:
                errors[i] = ZERO_VECTOR
        return probs


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x), without overflow for large negative logits."""
    probs: np.ndarray = np.exp(-np.logaddexp(0.0, -logits.astype(np.float64)))
    return probs


def ranked(spec: ModelSpec, probs: np.ndarray, k: int) -> np.ndarray:
    """The top classes of each row, best first. A binary head's first is its decision: the
    positive class (index 1) when p >= its threshold, whatever 1 - p is."""
    if spec.head != "binary":
        return top_k_indices(probs, top_k(spec, k))
    positive = probs[:, 1] >= spec.preprocess.threshold
    order = np.where(positive[:, None], [1, 0], [0, 1]).astype(np.int32)
    return order[:, : top_k(spec, k)]


def top_k(spec: ModelSpec, k: int) -> int:
    """How many top classes a model's rows keep: none for an embedding."""
    return 0 if spec.head == "embedding" else min(k, spec.num_classes)


def probabilities(spec: ModelSpec, outputs: np.ndarray) -> np.ndarray:
    """What is written for the model's raw outputs, by its head: softmax of logits; for a
    multi-label head, each logit through the sigmoid; for a binary head, [1 - p, p] with p its
    probability (a logit through the sigmoid); for an embedding, the vector (L2-normalised
    when the config says). Probabilities a model gives are kept as they are."""
    logits = spec.preprocess.output == "logits"
    if spec.head == "embedding":
        if not spec.preprocess.l2_normalize:
            return outputs
        norms = np.linalg.norm(outputs.astype(np.float64), axis=1, keepdims=True)
        unit: np.ndarray = (outputs / norms).astype(np.float32)
        return unit
    if spec.head == "binary":
        positive = outputs[:, 0].astype(np.float64)
        if logits:
            positive = sigmoid(positive)
        return np.column_stack([1 - positive, positive]).astype(np.float32)
    if spec.head == "multi-label":
        return sigmoid(outputs).astype(np.float32) if logits else outputs
    return softmax(outputs) if logits else outputs


@contextmanager
def c_stderr_into(notes: list[str]) -> Iterator[None]:
    """Catch what C code writes to file descriptor 2 meanwhile, and add it to `notes`.

    The descriptor points at an anonymous temporary file for the duration and is restored
    after, so a decoder's message lands in its image's row, not on the terminal."""
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read(4096).decode("utf-8", "replace")
            notes += [line.strip() for line in text.splitlines() if line.strip()]


def failed_output(n: int, reason: str, specs: Sequence[ModelSpec], k: int) -> ChunkOutput:
    return ChunkOutput(
        errors=[reason] * n,
        widths=[None] * n,
        heights=[None] * n,
        warnings=[None] * n,
        stats=[None] * n,
        scores=[
            ModelScores(
                probs=np.zeros((n, spec.score_width), dtype=np.float32),
                topk=np.zeros((n, top_k(spec, k)), dtype=np.int32),
            )
            for spec in specs
        ],
    )


def concat_outputs(parts: list[ChunkOutput]) -> ChunkOutput:
    n_models = len(parts[0].scores)
    return ChunkOutput(
        errors=[e for p in parts for e in p.errors],
        widths=[w for p in parts for w in p.widths],
        heights=[h for p in parts for h in p.heights],
        warnings=[w for p in parts for w in p.warnings],
        stats=[s for p in parts for s in p.stats],
        scores=[
            ModelScores(
                probs=np.concatenate([p.scores[m].probs for p in parts]),
                topk=np.concatenate([p.scores[m].topk for p in parts]),
            )
            for m in range(n_models)
        ],
    )


def task_of(refs: Sequence[ImageRef]) -> Task:
    """What a worker needs of each ref: its path (and bytes, when fetched), or the reason it
    has none."""
    return [(ref.path, ref.problem, ref.data) for ref in refs]


def chunk_refs(refs: Iterable[ImageRef], size: int) -> Iterator[list[ImageRef]]:
    """Consecutive lists of `size` refs (the last one shorter), read lazily."""
    iterator = iter(refs)
    while chunk := list(islice(iterator, size)):
        yield chunk


def one_at_a_time(
    refs: Sequence[ImageRef],
    score_one: Callable[[ImageRef], ChunkOutput],
    worker_died: type[BaseException],
    specs: Sequence[ModelSpec],
    k: int,
) -> ChunkOutput:
    """Score refs one task each after a worker died on their chunk, so that only an image that
    kills its (fresh) worker again is lost, as a WORKER_DIED error row. Both engines use it:
    `score_one` submits one image and waits; `worker_died` is how the engine reports a death
    (and `score_one` replaces whatever the death broke before it raises again)."""
    parts = []
    for ref in refs:
        try:
            parts.append(score_one(ref))
        except worker_died:
            parts.append(failed_output(1, WORKER_DIED, specs, k))
    return concat_outputs(parts)
