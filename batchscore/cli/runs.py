"""`batchscore runs DIR`: the run summaries of a dataset as a table."""

from __future__ import annotations

import json
from typing import Any

import click

from batchscore.cli.options import parse_storage_options, storage_option_flag

COLUMNS = (
    ("run_id", "run"),
    ("attempt", "attempt"),
    ("status", "status"),
    ("model_sha256", "model"),
    ("n_images", "images"),
    ("n_ok", "ok"),
    ("n_errors", "errors"),
    ("n_skipped", "skipped"),
    ("n_committed", "committed"),
    ("images_per_s", "img/s"),
    ("mean_top1_prob", "mean p1"),
    ("low_confidence_share", "low conf"),
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "model_sha256":
        return str(value)[:12]
    if isinstance(value, float):
        return f"{value:.1f}" if key == "images_per_s" else f"{value:.3f}"
    return str(value)


def format_runs(summaries: list[dict[str, Any]]) -> str:
    rows = [[header for _, header in COLUMNS]]
    rows += [[_cell(key, summary.get(key)) for key, _ in COLUMNS] for summary in summaries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


@click.command("runs")
@click.argument("dataset", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summaries as JSON lines.")
@click.option(
    "--status",
    type=click.Choice(["running", "complete", "interrupted", "failed", "killed"]),
    default=None,
    help="Only the runs that ended so.",
)
@click.option(
    "--field",
    default=None,
    metavar="NAME",
    help="Print only these fields of each run (comma-separated, e.g. run_id,model_sha256),"
    " tab-separated, one line per run: for scripts, which then need no JSON parsing.",
)
@storage_option_flag
def runs_command(
    dataset: str,
    as_json: bool,
    status: str | None,
    field: str | None,
    storage_option: tuple[str, ...],
) -> None:
    """List the runs that wrote a dataset directory, oldest first.

    Each attempt's summary (DIR/_runs/RUN_ID.ATTEMPT.json) holds its counts by status and
    error reason, the rows it committed, speed, class distribution, mean top-1 probability
    and the share of low-confidence predictions: compare them night over night to spot drift.

    Example:

    \b
        batchscore runs /data/preds/
        batchscore runs /data/preds/ --status complete --field model_sha256
        batchscore runs s3://preds/nightly/
    """
    from batchscore.dataset import dataset_summaries  # noqa: PLC0415 (pyarrow)

    summaries = dataset_summaries(dataset, parse_storage_options(storage_option))
    if status is not None:
        summaries = [s for s in summaries if s.get("status") == status]
    if field is not None:
        names = [name.strip() for name in field.split(",")]
        known = {key for summary in summaries for key in summary}
        unknown = [name for name in names if summaries and name not in known]
        if unknown:
            raise click.BadParameter(
                f"no field {', '.join(unknown)} in these summaries; they have:"
                f" {', '.join(sorted(known))}",
                param_hint="--field",
            )
        for summary in summaries:
            values = [summary.get(name) for name in names]
            click.echo("\t".join(v if isinstance(v, str) else json.dumps(v) for v in values))
        return
    if as_json:
        for summary in summaries:
            click.echo(json.dumps(summary, sort_keys=True))
        return
    if not summaries:
        click.echo(f"no runs recorded in {dataset}")
        return
    click.echo(format_runs(summaries))
