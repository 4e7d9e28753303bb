"""What a worker needs to know about a model: `ModelSpec`, made once by `batchscore.model`.

Small and picklable: each process that scores builds its own ONNX Runtime session from it, and
reads its output by its head (`batchscore.heads`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from batchscore.preprocess_config import PreprocessConfig


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
