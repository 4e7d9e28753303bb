"""A fault-injection harness: random schedules of runs, kills and faults on one dataset, and the
exactly-once invariant checked after each (tests/test_exactly_once.py drives it).

A schedule is drawn from one seed, so a failure names the seed that replays it. It is a few
steps, each a real `batchscore score` in a process of its own, then one clean run. A step may
be killed (SIGKILL or SIGTERM) at a random moment, start beside another run, reuse a run id,
run on a host whose clock is ahead, or meet store faults from the proxy (503 bursts, resets,
stalls, answers lost after the write landed).

Steps run in children of a multiprocessing forkserver that imported batchscore once: a child
starts in about a tenth of a second instead of a second and a half, which is what makes
hundreds of schedules fit in CI time. Each child runs the real CLI entry point, its stdout and
stderr in a file.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import Any

import pandas as pd

PRELOAD = ["batchscore.cli", "batchscore.score", "batchscore.engines.local", "s3fs", "pandas"]
# What a step may end with: done, killed, stopped by SIGTERM (143; or by its default action
# when it lands before batchscore has started), lock held, a store that went down (exit 1,
# committed parts kept). Anything else is a finding.
ACCEPTED_EXITS = {0, 1, 75, 143, -signal.SIGTERM, -signal.SIGKILL}


def forkserver() -> ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def run_cli(argv: list[str], env: dict[str, str], log: str, clock_ahead_s: float) -> None:
    """A child's body: the CLI as `batchscore ARGV`, on a clock `clock_ahead_s` ahead."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    if clock_ahead_s:
        import batchscore.lease

        batchscore.lease.datetime = clock_ahead(clock_ahead_s)  # type: ignore[misc]
    from batchscore.cli import main

    sys.argv = ["batchscore", *argv]
    main()


def clock_ahead(seconds: float) -> type[datetime]:
    """`datetime` as seen on a host whose clock is `seconds` ahead (isinstance still works)."""

    class Meta(type):
        def __instancecheck__(cls, instance: object) -> bool:
            return isinstance(instance, datetime)

    class Ahead(datetime, metaclass=Meta):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
            return datetime.now(tz) + timedelta(seconds=seconds)

    return Ahead


@dataclass
class Step:
    """One run of a schedule and what is done to it."""

    run_id: str | None
    kill: int | None = None  # signal sent after `after_s`
    after_s: float = 0.0
    beside: bool = False  # starts together with the next step
    clock_ahead_s: float = 0.0
    faults: list[tuple[str, str, int]] = field(default_factory=list)  # (match, kind, times)

    def __str__(self) -> str:
        said = [f"run-id={self.run_id}"]
        if self.kill is not None:
            said.append(f"{signal.Signals(self.kill).name}@{self.after_s:.2f}s")
        if self.beside:
            said.append("beside the next")
        if self.clock_ahead_s:
            said.append(f"clock+{self.clock_ahead_s:.0f}s")
        said += [f"{kind}x{times} on {match}" for match, kind, times in self.faults]
        return " ".join(said)


@dataclass
class Schedule:
    seed: int
    options: list[str]
    no_retry_errors: bool
    steps: list[Step]

    def __str__(self) -> str:
        lines = [f"seed {self.seed}: {' '.join(self.options)}"]
        lines += [f"  step {i}: {step}" for i, step in enumerate(self.steps)]
        return "\n".join(lines)


FAULT_KINDS = (("slowdown", 7), ("reset", 2), ("timeout", 1), ("lost", 2))


def draw(seed: int, *, in_bucket: bool, run_s: float) -> Schedule:
    """A schedule from its seed. `run_s`: about how long an unhindered run takes, so kills
    land before, during and after its commits."""
    rng = random.Random(seed)
    no_retry_errors = rng.random() < 0.5
    options = [
        *("--part-rows", str(rng.randint(2, 8)), "--batch-size", str(rng.randint(1, 4))),
        *(["--incremental"] if rng.random() < 0.5 else []),
        *(["--no-retry-errors"] if no_retry_errors else []),
        *("--workers", "1" if rng.random() < 0.15 else "0"),
    ]
    steps = []
    for _ in range(rng.randint(2, 4)):
        step = Step(run_id=rng.choice([None, None, "nightly", "nightly", "other"]))
        roll = rng.random()
        if roll < 0.35:
            step.kill, step.after_s = signal.SIGKILL, rng.uniform(0, 1.2 * run_s)
        elif roll < 0.55:
            step.kill, step.after_s = signal.SIGTERM, rng.uniform(0, 1.2 * run_s)
        step.beside = rng.random() < 0.2
        if in_bucket:
            if rng.random() < 0.2:
                step.clock_ahead_s = rng.choice([301.0, 3600.0])
            for _ in range(rng.choice([0, 0, 1, 2])):
                kind, most = rng.choice(FAULT_KINDS)
                match = rng.choice(["uploads/", "part-", "_batchscore.lock", "_runs/"])
                if kind == "lost" and match == "uploads/":
                    match = "part-"  # a lost answer matters where something is written
                step.faults.append((match, kind, rng.randint(1, most)))
        steps.append(step)
    return Schedule(seed, options, no_retry_errors, steps)


