"""`batchscore quantize`: parse options, call `batchscore.quantize.quantize_model`, print."""

from __future__ import annotations

import click

from batchscore.settings import CALIBRATION_METHODS, QuantizeOptions

_DEFAULTS = QuantizeOptions()


@click.command("quantize")
@click.option(
    "--model",
    type=click.Path(),
    default=None,
    help="fp32 model directory or .onnx file. Default: the bundled EfficientNet-Lite0.",
)
@click.option(
    "--calibration",
    "calibration",
    multiple=True,
    required=True,
    type=click.Path(),
    help="Images to calibrate on: a folder, an image or a manifest; repeatable. Use real"
    " photos like the ones you will score.",
)
@click.option(
    "--holdout",
    multiple=True,
    type=click.Path(),
    help="Held-out images for the agreement report; repeatable. Default: a seeded split of"
    " the calibration images (never used to calibrate).",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for model_int8.onnx, class_map.json, preprocess.json and the report.",
)
@click.option(
    "--calibration-count",
    type=click.IntRange(min=1),
    default=_DEFAULTS.calibration_count,
    show_default=True,
    help="At most this many images calibrate.",
)
@click.option(
    "--holdout-count",
    type=click.IntRange(min=1),
    default=_DEFAULTS.holdout_count,
    show_default=True,
    help="At most this many images are held out (at most half, when split).",
)
@click.option(
    "--keep-first-conv", is_flag=True, help="Keep the first convolution in fp32 (accuracy)."
)
@click.option(
    "--keep-classifier",
    is_flag=True,
    help="Keep the classifier (last Gemm/MatMul) in fp32 (accuracy; a larger file).",
)
@click.option(
    "--exclude-node",
    "exclude_nodes",
    multiple=True,
    metavar="NAME",
    help="Keep this node in fp32 (its ONNX node name); repeatable.",
)
@click.option(
    "--method",
    type=click.Choice(CALIBRATION_METHODS),
    default=_DEFAULTS.method,
    show_default=True,
    help="How activation ranges are chosen. entropy and percentile keep every activation"
    " of every calibration image in memory (~65 MB per image for EfficientNet-Lite0).",
)
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True, help="Shuffle seed.")
def quantize_command(
    model: str | None,
    calibration: tuple[str, ...],
    holdout: tuple[str, ...],
    output: str,
    calibration_count: int,
    holdout_count: int,
    keep_first_conv: bool,
    keep_classifier: bool,
    exclude_nodes: tuple[str, ...],
    method: str,
    seed: int,
) -> None:
    """Quantize a model to INT8 (static QDQ, per-channel) and report what it costs.

    Calibrates on real images through the model's own preprocessing, writes
    OUTPUT/model_int8.onnx with class_map.json and preprocess.json beside it (so
    `batchscore score --model OUTPUT` works), and prints, and saves as
    OUTPUT/model_int8.report.json: size and single-thread speed against fp32, measured in the
    same run, and top-1 agreement / top-5 overlap with fp32 on held-out images, overall and
    where fp32 is confident. If agreement is poor, try --keep-first-conv / --keep-classifier.
    Needs onnx: pip install '.[quantize]' from a batchscore checkout.

    Example:

    \b
        batchscore quantize --model models/v3/ --calibration photos/ -o models/v3-int8/
        batchscore quantize --calibration calib/ --holdout holdout/ -o int8/ --keep-first-conv
        batchscore score photos/ -o preds.parquet --model models/v3-int8/
    """
    from batchscore.quantize import quantize_model  # noqa: PLC0415 (heavy: onnx, onnxruntime)

    options = QuantizeOptions(
        calibration_count=calibration_count,
        holdout_count=holdout_count,
        keep_first_conv=keep_first_conv,
        keep_classifier=keep_classifier,
        exclude_nodes=exclude_nodes,
        method=method,
        seed=seed,
    )
    report = quantize_model(model, calibration, output, options, holdout=holdout)
    click.echo(report.table())
