"""Where a model's class names come from: the files exporters write, looked for in one order.

`--labels FILE` wins. Otherwise, beside the model: `class_map.json` (batchscore's own),
`labels.txt` (one name per line), a synset file (`n01440764 tench, Tinca tinca`), Keras'
`imagenet_class_index.json` and `class_indices.json` (`{name: index}`, what
`flow_from_directory` gives), a Hugging Face or timm `config.json` (`id2label`, `label_names`),
and last the ONNX file's metadata: `class_map` (JSON, batchscore's) or `character` (one name
per line, PaddleOCR/PaddleClas exports). The first found is used, and where the names
came from is recorded with the run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from batchscore.errors import ModelError

CLASS_MAP_FILENAME = "class_map.json"
LABEL_FILES = (
    CLASS_MAP_FILENAME,
    "labels.txt",
    "synset.txt",
    "synsets.txt",
    "synset_words.txt",
    "imagenet_class_index.json",
    "class_indices.json",
    "config.json",
)
_SYNSET = re.compile(r"^n\d{8}\s+(.+)$")


def parse_class_map(data: Any, where: str) -> tuple[str, ...]:
    """Accept a list of names, {name: index} or {"index": name}; indices must be 0..n-1."""
    if isinstance(data, list) and data and all(isinstance(name, str) for name in data):
        return tuple(data)
    if isinstance(data, dict) and data:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
            by_index = {int(index): str(name) for name, index in data.items()}
        elif all(isinstance(v, str) for v in data.values()) and all(
            str(k).lstrip("-").isdigit() for k in data
        ):
            by_index = {int(index): name for index, name in data.items()}
        else:
            by_index = {}
        if by_index and sorted(by_index) == list(range(len(by_index))):
            return tuple(by_index[i] for i in range(len(by_index)))
    raise ModelError(
        f'class map {where} must be a list of names, {{name: index}} or {{"index": name}}'
        " with indices 0..n-1"
    )


def read_labels(path: Path) -> tuple[str, ...] | None:
    """The class names in `path`, by its format; None for a `config.json` without labels."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read labels {path}: {exc}") from exc
    if path.suffix.lower() != ".json":
        lines = [line.strip() for line in text.splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        if not lines or any(not line for line in lines):
            raise ModelError(f"labels {path} must hold one non-empty name per line")
        synsets = [_SYNSET.match(line) for line in lines]
        if all(synsets):
            return tuple(match.group(1) for match in synsets if match)
        return tuple(lines)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"labels {path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and _is_keras_index(data):
        return parse_class_map({k: v[1] for k, v in data.items()}, str(path))
    for key in ("id2label", "label_names"):  # Hugging Face, timm
        if isinstance(data, dict) and key in data:
            return parse_class_map(data[key], f"{path} ({key})")
    if path.name == "config.json":
        return None  # an exporter's config without labels: look further
    return parse_class_map(data, str(path))


def _is_keras_index(data: dict[str, Any]) -> bool:
    """Keras' imagenet_class_index.json: {"0": ["n01440764", "tench"], ...}."""
    return all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)
        for v in data.values()
    )


def find_labels(
    folder: Path, explicit: Path | None, metadata: dict[str, str]
) -> tuple[tuple[str, ...], str]:
    """(class names, where they came from), by the order in this module's docstring."""
    if explicit is not None:
        names = read_labels(explicit)
        if names is None:
            raise ModelError(f"labels {explicit} holds no id2label or label_names")
        return names, f"--labels {explicit}"
    for name in LABEL_FILES:
        candidate = folder / name
        if candidate.is_file():
            names = read_labels(candidate)
            if names is not None:
                return names, name
    if "class_map" in metadata:
        try:
            data = json.loads(metadata["class_map"])
        except json.JSONDecodeError as exc:
            raise ModelError(f"model metadata 'class_map' is not valid JSON: {exc}") from exc
        return parse_class_map(data, "in model metadata"), "the model's metadata (class_map)"
    if metadata.get("character", "").strip():
        names = tuple(line.strip() for line in metadata["character"].splitlines() if line.strip())
        return names, "the model's metadata (character)"
    raise ModelError(
        f"no class names for the model in {folder}: looked for {', '.join(LABEL_FILES)} and"
        " 'class_map' or 'character' in its metadata; pass --labels FILE, or --head embedding if"
        " its output is a vector, not class scores"
    )
