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

from batchscore.model import create_session, load_model, run_model
from batchscore.preprocess import tensor_batch

SHOWN_LABELS = 5
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
    if spec.preprocess.layout is None:
        preprocess["layout"] = spec.layout
        sources["layout"] = "the model's input shape"
    softmax = spec.preprocess.output == "logits"
    head = (
        f"binary: one output, the {'logit' if softmax else 'probability'} of"
        f" {spec.class_names[1]!r} (class index 1); probs are [1 - p, p]"
        if spec.head == "binary"
        else f"softmax: one score per class, {spec.num_classes} classes"
    )
    return {
        "model": spec.path,
        "model_sha256": spec.sha256,
        "inputs": [_tensor(t) for t in session.get_inputs()],
        "outputs": [_tensor(t) for t in session.get_outputs()],
        "scores_output": spec.output_name,
        "head": {
            "kind": spec.head,
            "what": head,
            "why": (
                "one output number for two class names"
                if spec.head == "binary"
                else "one output number per class name"
            ),
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
        "softmax": {
            "applied": softmax,
            "why": _softmax_reason(sources.get("output", "default"), softmax),
        },
        "notes": list(spec.notes),
        "forward_ms_one_image": statistics.median(times) * 1e3,
    }


def _softmax_reason(source: str, softmax: bool) -> str:
    if source.startswith("detected"):
        return source
    return f"{source} says the outputs are {'logits' if softmax else 'probabilities'}"


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
        + (", ..." if classes["count"] > len(classes["first"]) else ""),
        f"{'sigmoid' if described['head']['kind'] == 'binary' else 'softmax':<10}"
        f" {'applied' if described['softmax']['applied'] else 'not applied'}"
        f" ({described['softmax']['why']})",
        f"forward    {described['forward_ms_one_image']:.2f} ms for one image (median of"
        f" {TIMED_RUNS})",
    ]
    lines += [f"note       {note}" for note in described["notes"] if not note.startswith("labels:")]
    return "\n".join(lines)
