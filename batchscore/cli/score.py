"""`batchscore score`: parse options, call `batchscore.score.score`, print the summary."""

from __future__ import annotations

import click

from batchscore.cli.options import (
    model_options,
    pipeline_options,
    preprocess_overrides,
    split_providers,
)
from batchscore.pipeline import PipelineOptions
from batchscore.score import ScoreSettings, score


@click.command("score")
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="Parquet file to write (written to a temporary name, renamed when complete).",
)
@model_options
@pipeline_options
@click.option("--no-probs", is_flag=True, help="Leave out the full probability vectors.")
@click.option(
    "--max-error-rate",
    type=click.FloatRange(0, 1),
    default=None,
    help="Exit 4 (after writing) when more than this share of images failed.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
def score_command(
    sources: tuple[str, ...],
    output: str,
    model: str | None,
    model_sha256: str | None,
    providers: str | None,
    resize_size: str | None,
    crop_size: str | None,
    interpolation: str | None,
    mean: str | None,
    std: str | None,
    workers: int,
    batch_size: int,
    top_k: int,
    fast_jpeg: bool,
    max_pixels: int,
    no_probs: bool,
    max_error_rate: float | None,
    quiet: bool,
) -> None:
    """Score images from folders and manifests into a Parquet file.

    SOURCES are image folders (walked recursively, sorted), single images, or manifests
    (.csv, .jsonl, .parquet with a 'path' column and optional 'id' and 'label'; .txt with one
    path per line). Every input becomes exactly one row: images that cannot be read get
    status 'error' and a reason.

    Exit codes: 0 done (error rows included), 1 unexpected failure, 2 bad usage or
    configuration, 4 --max-error-rate exceeded, 130/143 interrupted.

    Example:

        batchscore score photos/ uploads.csv -o preds.parquet --top-k 5
    """
    settings = ScoreSettings(
        model=model,
        preprocess_overrides=preprocess_overrides(resize_size, crop_size, interpolation, mean, std),
        model_sha256=model_sha256,
        providers=split_providers(providers),
        pipeline=PipelineOptions(
            workers=workers,
            batch_size=batch_size,
            top_k=top_k,
            fast_jpeg=fast_jpeg,
            max_pixels=max_pixels,
        ),
        keep_probs=not no_probs,
        max_error_rate=max_error_rate,
        progress=not quiet,
    )
    summary = score(sources, output, settings)
    if not quiet:
        click.echo(summary.line(), err=True)
