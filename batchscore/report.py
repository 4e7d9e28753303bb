"""How a canary result is shown: the terminal table, canary.json, report.md and a heatmap.

The heatmap is a hand-written, self-contained SVG (no plotting dependency). With many classes
it shows only the most-confused ones, so it stays readable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

import numpy as np

from batchscore import storage
from batchscore.canary import MultiLabelEvaluation
from batchscore.charts import line_chart
from batchscore.files import atomic_write_text
from batchscore.names import is_url, written_name
from batchscore.storage import StorageOptions

if TYPE_CHECKING:
    from batchscore.canary import CanaryResult, Evaluation, ModelEvaluation

JSON_FILE = "canary.json"
MARKDOWN_FILE = "report.md"
HEATMAP_FILE = "confusion_matrix.svg"
RELIABILITY_FILE = "reliability.svg"
HEATMAP_CLASSES = 20  # more classes than this: show the most-confused ones
LISTED_ERRORS = 50  # report.md lists this many error images; canary.json lists all
CONFUSED_PAIRS = 10


def write_report(
    result: CanaryResult, folder: str | Path, storage_options: StorageOptions | None = None
) -> None:
    """canary.json, report.md, the heatmap and the reliability diagram, each atomically (a
    folder), or each as one object (a bucket prefix URL)."""
    candidate = result.candidate
    files = {JSON_FILE: json.dumps(result.as_dict(), indent=2) + "\n"}
    if not isinstance(
        candidate, MultiLabelEvaluation
    ):  # a multi-label model confuses no class for another
        files[HEATMAP_FILE] = confusion_svg(
            candidate.labels, candidate.metrics.confusion, HEATMAP_CLASSES
        )
        if candidate.reliability:
            files[RELIABILITY_FILE] = reliability_svg(candidate)
    files[MARKDOWN_FILE] = markdown(result)  # last: its presence says the report is whole
    for name, text in files.items():
        if isinstance(folder, str) and is_url(folder):
            storage.put_bytes(storage.join(folder, name), text.encode(), storage_options or {})
        else:
            atomic_write_text(Path(folder) / name, text)


def reliability_svg(evaluation: ModelEvaluation) -> str:
    """Accuracy against mean top-1 probability per probability bin: on the diagonal when the
    model is calibrated, below it when it is overconfident."""
    bins = evaluation.reliability
    labels = [f"{b['low']:.2f}-{b['high']:.2f} (n={b['n']})" for b in bins]
    series = {
        "accuracy": [b["accuracy"] for b in bins],
        "mean top-1 probability": [b["confidence"] for b in bins],
    }
    title = f"Reliability: {evaluation.model_file} (ECE {evaluation.ece:.3f})"
    return line_chart(title, labels, series, top=1.0)


# --- terminal -----------------------------------------------------------------------------


def _counts_line(result: CanaryResult) -> str:
    errors = "counted as wrong" if result.errors_count_as_wrong else "left out"
    return (
        f"{result.n_images}: {result.n_scored} in the metrics, {len(result.errors)} failed to"
        f" decode ({errors}), {result.n_excluded} excluded ({_excluded_why(result)})"
    )


def _excluded_why(result: CanaryResult) -> str:
    unknown = result.n_excluded - result.n_unlabelled
    if not result.n_unlabelled:
        return "label unknown to the model"
    return f"{unknown} with a label unknown to the model, {result.n_unlabelled} without a label"


def _accuracy_text(evaluation: Evaluation) -> str:
    low, high = evaluation.accuracy_ci
    return f"{evaluation.accuracy:.4f}  95% CI [{low:.4f}, {high:.4f}]"


def terminal_table(result: CanaryResult) -> str:
    """The short summary a CI log shows: accuracy, each check, the verdict."""
    candidate = result.candidate
    multi = isinstance(candidate, MultiLabelEvaluation)
    if isinstance(candidate, MultiLabelEvaluation):
        rows = [
            ("images", _counts_line(result)),
            ("exact match", _accuracy_text(candidate)),
            *((name, _optional(value)) for name, value in _averages(candidate)),
        ]
    else:
        rows = [
            ("images", _counts_line(result)),
            ("accuracy", _accuracy_text(candidate)),
        ]
        if candidate.top_k < len(candidate.class_names):  # top-2 of two classes is always 1
            rows.append((f"top-{candidate.top_k} accuracy", f"{candidate.topk_accuracy:.4f}"))
    if result.baseline is not None and result.comparison is not None:
        c = result.comparison
        rows += [
            ("baseline", _accuracy_text(result.baseline)),
            (
                "paired",
                f"{c.both_right} both right, {c.only_candidate_right} only candidate right,"
                f" {c.only_baseline_right} only baseline right, {c.both_wrong} both wrong;"
                f" McNemar p = {c.mcnemar_p:.4g}",
            ),
            (
                "labels changed" if multi else "top-1 changed",
                f"{c.top1_changed_share:.1%} of {c.n_compared} images",
            ),
        ]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{name:<{width}}{text}" for name, text in rows]
    lines.append("")
    if not result.checks:
        lines.append(
            "no gate checks given (--min-accuracy, --max-drop, --min-class-recall"
            + (", --min-micro-f1, --min-macro-f1, --min-map" if multi else "")
            + "): report only"
        )
    else:
        name_width = max(len("check"), *(len(check.name) for check in result.checks)) + 2
        lines.append(f"{'check':<{name_width}}{'value':<9}{'threshold':<11}result")
        for check in result.checks:
            value = "n/a" if check.value is None else f"{check.value:.4f}"
            threshold = f"{check.operator} {check.threshold:g}"
            verdict = "PASS" if check.passed else "FAIL"
            detail = f"  {check.detail}" if check.detail else ""
            lines.append(f"{check.name:<{name_width}}{value:<9}{threshold:<11}{verdict}{detail}")
    lines.append("")
    failed = len(result.failed_checks)
    lines.append(
        "PASSED" if result.passed else f"FAILED: {failed} of {len(result.checks)} checks failed"
    )
    if result.report_dir is not None:
        lines.append(f"report: {storage.join(written_name(str(result.report_dir)), MARKDOWN_FILE)}")
    return "\n".join(lines)


# --- markdown -----------------------------------------------------------------------------


_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")  # what markdown renderers take for HTML


def _md(text: object) -> str:
    """Text safe inside a markdown table cell."""
    escaped = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return _TAG_START.sub("&lt;", escaped)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def _averages(evaluation: MultiLabelEvaluation) -> list[tuple[str, float | None]]:
    values = evaluation.summary()
    return [("micro F1", values["micro_f1"]), ("macro F1", values["macro_f1"]),
            ("mAP", values["map"])]  # fmt: skip


def _optional(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _model_rows(label: str, evaluation: Evaluation) -> list[list[object]]:
    low, high = evaluation.accuracy_ci
    if isinstance(evaluation, MultiLabelEvaluation):
        rows: list[list[object]] = [
            [f"{label} model", f"{evaluation.model_file} (sha256 {evaluation.model_sha256})"],
            [
                f"{label} exact match (every label right)",
                f"{evaluation.accuracy:.4f} (95% CI {low:.4f} to {high:.4f})",
            ],
        ]
        return rows + [[f"{label} {name}", _optional(v)] for name, v in _averages(evaluation)]
    return [
        [f"{label} model", f"{evaluation.model_file} (sha256 {evaluation.model_sha256})"],
        [f"{label} accuracy", f"{evaluation.accuracy:.4f} (95% CI {low:.4f} to {high:.4f})"],
        [f"{label} top-{evaluation.top_k} accuracy", f"{evaluation.topk_accuracy:.4f}"],
        [f"{label} macro F1", f"{evaluation.metrics.macro_avg()['f1']:.4f}"],
        [f"{label} calibration", _calibration_text(evaluation)],
    ]


def _calibration_text(evaluation: ModelEvaluation) -> str:
    if evaluation.ece is None:
        return "-"
    brier = "" if evaluation.brier is None else f", Brier score {evaluation.brier:.4f}"
    return f"expected calibration error {evaluation.ece:.4f}{brier} (canary.json: reliability)"


def markdown(result: CanaryResult) -> str:
    """report.md: what a reviewer reads before blessing or blocking the model."""
    sections = [
        _verdict_and_summary(result),
        _checks_section(result),
        _comparison_section(result),
        *_class_sections(result.candidate),
        _errors_section(result),
        _excluded_section(result),
    ]
    return "\n".join(line for section in sections for line in section)


def _verdict_and_summary(result: CanaryResult) -> list[str]:
    """The verdict first, so that a reviewer sees it without scrolling, then what was scored."""
    failed = len(result.failed_checks)
    verdict = (
        "**PASSED**"
        if result.passed
        else f"**FAILED**: {failed} of {len(result.checks)} checks failed"
    )
    lines = ["# Canary report", "", verdict, "", "## Summary", ""]
    rows: list[list[object]] = [["images", _counts_line(result)]]
    rows += _model_rows("candidate", result.candidate)
    if result.baseline is not None:
        rows += _model_rows("baseline", result.baseline)
    return lines + _table(["", ""], rows)


def _checks_section(result: CanaryResult) -> list[str]:
    """Each gate check with its threshold, so that a failure says which limit was crossed."""
    lines = ["## Checks", ""]
    if not result.checks:
        return [*lines, "No gate checks were given: this report only measures.", ""]
    return lines + _table(
        ["Check", "Value", "Threshold", "Result", "Detail"],
        [
            [
                check.name,
                "n/a" if check.value is None else f"{check.value:.4f}",
                f"{check.operator} {check.threshold:g}",
                "PASS" if check.passed else "FAIL",
                check.detail,
            ]
            for check in result.checks
        ],
    )


def _comparison_section(result: CanaryResult) -> list[str]:
    """The paired table behind the McNemar test, when there is a baseline to compare with."""
    if result.comparison is None:
        return []
    c = result.comparison
    multi = isinstance(result.candidate, MultiLabelEvaluation)
    changed = "The predicted labels changed" if multi else "Top-1 changed"
    right = " (right: every label of the image)" if multi else ""
    lines = ["## Candidate against baseline", "", f"Same images, same run{right}.", ""]
    lines += _table(
        ["", "baseline right", "baseline wrong"],
        [
            ["candidate right", c.both_right, c.only_candidate_right],
            ["candidate wrong", c.only_baseline_right, c.both_wrong],
        ],
    )
    return [
        *lines,
        f"Accuracy drop (baseline minus candidate): {c.accuracy_drop:.4f}."
        f" Exact McNemar p-value: {c.mcnemar_p:.4g}."
        f" {changed} on {c.n_top1_changed} of {c.n_compared} images"
        f" ({c.top1_changed_share:.1%}).",
        "",
    ]


def _class_sections(candidate: Evaluation) -> list[list[str]]:
    if isinstance(candidate, MultiLabelEvaluation):
        return [_per_label_section(candidate)]
    return [_per_class_section(candidate), _confusion_section(candidate)]


def _per_label_section(candidate: MultiLabelEvaluation) -> list[str]:
    """Per-label scores at the model's thresholds, and each label's average precision over
    all thresholds."""
    rows: list[list[object]] = [
        [
            label,
            f"{v['precision']:.4f}",
            f"{v['recall']:.4f}",
            f"{v['f1']:.4f}",
            _optional(v["average_precision"]),
            v["support"],
            v["predicted"],
            v["threshold"],
        ]
        for label, v in candidate.per_label().items()
    ]
    micro = candidate.metrics.micro
    rows.append(
        ["*micro avg*", f"{micro['precision']:.4f}", f"{micro['recall']:.4f}",
         f"{micro['f1']:.4f}", "", int(candidate.metrics.support.sum()),
         int(candidate.metrics.predicted.sum()), ""]
    )  # fmt: skip
    header = ["Label", "Precision", "Recall", "F1", "AP", "Support", "Predicted", "Threshold"]
    return ["## Per-label metrics", "", *_table(header, rows)]


def _per_class_section(candidate: ModelEvaluation) -> list[str]:
    """Per-class scores, since a good overall accuracy can hide a class the model lost."""
    per_class = [
        [label, f"{v['precision']:.4f}", f"{v['recall']:.4f}", f"{v['f1']:.4f}", v["support"]]
        for label, v in candidate.per_class().items()
    ]
    for name, avg in (
        ("macro avg", candidate.metrics.macro_avg()),
        ("weighted avg", candidate.metrics.weighted_avg()),
    ):
        per_class.append(
            [
                f"*{name}*",
                f"{avg['precision']:.4f}",
                f"{avg['recall']:.4f}",
                f"{avg['f1']:.4f}",
                candidate.metrics.n,
            ]
        )
    return [
        "## Per-class metrics",
        "",
        *_table(["Class", "Precision", "Recall", "F1", "Support"], per_class),
    ]


def _confusion_section(candidate: ModelEvaluation) -> list[str]:
    """Which classes the model mixes up, as a short list and as the heatmap beside the report."""
    lines = ["## Most confused pairs", ""]
    pairs = candidate.most_confused(CONFUSED_PAIRS)
    if pairs:
        lines += _table(
            ["True", "Predicted", "Images", "Share of true class"],
            [[t, p, n, f"{share:.1%}"] for t, p, n, share in pairs],
        )
    else:
        lines += ["No image was confused for another class.", ""]
    return [*lines, f"![Confusion matrix]({HEATMAP_FILE})", ""]


def _errors_section(result: CanaryResult) -> list[str]:
    """Images that failed to decode, since they change the metrics or are missing from them."""
    lines = [f"## Errors ({len(result.errors)})", ""]
    if not result.errors:
        return [*lines, "Every image decoded.", ""]
    how = "count as wrong" if result.errors_count_as_wrong else "are left out of the metrics"
    lines += [f"Images that failed to decode {how}.", ""]
    lines += _table(
        ["Path", "Label", "Reason"],
        [[e.path, e.label, e.error] for e in result.errors[:LISTED_ERRORS]],
    )
    if len(result.errors) > LISTED_ERRORS:
        lines += [f"... and {len(result.errors) - LISTED_ERRORS} more in {JSON_FILE}.", ""]
    return lines


def _excluded_section(result: CanaryResult) -> list[str]:
    """Images whose label the model cannot predict, which no metric counts."""
    lines = ["## Excluded labels", ""]
    if not result.n_excluded:
        return [*lines, "Every label is in the class map.", ""]
    lines += [
        f"{result.n_excluded} images left out of the metrics: the model cannot predict"
        " their labels.",
        "",
    ]
    rows: list[list[object]] = [[label, n] for label, n in result.excluded_labels.items()]
    if result.n_unlabelled:
        rows.append(["(no label)", result.n_unlabelled])
    return lines + _table(["Label", "Images"], rows)


# --- heatmap ------------------------------------------------------------------------------

CELL = 30
CHAR_WIDTH = 6.6  # px per character at the 11px font, for margins
MAX_LABEL_CHARS = 28


def _short(label: str) -> str:
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"


def _blue(share: float) -> str:
    """White (0) to dark blue (1)."""
    low, high = np.array([255, 255, 255]), np.array([8, 48, 107])
    r, g, b = (low + (high - low) * share).round().astype(int)
    return f"rgb({r},{g},{b})"


def title_text(n: int, k: int) -> str:
    title = "Confusion matrix: rows true, columns predicted, colour = share of the true class"
    return title if k == n else f"{title} ({k} most-confused of {n} classes)"


def confusion_svg(labels: Sequence[str], matrix: np.ndarray, max_classes: int) -> str:
    """A heatmap of the confusion matrix, coloured by the share of each true class.

    Beyond `max_classes` classes, only those with the most off-diagonal mass (row plus
    column) are drawn, still in class-map order.
    """
    n = len(labels)
    keep = np.arange(n)
    if n > max_classes:
        off = matrix.copy()
        np.fill_diagonal(off, 0)
        mass = off.sum(axis=0) + off.sum(axis=1)
        keep = np.sort(np.argsort(-mass, kind="stable")[:max_classes])
    names = [_short(labels[i]) for i in keep.tolist()]
    shown = matrix[np.ix_(keep, keep)]
    row_totals = matrix[keep].sum(axis=1)
    k = len(keep)
    margin = round(20 + CHAR_WIDTH * max((len(name) for name in names), default=0))
    top = margin + 40
    width = max(margin + CELL * k + 20, round(CHAR_WIDTH * len(title_text(n, k))) + 8)
    height = top + CELL * k + 20
    title = title_text(n, k)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f"<title>{escape(title)}</title>",
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="4" y="14" font-size="12">{escape(title)}</text>',
    ]
    for i, name in enumerate(names):
        y = top + CELL * i + CELL / 2 + 4
        x = margin + CELL * i + CELL / 2 + 4
        out.append(f'<text x="{margin - 6}" y="{y}" text-anchor="end">{escape(name)}</text>')
        out.append(
            f'<text x="{x}" y="{top - 6}" text-anchor="start"'
            f' transform="rotate(-90 {x} {top - 6})">{escape(name)}</text>'
        )
    for i in range(k):
        for j in range(k):
            count = int(shown[i, j])
            share = count / row_totals[i] if row_totals[i] else 0.0
            x, y = margin + CELL * j, top + CELL * i
            tip = f"true {names[i]}, predicted {names[j]}: {count} ({share:.1%} of {names[i]})"
            out.append(
                f'<rect x="{x}" y="{y}" width="{CELL}" height="{CELL}" fill="{_blue(share)}"'
                f' stroke="#ddd"><title>{escape(tip)}</title></rect>'
            )
            if count:
                colour = "white" if share > 0.5 else "black"
                out.append(
                    f'<text x="{x + CELL / 2}" y="{y + CELL / 2 + 4}" text-anchor="middle"'
                    f' fill="{colour}">{count}</text>'
                )
    out.append("</svg>")
    return "\n".join(out) + "\n"
