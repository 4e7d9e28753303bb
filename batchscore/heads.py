"""What a model's output is, and how it becomes rows: its head (docs/own-models.md, "Heads").

softmax: one class of many; multi-label: each class its own probability; binary: one output
number for two classes; embedding: a vector, no classes. `resolve_head` reads the head and
whether the output still needs its softmax or sigmoid from the config where it says, else from
the graph, else from the test outputs, and refuses in one line what none of them tells.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from batchscore.errors import ModelError
from batchscore.preprocess_config import DEFAULT_PREPROCESS

if TYPE_CHECKING:
    from batchscore.spec import ModelSpec


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
    head = config.head  # the loader read an embedding's output by this too
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
        return _embedding_head(spec, width, notes), {"head": head_from}
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
