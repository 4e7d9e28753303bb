"""Which files make up an ONNX model, read from the protobuf itself (no `onnx` package needed).

Recent exporters (torch.onnx with large models, `onnx.save(..., save_as_external_data=True)`)
keep the weights in files beside `model.onnx`, named in each initializer's `external_data`
`location` entry. New weights in those files leave `model.onnx` byte for byte the same, so a
model's identity must cover them too: `model_sha256` below.

The reader walks only the fields that can hold tensors: the graph's initializers and sparse
initializers, and node attributes (tensors and subgraphs, recursively).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from batchscore.errors import ModelError

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def _fields(data: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """(field number, wire type, value) of one protobuf message; LEN values as views."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == _LEN:
            size, pos = _varint(data, pos)
            if pos + size > end:
                raise ValueError("truncated field")
            yield number, wire, data[pos : pos + size]
            pos += size
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _messages(data: memoryview, *numbers: int) -> Iterator[memoryview]:
    for number, wire, value in _fields(data):
        if number in numbers and wire == _LEN and isinstance(value, memoryview):
            yield value


def _tensor_locations(tensor: memoryview) -> Iterator[str]:
    for entry in _messages(tensor, _TENSOR_EXTERNAL_DATA):
        fields = {n: v for n, _, v in _fields(entry) if isinstance(v, memoryview)}
        if bytes(fields.get(_ENTRY_KEY, b"")) == b"location":
            yield bytes(fields.get(_ENTRY_VALUE, b"")).decode("utf-8", "surrogateescape")


def _graph_locations(graph: memoryview) -> Iterator[str]:
    for tensor in _messages(graph, _GRAPH_INITIALIZER):
        yield from _tensor_locations(tensor)
    for sparse in _messages(graph, _GRAPH_SPARSE):
        for tensor in _messages(sparse, _SPARSE_VALUES, _SPARSE_INDICES):
            yield from _tensor_locations(tensor)
    for node in _messages(graph, _GRAPH_NODE):
        for attribute in _messages(node, _NODE_ATTRIBUTE):
            for tensor in _messages(attribute, _ATTR_T, _ATTR_TENSORS):
                yield from _tensor_locations(tensor)
            for subgraph in _messages(attribute, _ATTR_G, _ATTR_GRAPHS):
                yield from _graph_locations(subgraph)


_NODE_INPUT, _NODE_OUTPUT, _NODE_OP_TYPE = 1, 2, 4
# Operators that pass one input through unchanged in value: looked through to how a graph ends.
_PASS_THROUGH = frozenset({"Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze"})


def final_op(model_path: Path, output: str) -> str | None:
    """The operator that makes the graph output `output` (Sigmoid, Softmax, Gemm...), looking
    through reshapes and identities that exporters add (tf2onnx ends a Keras head in an
    Identity); None when the graph does not say."""
    try:
        graph = next(_messages(memoryview(model_path.read_bytes()), _MODEL_GRAPH), None)
        if graph is None:
            return None
        producers: dict[str, tuple[str, list[str]]] = {}
        for node in _messages(graph, _GRAPH_NODE):
            texts: dict[int, list[str]] = {_NODE_INPUT: [], _NODE_OUTPUT: [], _NODE_OP_TYPE: []}
            for number, _, value in _fields(node):
                if number in texts and isinstance(value, memoryview):
                    texts[number].append(bytes(value).decode("utf-8", "replace"))
            op = texts[_NODE_OP_TYPE][0] if texts[_NODE_OP_TYPE] else ""
            for name in texts[_NODE_OUTPUT]:
                producers[name] = (op, texts[_NODE_INPUT])
    except (OSError, ValueError):
        return None
    name = output
    for _ in range(len(producers) + 1):
        if name not in producers:
            return None
        op, inputs = producers[name]
        if op not in _PASS_THROUGH or not inputs:
            return op
        name = inputs[0]
    return None


def external_data_files(model_path: Path, graph_bytes: bytes) -> list[Path]:
    """The files beside the model that hold its external data, sorted, each listed once."""
    try:
        locations = {
            location
            for graph in _messages(memoryview(graph_bytes), _MODEL_GRAPH)
            for location in _graph_locations(graph)
        }
    except ValueError as exc:
        raise ModelError(f"model {model_path} is not a valid ONNX file: {exc}") from exc
    folder = model_path.parent
    files = []
    for location in sorted(locations):
        path = folder / location
        if os.path.isabs(location) or ".." in Path(location).parts or not path.is_file():
            raise ModelError(
                f"model {model_path} keeps weights in {location!r}, which is not a file beside it"
            )
        files.append(path)
    return files


def model_sha256(model_path: Path) -> str:
    """The model's identity.

    For a model in one file: the SHA-256 of its bytes (what `sha256sum model.onnx` prints).
    With external data: the SHA-256 of the graph file's bytes, then, for each data file in
    sorted order, its name and its bytes (a NUL byte before and after the name), streamed."""
    try:
        graph_bytes = model_path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model {model_path}: {exc.strerror or exc}") from exc
    files = external_data_files(model_path, graph_bytes)
    digest = hashlib.sha256(graph_bytes)
    for path in files:
        location = str(path.relative_to(model_path.parent))
        digest.update(b"\0" + location.encode("utf-8", "surrogateescape") + b"\0")
        try:
            with path.open("rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
        except OSError as exc:
            raise ModelError(f"cannot read model data {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def model_bytes(model_path: Path) -> int:
    """The model's size on disk: the graph file and every external-data file it names."""
    graph_bytes = model_path.read_bytes()
    files = external_data_files(model_path, graph_bytes)
    return len(graph_bytes) + sum(path.stat().st_size for path in files)
