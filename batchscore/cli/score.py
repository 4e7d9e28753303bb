"""`batchscore score`: parse options, call `batchscore.score.score`, print the summary."""

from __future__ import annotations

from typing import Any

import click

from batchscore.cli.options import (
    scoring_options,
)
from batchscore.errors import ErrorRateExceeded, Summary, exit_codes_help
from batchscore.settings import (
    DEFAULT_LEASE_S,
    DEFAULT_PART_ROWS,
    DEFAULT_PART_SECONDS,
    ENGINES,
    FINGERPRINTS,
    ScoreSettings,
)


@click.command("score", epilog=exit_codes_help())
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="A .parquet file (written under a temporary name, renamed when complete), or a"
    " dataset directory (DIR/ or a path without suffix): parts under run_date=YYYY-MM-DD/,"
    " committed as they fill; images this model already scored there are skipped.",
)
@click.option(
    "--incremental",
    is_flag=True,
    help="Dataset output: also rescore images whose content changed (see --fingerprint).",
)
@click.option(
    "--fingerprint",
    type=click.Choice(FINGERPRINTS),
    default="size-mtime",
    show_default=True,
    help="How --incremental detects changed content.",
)
@click.option(
    "--retry-errors/--no-retry-errors",
    default=True,
    show_default=True,
    help="Dataset output: score images that failed in an earlier run again.",
)
@click.option(
    "--any-model",
    is_flag=True,
    help="Dataset output: an image that any model scored counts as done, so a new model scores"
    " only new uploads (by default only this model's rows count: a new model scores all).",
)
@click.option("--wait-lock", is_flag=True, help="Wait for another run on the same dataset.")
@click.option(
    "--lock-lease",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_LEASE_S,
    show_default=True,
    metavar="SECONDS",
    help="Dataset in a bucket: a killed run's lock blocks the next run this long after its"
    " last renewal (the run renews it five times per lease).",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="local",
    show_default=True,
    help="local: a process pool on this machine; dask: a Dask cluster (pip install"
    " '.[dask]' from a checkout), writing one part per partition into a shared dataset"
    " directory; with no --dask-address, a LocalCluster of --workers processes.",
)
@click.option(
    "--dask-address",
    envvar="DASK_SCHEDULER_ADDRESS",
    default=None,
    help="Scheduler to connect to (default: $DASK_SCHEDULER_ADDRESS, else a LocalCluster).",
)
@click.option(
    "--part-rows",
    type=click.IntRange(min=1),
    default=DEFAULT_PART_ROWS,
    show_default=True,
    help="Dataset output: commit a part once it holds this many rows (whole batches: a part"
    " may hold up to a batch more).",
)
@click.option(
    "--part-seconds",
    type=click.FloatRange(min=0.1),
    default=DEFAULT_PART_SECONDS,
    show_default=True,
    help="Dataset output: commit a part at least this often.",
)
@click.option(
    "--run-id",
    default=None,
    metavar="ID",
    help="Name this run (letters, digits, '.', '_', '-'; default: UTC time + random), so a"
    " script can find its own run in `batchscore runs`.",
)
@scoring_options
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
    incremental: bool,
    fingerprint: str,
    retry_errors: bool,
    any_model: bool,
    wait_lock: bool,
    lock_lease: float,
    engine: str,
    dask_address: str | None,
    part_rows: int,
    part_seconds: float,
    run_id: str | None,
    scoring: dict[str, Any],
    no_probs: bool,
    max_error_rate: float | None,
    quiet: bool,
) -> None:
    """Score images from folders and manifests into a Parquet file.

    SOURCES are image folders (walked recursively, sorted), single images, or manifests
    (.csv, .jsonl, .parquet with a 'path' column and optional 'id' and 'label'; .txt with one
    path per line). Every input becomes exactly one row: images that cannot be read get
    status 'error' and a reason.

    Example:

    \b
        batchscore score photos/ uploads.csv -o preds.parquet --top-k 5
        batchscore score /data/uploads/ -o /data/preds/ --incremental
    """
    from batchscore.score import score  # noqa: PLC0415 (the heavy stack, only when scoring)

    settings = ScoreSettings(
        **scoring,
        keep_probs=not no_probs,
        max_error_rate=max_error_rate,
        progress=not quiet,
        incremental=incremental,
        fingerprint=fingerprint,
        retry_errors=retry_errors,
        any_model=any_model,
        wait_lock=wait_lock,
        lock_lease_s=lock_lease,
        engine=engine,
        dask_address=dask_address,
        part_rows=part_rows,
        part_seconds=part_seconds,
        run_id=run_id,
    )
    try:
        summary = score(sources, output, settings)
    except ErrorRateExceeded as exc:  # the run finished: show its summary before the error
        _report(exc.summary, quiet)
        raise
    _report(summary, quiet)


def _report(summary: Summary, quiet: bool) -> None:
    for warning in summary.warnings:  # even with --quiet: an assumption must be seen
        click.echo(f"batchscore: warning: {warning}", err=True)
    if not quiet:
        click.echo(summary.line(), err=True)