@dataclass
class Runner:
    """Runs the steps of a schedule against one dataset."""

    context: ForkServerContext
    argv: list[str]  # `score SOURCE -o DATASET --model M` and the schedule's options
    env: dict[str, str]
    logs: Path
    add_fault: Callable[[str, str, int], None] | None = None
    clear_faults: Callable[[], None] | None = None
    seen: list[tuple[str, int, str]] = field(default_factory=list)  # (step, exit, log)

    def run(self, schedule: Schedule) -> None:
        pending = list(enumerate(schedule.steps))
        while pending:
            group = [pending.pop(0)]
            while group[-1][1].beside and pending:
                group.append(pending.pop(0))
            self._together(group)
        if self.clear_faults is not None:
            self.clear_faults()
        # The clean run: the command the last step ran (what a resume message says to run)
        last = schedule.steps[-1].run_id if schedule.steps else None
        self._together([(len(schedule.steps), Step(run_id=last))])

    def _together(self, group: Sequence[tuple[int, Step]]) -> None:
        started = []
        for number, step in group:
            for match, kind, times in step.faults:
                assert self.add_fault is not None
                self.add_fault(match, kind, times)
            argv = [*self.argv, *(["--run-id", step.run_id] if step.run_id else [])]
            log = self.logs / f"step-{number}.log"
            log.touch()  # a child killed before it opened it said nothing
            process = self.context.Process(
                target=run_cli, args=(argv, self.env, str(log), step.clock_ahead_s)
            )
            process.start()
            started.append((number, step, process, log, time.monotonic()))
        for number, step, process, log, began in started:
            if step.kill is not None:
                process.join(max(0.0, began + step.after_s - time.monotonic()))
                if process.exitcode is None:
                    os.kill(process.pid, step.kill)
            process.join(120)
            if process.exitcode is None:  # a hang is a finding too
                process.kill()
                process.join()
                self.seen.append((f"step {number}: {step}", -999, log.read_text()))
                continue
            took = f"{time.monotonic() - began:.1f}s"
            self.seen.append(
                (f"step {number} ({took}): {step}", int(process.exitcode), log.read_text())
            )


def findings(runner: Runner, last_must_succeed: bool = True) -> list[str]:
    """Exit codes no step may end with, tracebacks, and a clean run that did not finish."""
    found = []
    for step, code, log in runner.seen:
        if code not in ACCEPTED_EXITS:
            found.append(f"{step}: exit {code}: {log.strip()[-600:]}")
        elif "Traceback" in log:
            found.append(f"{step}: a traceback: {log.strip()[-600:]}")
    if last_must_succeed and runner.seen and runner.seen[-1][1] != 0:
        step, code, log = runner.seen[-1]
        found.append(f"the clean run exited {code}: {log.strip()[-600:]}")
    return found


def row_problems(
    rows: pd.DataFrame, good: set[str], bad: set[str], no_retry_errors: bool
) -> list[str]:
    """Every good image exactly once as an ok row; every bad one never ok, and exactly once
    with --no-retry-errors (which counts its error row as done). `unavailable` rows are
    attempts the store failed, never results, and may stay beside the result."""
    found = []
    results = rows[rows["status"] != "unavailable"]
    ok = Counter(results.loc[results["status"] == "ok", "path"])
    errors = Counter(results.loc[results["status"] == "error", "path"])
    for path in sorted(good):
        if ok[path] != 1 or errors[path]:
            found.append(f"{path}: {ok[path]} ok rows, {errors[path]} error rows")
    for path in sorted(bad):
        if ok[path] or not errors[path] or (no_retry_errors and errors[path] != 1):
            found.append(f"bad {path}: {ok[path]} ok rows, {errors[path]} error rows")
    unknown = set(rows["path"]) - good - bad
    if unknown:
        found.append(f"rows of images never listed: {sorted(unknown)[:3]}")
    return found


def summary_problems(
    summaries: list[dict[str, Any]], parts: dict[str, int], n_rows: int
) -> list[str]:
    """`batchscore runs` agrees with the dataset: no attempt left `running`, every part in the
    summary of exactly one attempt, and the committed counts add up to the rows."""
    found = []
    running = [s["run_id"] for s in summaries if s.get("status") == "running"]
    if running:
        found.append(f"summaries still running after a clean run: {running}")
    claimed = Counter(p for s in summaries for p in s.get("parts", []))
    if set(claimed) != set(parts) or any(n > 1 for n in claimed.values()):
        found.append(
            f"parts claimed by summaries {sorted(claimed.items())} are not the parts there"
            f" {sorted(parts)}"
        )
    committed = sum(int(s.get("n_committed", 0)) for s in summaries)
    if committed != n_rows:
        found.append(f"summaries count {committed} committed rows, the dataset holds {n_rows}")
    for s in summaries:
        mine = sum(parts.get(p, 0) for p in s.get("parts", []))
        if s.get("n_committed") != mine:
            found.append(f"{s['run_id']}.{s.get('attempt')}: n_committed {s.get('n_committed')},"
                         f" its parts hold {mine}")  # fmt: skip
    return found
