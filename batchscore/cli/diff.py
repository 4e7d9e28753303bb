"""`batchscore diff`: parse options, call `batchscore.diff.diff_outputs`, print the report."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from batchscore.settings import DEFAULT_MIN_COSINE

if TYPE_CHECKING:
    from batchscore.diff import DiffReport, Side


def _side_line(name: str, side: Side) -> str:
    reasons = ", ".join(f"{kind}: {n}" for kind, n in side.error_reasons.items())
    return (
        f"{name}: {side.source} (model {side.model_sha256[:12]}): {side.n_images} images,"
        f" {side.n_ok} ok, {side.n_errors} errors" + (f" ({reasons})" if reasons else "")
    )


def format_report(report: DiffReport, top: int) -> str:
    lines = [
        _side_line("A", report.a),
        _side_line("B", report.b),
        f"{report.n_in_both} images in both, {report.n_compared} compared (ok on both sides);"
        f" only in A: {report.only_in_a}, only in B: {report.only_in_b}",
    ]
    share = report.changed_share
    if share is None:
        lines.append("nothing to compare")
        return "\n".join(lines)
    if report.cosine is not None:
        c = report.cosine
        return "\n".join(
            [
                *lines,
                f"embeddings, cosine similarity of B to A: mean {c['mean']:.4f}, median"
                f" {c['median']:.4f}, 1st percentile {c['p01']:.4f}, min {c['min']:.4f}",
                f"changed (cosine below {report.min_cosine:g}): {report.n_changed} of"
                f" {report.n_compared} ({share:.1%})",
            ]
        )
    if report.mean_jaccard is not None:
        lines.append(
            f"changed labels (the set of predicted labels): {report.n_changed} of"
            f" {report.n_compared} ({share:.1%}); mean Jaccard similarity"
            f" {report.mean_jaccard:.4f}"
        )
    else:
        lines.append(f"changed top-1: {report.n_changed} of {report.n_compared} ({share:.1%})")
    lines += [
        f"top-1 probability, B minus A: mean {report.mean_prob_delta:+.4f},"
        f" mean absolute {report.mean_abs_prob_delta:.4f}",
    ]
    shown = report.flips[:top]
    if shown:
        width = max(len(f.old) for f in shown)
        lines.append("flips (A -> B, most frequent first):")
        lines += [f"  {f.count:>7}  {f.old.ljust(width)} -> {f.new}" for f in shown]
    if len(report.flips) > len(shown):
        lines.append(f"  ... {len(report.flips) - len(shown)} more pairs (see --top)")
    return "\n".join(lines)


@click.command("diff")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path(), required=False)
@click.option(
    "--model-a",
    metavar="SHA",
    default=None,
    help="A's model: its SHA-256 or a prefix (needed when A holds several models).",
)
@click.option(
    "--model-b",
    metavar="SHA",
    default=None,
    help="B's model: its SHA-256 or a prefix (needed when B holds several models).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    default=None,
    help="Write the changed images side by side to this Parquet file.",
)
@click.option(
    "--max-changed-share",
    type=click.FloatRange(0, 1),
    default=None,
    help="Exit 3 when more than this share of the compared images changed top-1.",
)
@click.option(
    "--top",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="How many flips (A label -> B label) to list.",
)
@click.option(
    "--min-cosine",
    type=click.FloatRange(-1, 1),
    default=None,
    help="Embeddings: an image whose two vectors are less alike than this counts as changed"
    f" (default {DEFAULT_MIN_COSINE}).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def diff_command(
    a: str,
    b: str | None,
    model_a: str | None,
    model_b: str | None,
    output: str | None,
    max_changed_share: float | None,
    top: int,
    min_cosine: float | None,
    as_json: bool,
) -> None:
    """Show what changed between two scorings of the same images.

    A and B are outputs of `batchscore score`: Parquet files or dataset directories. Give A
    alone to compare two models within one dataset (after rescoring into it), named by
    --model-a and --model-b; a SHA-256 prefix is enough, and `batchscore runs DIR` lists them.

    Images are matched on image_id. When a side scored an image several times, its latest row
    counts. Images ok on both sides are compared; error rows are counted per side. The report:
    how many changed top-1, the most frequent label flips, the mean change of the top-1
    probability, the images found on one side only. For an embedding model's outputs, each
    image's two vectors are compared by cosine similarity instead, and an image less alike than
    --min-cosine counts as changed.

    Exit codes: 0 done, 2 bad usage (no output there, a model prefix that matches no model or
    several), 3 more than --max-changed-share of the compared images changed (the report and
    --output are written first).

    Example:

    \b
        batchscore diff /data/preds/ --model-a 3f2a9c --model-b 9b1c07 -o changed.parquet
        batchscore diff old.parquet new.parquet --max-changed-share 0.05
    """
    from batchscore.diff import check_changed_share, diff_outputs, write_changed  # noqa: PLC0415

    report = diff_outputs(a, b, model_a=model_a, model_b=model_b, min_cosine=min_cosine)
    if as_json:
        click.echo(json.dumps(report.as_dict(top=top), indent=2, sort_keys=True))
    else:
        click.echo(format_report(report, top))
    if output is not None:
        write_changed(report, output)
        if not as_json:
            click.echo(f"{report.n_changed} changed images -> {output}")
    if max_changed_share is not None:
        check_changed_share(report, max_changed_share)
