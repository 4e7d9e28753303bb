"""Engines score refs and write the rows through a sink; the job does not care where it runs.

An engine is a module with one function::

    score(refs, context, sink, stop) -> Iterator[pa.RecordBatch]

It scores every ref with `context.specs`, writes the rows to `sink` in input order (or, for an
engine whose workers write parts themselves, records those parts with the sink), stops taking
new work once `stop()` is true, and yields each written batch (at least its `STATS_COLUMNS`)
so the job can count. `local` runs a process pool on this machine; `dask` a Dask cluster
(an optional extra, imported only when asked for).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from batchscore.errors import ConfigError
from batchscore.settings import ENGINES, ScoreSettings

if TYPE_CHECKING:
    import pyarrow as pa

    from batchscore.output import OutputLayout, Sink
    from batchscore.sources import ImageRef
    from batchscore.spec import ModelSpec


@dataclass(frozen=True)
class RunContext:
    """What every part of one run shares, whichever engine scores it."""

    specs: list[ModelSpec]
    settings: ScoreSettings
    layout: OutputLayout
    run_id: str


class Engine(Protocol):
    def __call__(
        self,
        refs: Iterator[ImageRef],
        context: RunContext,
        sink: Sink,
        stop: Callable[[], bool],
    ) -> Iterator[pa.RecordBatch]: ...


INSTALL_HINTS = {"dask": "pip install '.[dask]' from a batchscore checkout"}


def engine(name: str) -> Engine:
    """The `score` function of engine `name`, imported now (Dask only when it is asked for)."""
    if name not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}")
    try:
        module = importlib.import_module(f"batchscore.engines.{name}")
    except ImportError as exc:
        hint = INSTALL_HINTS.get(name, "")
        raise ConfigError(f"--engine {name} needs {exc.name}: {hint} ({exc})") from exc
    scorer: Engine = module.score
    return scorer
