"""The `batchscore` command line: a thin skin over the library.

Each command parses its options, calls one library function and prints its result. Errors
become exit codes here and nowhere else (`batchscore.errors` holds the tree and the codes).
Nothing heavy is imported until a command runs: `batchscore --help` needs only Click.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import click

from batchscore import __version__
from batchscore.cli.canary import canary_command
from batchscore.cli.diff import diff_command
from batchscore.cli.inspect import inspect_command
from batchscore.cli.monitor import monitor_command
from batchscore.cli.quantize import quantize_command
from batchscore.cli.runs import runs_command
from batchscore.cli.score import score_command
from batchscore.errors import BatchscoreError, exit_codes_help


class BatchscoreGroup(click.Group):
    """Maps library errors to one line on stderr and a documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BatchscoreError as exc:
            click.echo(f"batchscore: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=BatchscoreGroup, epilog=exit_codes_help())
@click.version_option(__version__, prog_name="batchscore")
def cli() -> None:
    """Score piles of images with an ONNX image classifier into Parquet.

    Example:

    \b
        batchscore score photos/ -o preds.parquet
        batchscore score /data/uploads -o /data/preds/ --incremental
        batchscore canary canary_set/ --min-accuracy 0.55 --report reports/canary
    """


def main() -> None:
    stop_on_signals()
    cli()


def stop_on_signals() -> None:
    """Until a run installs its own handlers (after its imports, the lock and the model, over
    a second) and after it restores them, SIGTERM and SIGINT end the command at once with its
    one line and exit code, instead of a silent 143 that a cron log cannot explain. At once,
    as a kill would: an exception raised at an arbitrary point would be caught on its way out
    and reported as something else (a model that "cannot load"). What the run committed stays;
    what it left half-written is what a kill leaves, and the next run clears it."""

    def handler(signum: int, _frame: object) -> None:
        line = (
            f"batchscore: error: stopped by signal {signum} before or after its work: nothing"
            " more was written; run the same command again to finish\n"
        )
        os.write(2, line.encode())
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


cli.add_command(score_command)
cli.add_command(runs_command)
cli.add_command(quantize_command)
cli.add_command(canary_command)
cli.add_command(diff_command)
cli.add_command(inspect_command)
cli.add_command(monitor_command)
