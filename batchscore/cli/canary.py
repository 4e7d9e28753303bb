"""`batchscore canary`: parse the gate, call `batchscore.canary.run_canary`, print the verdict."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from batchscore.cli.options import (
    scoring_options,
)
from batchscore.errors import GateFailed
from batchscore.settings import ScoreSettings

if TYPE_CHECKING:
    from batchscore.canary import CanaryResult

SHARE = click.FloatRange(0, 1)


@click.command("canary")
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Write predictions.parquet, canary.json, report.md and confusion_matrix.svg here"
    " (a folder, or a bucket prefix such as s3://reports/canary-v3/)."
    " Without it, predictions go to a temporary folder that is removed afterwards.",
)
@click.option("--min-accuracy", type=SHARE, default=None, help="Fail when accuracy is below this.")
@click.option(
    "--baseline",
    type=click.Path(),
    default=None,
    help="The model in production, scored on the same decoded images in the same run.",
)
@click.option(
    "--max-drop",
    type=SHARE,
    default=None,
    help="Fail when accuracy is more than this below the baseline's (needs --baseline).",
)
@click.option(
    "--require-significant",
    is_flag=True,
    help="--max-drop fails only when the drop is significant (exact McNemar p < --alpha).",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.05,
    show_default=True,
    help="Significance level for --require-significant.",
)
@click.option(
    "--min-class-recall",
    type=SHARE,
    default=None,
    help="Fail when any class with at least --min-support images has recall below this.",
)
@click.option(
    "--min-support",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Classes with fewer images are not held to --min-class-recall.",
)
@click.option(
    "--min-micro-f1",
    type=SHARE,
    default=None,
    help="Multi-label: fail when the micro-averaged F1 is below this.",
)
@click.option(
    "--min-macro-f1",
    type=SHARE,
    default=None,
    help="Multi-label: fail when the macro-averaged F1 is below this.",
)
@click.option(
    "--min-map",
    type=SHARE,
    default=None,
    help="Multi-label: fail when the mean average precision is below this.",
)
@click.option(
    "--errors-count-as-wrong",
    is_flag=True,
    help="Images that fail to decode count as wrong (accuracy, recall) instead of left out.",
)
@scoring_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def canary_command(
    sources: tuple[str, ...],
    report_dir: str | None,
    min_accuracy: float | None,
    baseline: str | None,
    max_drop: float | None,
    require_significant: bool,
    alpha: float,
    min_class_recall: float | None,
    min_support: int,
    min_micro_f1: float | None,
    min_macro_f1: float | None,
    min_map: float | None,
    errors_count_as_wrong: bool,
    scoring: dict[str, Any],
    quiet: bool,
) -> None:
    """Bless or block a model: score a labelled canary set and gate on its metrics.

    SOURCES are folders in ImageFolder layout (one sub-folder per class, named for it) or
    manifests (.csv, .jsonl, .parquet) with 'path' and 'label' columns. Labels the model
    does not know are left out of the metrics and named in a warning; images that fail to
    decode are left out too, unless --errors-count-as-wrong. A multi-label model's images
    have a list of labels: a JSON list (in JSONL, a Parquet list column, or a cell), or names
    separated by '|'; it is measured per label, micro and macro, and by mAP, and accuracy is
    the exact-match share.

    With no gate flags (--min-accuracy, --max-drop, --min-class-recall) the canary only
    reports, and exits 0.

    Exit codes: 0 passed (or report only), 3 the gate failed (each failed check on its own
    line), 2 bad usage or configuration, 1 unexpected failure.

    Example:

    \b
        batchscore canary canary_set/ --min-accuracy 0.55 --report reports/canary
        batchscore canary labels.csv --model new/ --baseline current/ --max-drop 0.01
    """
    from batchscore.canary import CanarySettings, run_canary  # noqa: PLC0415 (heavy)
    from batchscore.report import terminal_table, write_report  # noqa: PLC0415

    settings = CanarySettings(
        score=ScoreSettings(
            **scoring,
            baseline_model=baseline,
            progress=not quiet,
        ),
        report_dir=report_dir,
        min_accuracy=min_accuracy,
        max_drop=max_drop,
        require_significant=require_significant,
        alpha=alpha,
        min_class_recall=min_class_recall,
        min_support=min_support,
        min_micro_f1=min_micro_f1,
        min_macro_f1=min_macro_f1,
        min_map=min_map,
        errors_count_as_wrong=errors_count_as_wrong,
    )
    result = run_canary(sources, settings)
    if report_dir is not None:
        write_report(result, report_dir, settings.score.storage_options)
    _warn(result)
    click.echo(terminal_table(result))
    if not result.passed:
        raise GateFailed(result.failure_message())


def _warn(result: CanaryResult) -> None:
    if result.excluded_labels:
        named = ", ".join(f"{label!r} ({n})" for label, n in result.excluded_labels.items())
        click.echo(
            f"batchscore: warning: labels not in the model's class map, left out of the"
            f" metrics: {named}",
            err=True,
        )
    if result.n_unlabelled:
        click.echo(
            f"batchscore: warning: {result.n_unlabelled}"
            f" {'image has' if result.n_unlabelled == 1 else 'images have'} no label, left out",
            err=True,
        )
