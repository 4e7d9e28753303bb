"""The benchmark scripts still run against today's library: each measuring step once, on the
sample photos, with nothing timed or asserted about speed."""

from __future__ import annotations

import importlib

import pytest

from batchscore.model import load_model
from tests.conftest import SAMPLES


@pytest.mark.parametrize("name", ["bench", "leads", "dask_vs_local", "object_store"])
def test_every_benchmark_script_imports(name: str) -> None:
    module = importlib.import_module(f"tests.benchmarks.{name}")
    assert callable(module.main)


def test_the_stage_costs_run_batchscores_own_steps() -> None:
    from tests.benchmarks.bench import stage_costs

    decode, infer = stage_costs(sorted(SAMPLES.glob("*.jpg")), load_model())
    assert decode > 0 and infer > 0


def test_the_decode_leads_run(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.benchmarks.leads import decode_leads

    decode_leads(sorted(SAMPLES.glob("*.jpg"))[:2], repeats=1)
    printed = capsys.readouterr().out
    assert printed.startswith("12 MP JPEG decode, CPU ms/image: full ")
    assert "per-channel table into the batch buffer" in printed
