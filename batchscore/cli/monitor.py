"""`batchscore monitor`: parse the window and thresholds, call `batchscore.monitor.monitor`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from batchscore.cli.options import F, parse_storage_options, storage_option_flag
from batchscore.errors import GateFailed, exit_codes_help
from batchscore.settings import MonitorSettings

_DEFAULTS = MonitorSettings()
SHARE = click.FloatRange(0, 1)
# (MonitorSettings field, value range, help): each becomes --field-name with its default.
THRESHOLDS = (
    (
        "alpha",
        SHARE,
        "The false-alarm rate: the share of nights drawn from the reference's own distribution"
        " that may alert (Holm's correction across all signals).",
    ),
    (
        "max_js",
        SHARE,
        "Floor: an alert on predicted classes or file formats needs a Jensen-Shannon distance"
        " above this.",
    ),
    (
        "max_ks",
        SHARE,
        "Floor: an alert on top-1 probabilities or an input statistic needs a"
        " Kolmogorov-Smirnov statistic above this.",
    ),
    ("low_confidence", SHARE, "A top-1 probability below this is low-confidence."),
    (
        "max_low_confidence_rise",
        SHARE,
        "Floor: an alert on the low-confidence share (overall or of one class) needs a rise"
        " above this.",
    ),
    ("max_error_rate_rise", SHARE, "Floor: an alert on errors needs a rise above this."),
    (
        "max_accuracy_drop",
        SHARE,
        "Floor, with a labelled reference: an alert needs the accuracy estimated without"
        " labels to be this much below the reference's.",
    ),
    (
        "max_label_rate_change",
        SHARE,
        "Floor, for a multi-label model: an alert on one label's positive rate (the share of"
        " images in its pred_labels) needs it to move by more than this.",
    ),
)


def threshold_options(func: F) -> F:
    """One option per alert threshold, its default taken from MonitorSettings."""
    for name, kind, text in reversed(THRESHOLDS):
        flag = "--" + name.replace("_", "-")
        default = getattr(_DEFAULTS, name)
        func = click.option(flag, name, type=kind, default=default, show_default=True, help=text)(
            func
        )
    return func


@click.command("monitor", epilog=exit_codes_help())
@click.argument("dataset", type=click.Path(file_okay=False))
@click.option(
    "--reference",
    required=True,
    type=click.Path(),
    help="What the model was validated on: a canary --report folder, a dataset directory, a"
    " date partition (DIR/run_date=YYYY-MM-DD) or a Parquet file of batchscore output.",
)
@click.option("--run", "run_id", default=None, help="Monitor this run (default: the newest).")
@click.option("--date", default=None, metavar="YYYY-MM-DD", help="Monitor this date partition.")
@click.option("--since", default=None, metavar="Nd", help="Monitor the last N days (e.g. 30d).")
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Write monitor.json, report.md, trend.svg and classes.svg here.",
)
@click.option(
    "--allow-model-change",
    is_flag=True,
    help="Compare even when the two sides were scored by different models.",
)
@storage_option_flag
@threshold_options
def monitor_command(
    dataset: str,
    reference: str,
    run_id: str | None,
    date: str | None,
    since: str | None,
    report_dir: str | None,
    allow_model_change: bool,
    storage_option: tuple[str, ...],
    **thresholds: Any,  # the options of `threshold_options`, as floats
) -> None:
    """Does tonight's scoring still look like the reference? Exit 3 on an alert.

    Compares the newest run of DATASET (or --run, --date, --since) with --reference, without
    labels: the predicted classes, the top-1 probabilities, the low-confidence share (overall
    and per class), the error rate, the estimated accuracy and how the images look. A signal
    alerts only when its change is clear against the noise of a window this size (its p-value,
    Holm-corrected across signals, below --alpha) and larger than its floor. Prints the
    verdict, then one line per signal, alerts first.

    Example:

    \b
        batchscore monitor /data/preds/ --reference canary-v3/ --report monitor/
        batchscore monitor /data/preds/ --reference /data/preds/run_date=2026-11-01/ --since 30d
        batchscore monitor s3://preds/nightly/ --reference s3://reports/canary-v3/
    """
    from batchscore.monitor import (  # noqa: PLC0415 (pyarrow, numpy)
        check_report_folder,
        monitor,
        write_report,
    )

    if report_dir is not None:
        check_report_folder(report_dir)

    settings = MonitorSettings(
        run=run_id,
        date=date,
        since=since,
        allow_model_change=allow_model_change,
        storage_options=parse_storage_options(storage_option),
        **thresholds,
    )
    result = monitor(dataset, reference, settings)
    if report_dir is not None:
        write_report(result, Path(report_dir))
    click.echo(f"{result.window} against {result.reference}: {result.verdict}")
    for line in result.lines():
        click.echo(f"  {line}")
    if result.alert:
        raise GateFailed(f"monitor: {sum(s.alert for s in result.signals)} signal(s) alert")
