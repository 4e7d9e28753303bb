"""Options shared by several commands, spelled the same way everywhere."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import click

from batchscore.settings import (
    DEFAULT_MAX_PIXELS,
    HEADS,
    INTERPOLATIONS,
    OUTPUT_KINDS,
    PipelineOptions,
    default_workers,
)

F = TypeVar("F", bound=Callable[..., Any])


def _numbers(text: str, kind: type, count: tuple[int, ...], name: str) -> list[Any]:
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        values = [kind(p.strip()) for p in parts]
    except ValueError:
        raise click.BadParameter(f"{name} must be {' or '.join(map(str, count))} numbers") from None
    if len(values) not in count:
        raise click.BadParameter(f"{name} must be {' or '.join(map(str, count))} numbers")
    return values


def parse_size(text: str | None) -> int | list[int] | None:
    """'256' -> 256 (shorter side), '320,320' or '320x320' -> [320, 320] (height, width)."""
    if text is None:
        return None
    values = _numbers(text, int, (1, 2), "size")
    return values[0] if len(values) == 1 else values


def parse_triple(text: str | None) -> list[float] | None:
    return None if text is None else _numbers(text, float, (3,), "mean/std")


def model_options(func: F) -> F:
    """--model and the checks and preprocessing overrides that go with it."""
    decorators = [
        click.option(
            "--model",
            type=click.Path(),
            default=None,
            help="Model directory (model_fp32.onnx, model.onnx, model_int8.onnx or its only"
            " .onnx file; class map and preprocessing beside it) or .onnx file. Default: the"
            " bundled EfficientNet-Lite0.",
        ),
        click.option(
            "--model-sha256",
            default=None,
            metavar="HEX",
            help="Refuse the model unless its SHA-256 starts with HEX.",
        ),
        click.option(
            "--labels",
            type=click.Path(dir_okay=False),
            default=None,
            help="Class names: labels.txt (one per line), a synset file, class_map.json,"
            " Keras imagenet_class_index.json or an exporter's config.json (id2label,"
            " label_names). Default: the first of those found beside the model.",
        ),
        click.option(
            "--output-name",
            default=None,
            metavar="NAME",
            help="The model output to read (default: the only one; else the one the class map"
            " fits, or for an embedding the only one with one vector per image).",
        ),
        click.option(
            "--providers",
            default=None,
            help="Comma-separated ONNX Runtime execution providers (default: CPU).",
        ),
        click.option("--resize-size", default=None, help="Override: '256' or 'H,W'."),
        click.option("--crop-size", default=None, help="Override: '224' or 'H,W'."),
        click.option(
            "--interpolation",
            type=click.Choice(sorted(INTERPOLATIONS)),
            default=None,
            help="Override the resize interpolation.",
        ),
        click.option("--mean", default=None, help="Override: 'R,G,B' on the 0-1 scale."),
        click.option("--std", default=None, help="Override: 'R,G,B' on the 0-1 scale."),
        click.option(
            "--head",
            type=click.Choice(HEADS),
            default=None,
            help="What the output is (default: read from the graph; docs/own-models.md).",
        ),
        click.option(
            "--model-output",
            type=click.Choice(OUTPUT_KINDS),
            default=None,
            help="Whether the output still needs its softmax or sigmoid (default: detected).",
        ),
        click.option(
            "--threshold",
            type=click.FloatRange(0, 1),
            default=None,
            help="Multi-label: a class is in pred_labels at or above this (default 0.5).",
        ),
        click.option(
            "--thresholds",
            type=click.Path(dir_okay=False),
            default=None,
            help='Multi-label: a JSON file {"class name": threshold} over --threshold.',
        ),
        click.option(
            "--l2-normalize",
            is_flag=True,
            default=None,
            help="Embedding: scale each vector to unit length.",
        ),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


# Every command that reads or writes a bucket takes it the same way.
storage_option_flag = click.option(
    "--storage-option",
    "storage_option",
    multiple=True,
    metavar="KEY=VALUE",
    help="Passed to the object store's client for s3://, gs://, az:// URLs, e.g."
    " endpoint_url=http://minio:9000 (repeatable; docs/object-storage.md).",
)


def pipeline_options(func: F) -> F:
    decorators = [
        click.option(
            "--workers",
            type=click.IntRange(min=0),
            default=default_workers(),
            show_default=True,
            help="Worker processes (each decodes and scores); 0 scores in this process.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=PipelineOptions().batch_size,
            show_default=True,
            help="Images per inference batch (per worker).",
        ),
        click.option(
            "--top-k",
            type=click.IntRange(min=1),
            default=PipelineOptions().top_k,
            show_default=True,
            help="How many top classes to keep per image.",
        ),
        click.option(
            "--fast-jpeg/--exact-jpeg",
            default=True,
            show_default=True,
            help="Decode JPEGs at reduced size (DCT scaling) when that is still >= the"
            " resize target; --exact-jpeg decodes at full size.",
        ),
        click.option(
            "--max-pixels",
            type=click.IntRange(min=1),
            default=DEFAULT_MAX_PIXELS,
            show_default=True,
            help="Images with more pixels become error rows (decompression-bomb guard).",
        ),
        storage_option_flag,
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


# The `model_options` that override a key of the model's config (batchscore.preprocess_config)
PREPROCESS_FLAGS = (
    "resize_size",
    "crop_size",
    "interpolation",
    "mean",
    "std",
    "head",
    "model_output",
    "threshold",
    "thresholds",
    "l2_normalize",
)


def preprocess_overrides(values: Mapping[str, Any]) -> dict[str, Any]:
    """The config keys the flags in `values` set (one per `PREPROCESS_FLAGS` name)."""
    overrides = {
        "resize_size": parse_size(values["resize_size"]),
        "crop_size": parse_size(values["crop_size"]),
        "interpolation": values["interpolation"],
        "mean": parse_triple(values["mean"]),
        "std": parse_triple(values["std"]),
        "head": values["head"],
        "output": values["model_output"],
        "threshold": values["threshold"],
        "thresholds": _read_thresholds(values["thresholds"]),
        "l2_normalize": values["l2_normalize"],
    }
    return {key: value for key, value in overrides.items() if value is not None}


def _read_thresholds(path: str | None) -> Any:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--thresholds") from None


def split_providers(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip()) if text else ()


_SCORING_KEYS = (
    "model",
    "model_sha256",
    "labels",
    "output_name",
    "providers",
    *PREPROCESS_FLAGS,
    "workers",
    "batch_size",
    "top_k",
    "fast_jpeg",
    "max_pixels",
    "storage_option",
)


_SECRET_KEY = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)


def parse_storage_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """KEY=VALUE pairs. true/false (any case) become booleans, numbers and JSON objects or
    lists become those (client_kwargs={"region_name": "eu-west-1"}); anything else is text."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--storage-option")
        if value.strip().lower() in ("true", "false"):
            options[key.strip()] = value.strip().lower() == "true"
            continue
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        if isinstance(parsed, (int, float)) and _SECRET_KEY.search(key):
            parsed = value  # a key or secret made only of digits is still text
        options[key.strip()] = parsed if isinstance(parsed, (int, float, dict, list)) else value
    return options


def scoring_options(func: F) -> F:
    """`model_options` and `pipeline_options`, handed to the command as one `scoring` dict of
    `ScoreSettings` fields, so every command turns them into settings the same way."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {key: kwargs.pop(key) for key in _SCORING_KEYS}
        scoring = {
            "model": values["model"],
            "preprocess_overrides": preprocess_overrides(values),
            "model_sha256": values["model_sha256"],
            "labels": values["labels"],
            "output_name": values["output_name"],
            "providers": split_providers(values["providers"]),
            "pipeline": PipelineOptions(
                workers=values["workers"],
                batch_size=values["batch_size"],
                top_k=values["top_k"],
                fast_jpeg=values["fast_jpeg"],
                max_pixels=values["max_pixels"],
            ),
            "storage_options": parse_storage_options(values["storage_option"]),
        }
        return func(*args, scoring=scoring, **kwargs)

    return model_options(pipeline_options(cast(F, wrapper)))
