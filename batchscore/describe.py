"""What batchscore will do with a model, before it scores anything: `batchscore inspect`.

Everything here is what `load_model` resolved (the same checks a run makes), plus the graph's
inputs and outputs as ONNX Runtime reports them and the time of one forward pass.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from batchscore.heads import HEAD_KEYS, describe_head
from batchscore.model import create_session, load_model, run_model
from batchscore.preprocess import tensor_batch

SHOWN_LABELS = 5
# What turns each head's raw outputs into what is written, when the model gives logits
ACTIVATIONS = {
    "softmax": "softmax",
    "multi-label": "sigmoid",
    "binary": "sigmoid",
    "embedding": None,
}
TIMED_RUNS = 5


def describe_model(location: str | Path | None = None, **load_options: Any) -> dict[str, Any]:
    """The model as batchscore sees it: tensors, preprocessing and where each value came from,
    class names, softmax, identity, and the median time of a forward pass of one image."""
    spec = load_model(location, **load_options)
    session = create_session(spec)
    height, width = spec.preprocess.input_size
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    batch = tensor_batch(
        [image], spec.preprocess, spec.input_dtype, layout=spec.layout, channels=spec.channels
    )
    run_model(spec, session, batch)  # warm-up
    times = []
    for _ in range(TIMED_RUNS):
        started = time.perf_counter()
        run_model(spec, session, batch)
        times.append(time.perf_counter() - started)
    sources = dict(spec.preprocess_sources)
    preprocess = spec.preprocess.to_dict()
    preprocess["head"] = spec.head
    for key, heads in HEAD_KEYS.items():
        if spec.head not in heads:
            del preprocess[key]  # what does not apply to this head
    if spec.head == "embedding":
        del preprocess["output"]  # a vector has no softmax or sigmoid to apply
    if spec.head == "multi-label":
        preprocess["thresholds"] = dict(zip(spec.class_names, spec.thresholds, strict=True))
    if spec.preprocess.layout is None:
        preprocess["layout"] = spec.layout
        sources["layout"] = "the model's input shape"
    activation = ACTIVATIONS[spec.head]
    return {
        "model": spec.path,
        "model_sha256": spec.sha256,
        "inputs": [_tensor(t) for t in session.get_inputs()],
        "outputs": [_tensor(t) for t in session.get_outputs()],
        "scores_output": spec.output_name,
        "head": {
            "kind": spec.head,
            "what": describe_head(spec),
            "why": sources.get("head", "default"),
        },
        "layout": spec.layout,
        "channels": spec.channels,
        "input_dtype": spec.input_dtype,
        "fixed_batch": spec.fixed_batch,
        "preprocess": {
            key: {"value": value, "from": sources.get(key, "default")}
            for key, value in preprocess.items()
        },
        "classes": {
            "count": spec.num_classes,
            "first": list(spec.class_names[:SHOWN_LABELS]),
            "from": spec.labels_from,
        },
        "activation": {
            "name": activation,
            "applied": activation is not None and spec.preprocess.output == "logits",
            "why": (
                "an embedding is written as the model gives it"
                if activation is None
                else _activation_reason(sources.get("output", "default"), spec.preprocess.output)
            ),
        },
        "notes": list(spec.notes),
        "forward_ms_one_image": statistics.median(times) * 1e3,
    }


def _activation_reason(source: str, output: str) -> str:
    if source.startswith(("detected", "the ")):
        return source
    return f"{source} says the outputs are {output}"


def _tensor(arg: Any) -> dict[str, Any]:
    return {"name": arg.name, "shape": list(arg.shape), "type": arg.type}


def format_description(described: dict[str, Any]) -> str:
    """The description as text for a terminal, one fact per line."""
    lines = [
        f"model      {described['model']}",
        f"sha256     {described['model_sha256']}",
    ]
    for kind in ("inputs", "outputs"):
        for tensor in described[kind]:
            lines.append(f"{kind[:-1]:<10} {tensor['name']} {tensor['shape']} {tensor['type']}")
    lines += [
        f"scores     output {described['scores_output']!r}",
        f"head       {described['head']['what']} ({described['head']['why']})",
        f"tensor     {described['layout']}, {described['channels']} channel(s),"
        f" {described['input_dtype']}, batch {described['fixed_batch'] or 'any'}",
        "preprocess",
    ]
    for key, item in described["preprocess"].items():
        lines.append(f"  {key:<16} {item['value']!s:<28} from {item['from']}")
    classes = described["classes"]
    lines += [
        f"classes    {classes['count']} from {classes['from']}: "
        + ", ".join(classes["first"])
        + (", ..." if classes["count"] > len(classes["first"]) else "")
        if classes["count"]
        else f"classes    {classes['from']}",
        f"{described['activation']['name'] or 'activation':<10}"
        f" {'applied' if described['activation']['applied'] else 'not applied'}"
        f" ({described['activation']['why']})",
        f"forward    {described['forward_ms_one_image']:.2f} ms for one image (median of"
        f" {TIMED_RUNS})",
    ]
    lines += [f"note       {note}" for note in described["notes"] if not note.startswith("labels:")]
    return "\n".join(lines)
