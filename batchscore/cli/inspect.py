"""`batchscore inspect`: parse options, call `batchscore.describe.describe_model`, print it."""

from __future__ import annotations

import json
from typing import Any

import click

from batchscore.cli.options import model_options, preprocess_overrides, split_providers
from batchscore.errors import exit_codes_help


@click.command("inspect", epilog=exit_codes_help())
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect_command(
    model: str | None,
    model_sha256: str | None,
    labels: str | None,
    output_name: str | None,
    providers: str | None,
    as_json: bool,
    **flags: Any,
) -> None:
    """Show what batchscore will feed a model and how it will read its output.

    The input and output tensors, the layout, the resolved preprocessing with where every
    value came from (a flag, which file, a default, or an assumption), where the class names
    came from, the head (softmax, multi-label, binary or embedding) and why, whether its
    softmax or sigmoid will be applied and why, the model's SHA-256, and the time of one
    forward pass. It runs the same checks as `batchscore score`.

    Example:

    \b
        batchscore inspect --model vit/
        batchscore inspect --model nsfw.onnx --labels labels.txt --json
    """
    from batchscore.describe import describe_model, format_description  # noqa: PLC0415

    options: dict[str, Any] = {
        "preprocess_overrides": preprocess_overrides(flags),
        "expected_sha256": model_sha256,
        "providers": split_providers(providers),
        "labels": labels,
        "output_name": output_name,
    }
    described = describe_model(model, **options)
    click.echo(json.dumps(described, indent=2) if as_json else format_description(described))
