"""Every error batchscore raises on purpose, and the exit code each one maps to.

The tree (exit code in brackets)::

    BatchscoreError [1]           unexpected failure inside the job
    +-- WriteFailed [1]           the output broke mid-run (disk full, I/O error)
    +-- StoreUnavailable [1]      an object store stopped answering mid-run (retries spent)
    +-- ConfigError [2]           bad usage or configuration, found before work starts
    |   +-- SourceError           a missing source, an unreadable manifest, no `path` column
    |   +-- ModelError            a broken model, class map or preprocessing config
    |   +-- OutputError           an output that cannot be written
    +-- GateFailed [3]            a canary or rescoring gate failed
    +-- ErrorRateExceeded [4]     more images failed than --max-error-rate allows
    +-- LockHeld [75]             another run holds the output directory's lock
    +-- Interrupted [130 / 143]   SIGINT / SIGTERM: done work committed, rest left to resume

An image that fails to decode is *not* an exception: it becomes an error row.
Only the CLI turns these classes into exit codes (`batchscore.cli`).
"""

from __future__ import annotations

from typing import Protocol


class Summary(Protocol):
    """What an error that ends a finished run carries: the run's summary, printable."""

    @property
    def warnings(self) -> tuple[str, ...]: ...

    def line(self) -> str: ...


EXIT_CODES = {
    "0": "done (error rows included)",
    "1": "unexpected failure, or output or object store that failed mid-run",
    "2": "bad usage or configuration",
    "3": "a gate failed",
    "4": "--max-error-rate exceeded (output written)",
    "75": "another run holds the output lock",
    "130/143": "stopped by SIGINT/SIGTERM (run again to resume)",
}


def exit_codes_help() -> str:
    """The exit codes as one paragraph, for every command's --help."""
    return "Exit codes: " + ", ".join(f"{code} {text}" for code, text in EXIT_CODES.items()) + "."


class BatchscoreError(Exception):
    """Base class; its exit code (1) means an unexpected failure."""

    exit_code = 1


class ConfigError(BatchscoreError):
    """Bad usage or configuration: nothing was scored."""

    exit_code = 2


class SourceError(ConfigError):
    """A source that cannot be read: missing path, bad manifest, no `path` column."""


class ModelError(ConfigError):
    """A model, class map or preprocessing config that cannot be used."""


class OutputError(ConfigError):
    """An output location that cannot be written."""


class WriteFailed(BatchscoreError):
    """Writing output failed after the run started; the temporary file was removed."""


class StoreUnavailable(BatchscoreError):
    """An object store kept failing (throttling, timeouts, resets) after every retry; the
    work committed so far is kept and a rerun resumes."""


class GateFailed(BatchscoreError):
    """A quality gate (canary, rescoring guard) said no."""

    exit_code = 3


class ErrorRateExceeded(BatchscoreError):
    """The share of error rows is above the allowed maximum (output is still written)."""

    exit_code = 4

    def __init__(self, summary: Summary, message: str) -> None:
        super().__init__(message)
        self.summary = summary  # the run's summary: the output is complete


class LockHeld(BatchscoreError):
    """Another run holds the lock of the output directory (EX_TEMPFAIL)."""

    exit_code = 75


class Interrupted(BatchscoreError):
    """The run was stopped by a signal after committing the work already done."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


__all__ = [
    "BatchscoreError",
    "ConfigError",
    "ErrorRateExceeded",
    "GateFailed",
    "Interrupted",
    "LockHeld",
    "ModelError",
    "OutputError",
    "SourceError",
    "StoreUnavailable",
]
