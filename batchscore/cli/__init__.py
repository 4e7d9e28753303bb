"""The `batchscore` command line: a thin skin over the library.

Each command parses its options, calls one library function and prints its result. Errors
become exit codes here and nowhere else (see `batchscore.errors` for the tree):

  0 done (error rows included)   1 unexpected failure   2 bad usage or configuration
  3 a gate failed                4 --max-error-rate exceeded
  75 another run holds the output lock   130/143 stopped by SIGINT/SIGTERM (resumable)
"""

from __future__ import annotations

from typing import Any

import click

from batchscore import __version__
from batchscore.cli.canary import canary_command
from batchscore.cli.diff import diff_command
from batchscore.cli.quantize import quantize_command
from batchscore.cli.runs import runs_command
from batchscore.cli.score import score_command
from batchscore.errors import BatchscoreError

EXIT_CODES_HELP = (
    "Exit codes: 0 done (error rows included), 1 unexpected failure, 2 bad usage or"
    " configuration, 3 gate failed, 4 --max-error-rate exceeded, 75 output locked by another"
    " run, 130/143 interrupted (run again to resume)."
)


class BatchscoreGroup(click.Group):
    """Maps library errors to one line on stderr and a documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BatchscoreError as exc:
            click.echo(f"batchscore: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=BatchscoreGroup, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="batchscore")
def cli() -> None:
    """Score piles of images with an ONNX image classifier into Parquet."""


def main() -> None:
    cli()


cli.add_command(score_command)
cli.add_command(runs_command)
cli.add_command(quantize_command)
cli.add_command(canary_command)
cli.add_command(diff_command)
