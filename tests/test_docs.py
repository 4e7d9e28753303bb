"""Docs that tests keep honest: help texts, the README and the docs/ pages."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pandas as pd
import pytest
from click.testing import CliRunner

from batchscore.cli import cli
from tests.conftest import REPO
from tests.install import differences, setup_commands, shown_output
from tests.object_store import free_port

README = (REPO / "README.md").read_text()
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
ALL_DOCS = "\n".join(page.read_text() for page in PAGES)
EXIT_CODE_ROWS = ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 4 |", "| 75 |", "| 130 / 143 |")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"(batchscore|tests|jobs|tools|artifacts|docs)/[\w./-]*")
DOTTED_NAME = re.compile(r"batchscore(\.\w+)+(\(.*\))?")
IMPORT = re.compile(r"^\s*from (batchscore[\w.]*) import (.+)$", re.M)


def _prose(text: str) -> str:
    """The text outside fenced code blocks (fences may be indented, inside a list item)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            kept.append(line)
    return "\n".join(kept)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces become hyphens."""
    headings = re.findall(r"^#+ (.+)$", _prose(page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _bash(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a docs snippet as written, with this interpreter's python and batchscore."""
    bindir = Path(sys.executable).parent
    path = f"{bindir}{os.pathsep}{os.environ['PATH']}"
    if shutil.which("batchscore", path=path) is None:
        for name in cli.commands:
            script = script.replace(f"batchscore {name}", f"{sys.executable} -m batchscore {name}")
    script = script.replace("python -c", f"{sys.executable} -c")
    return subprocess.run(
        ["bash", "-c", script],
        check=False,
        cwd=cwd,
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_readme_opens_with_exactly_two_setup_commands() -> None:
    assert README.index("```bash") < README.index("\n## ")
    commands = setup_commands(README)
    assert len(commands) == 2
    assert "batchscore score artifacts/samples" in commands[0]
    assert "pytest" in commands[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1] in ci


def test_readme_is_short() -> None:
    assert len(README.splitlines()) <= 160


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help_with_an_example_and_is_documented(name: str) -> None:
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert f"batchscore {name}" in ALL_DOCS


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_long_option_is_documented(name: str) -> None:
    options = {
        opt
        for param in cli.commands[name].params
        for opt in [*param.opts, *param.secondary_opts]
        if opt.startswith("--")
    }
    missing = sorted(o for o in options if not re.search(re.escape(o) + r"(?![\w-])", ALL_DOCS))
    assert not missing, f"batchscore {name}: not in README.md or docs/*.md: {missing}"


def test_exit_codes_are_documented_once_in_the_readme() -> None:
    assert isinstance(cli, click.Group)
    for code in EXIT_CODE_ROWS:
        assert code in README
    assert README.count("| 130 / 143 |") == 1
    for page in PAGES[1:]:
        assert "| 130 / 143 |" not in page.read_text(), f"{page.name}: link to the README's table"


def test_the_readme_links_every_docs_page() -> None:
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in README, page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_point_to_existing_files(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{page.name}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_repository_paths_in_the_text_exist(page: Path) -> None:
    """`batchscore/…`, `tests/…`, `jobs/…` and the like name files that are there."""
    paths = {span.split("::")[0] for span in CODE_SPAN.findall(_prose(page.read_text()))}
    named = {path for path in paths if REPO_PATH.fullmatch(path)}
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


def _python_names(page: Path) -> set[str]:
    """Dotted batchscore names in the text, and what the page's Python blocks import."""
    text = page.read_text()
    names = {
        span.split("(")[0]
        for span in CODE_SPAN.findall(_prose(text))
        if DOTTED_NAME.fullmatch(span)
    }
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        for module, imported in IMPORT.findall(block):
            names |= {f"{module}.{name.strip()}" for name in imported.split(",")}
    return names


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_python_names_in_the_text_exist(page: Path) -> None:
    missing = []
    for dotted in sorted(_python_names(page)):
        parts = dotted.split(".")
        for split in range(len(parts), 0, -1):
            module = ".".join(parts[:split])
            try:
                found: object = importlib.import_module(module)
            except ModuleNotFoundError as exc:  # not a module: an attribute of a shorter one
                if exc.name is None or not module.startswith(exc.name):
                    raise
                continue
            for attribute in parts[split:]:
                found = getattr(found, attribute, None)
            break
        else:
            found = None
        if found is None:
            missing.append(dotted)
    assert not missing, f"{page.name} names what batchscore does not have: {missing}"


def test_first_readme_command_prints_what_the_readme_shows(tmp_path: Path) -> None:
    """The same labels and top-k, probabilities within 1e-3: when the numbers change on
    purpose, the README changes in the same commit."""
    first = setup_commands(README)[0]
    scoring = first.split("&&", 1)[1]  # the part after `pip install .`
    (tmp_path / "artifacts").symlink_to(REPO / "artifacts")
    done = _bash(scoring, tmp_path)
    assert done.returncode == 0, done.stderr
    assert differences(done.stdout + done.stderr, shown_output(README)) == []
    assert len(pd.read_parquet(tmp_path / "preds.parquet")) == 4


def test_the_hostile_input_page_runs_as_written(tmp_path: Path) -> None:
    """docs/hostile-input.md's example: a Latin-1 file name is scored and round-trips."""
    page = (DOCS / "hostile-input.md").read_text()
    block = re.search(r"```bash\n(.*?)```", page, re.S)
    assert block is not None
    (tmp_path / "artifacts").symlink_to(REPO / "artifacts")
    done = _bash(block.group(1), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("1 image: 1 ok, 0 errors")
    path, label, exists = done.stdout.strip().split(" | ")
    assert path == f"{tmp_path}/uploads/caf\\xe9.jpg"
    assert (label, exists) == ("Egyptian cat", "True")
    assert "\\xNN" in page and "| `path_bytes` | binary |" in (DOCS / "scoring.md").read_text()


def test_the_canary_page_example_runs_as_written(tmp_path: Path) -> None:
    """docs/canary.md's example: the set its `find` lists, both commands, their output and codes."""
    page = (DOCS / "canary.md").read_text()
    blocks = re.findall(r"```console\n(.*?)```", page, re.S)
    assert len(blocks) == 2
    steps = [  # (command, printed lines) per `$ ` line
        (chunk.splitlines()[0], chunk.splitlines()[1:])
        for block in blocks
        for chunk in re.split(r"^\$ ", block, flags=re.M)
        if chunk
    ]
    samples = sorted((REPO / "artifacts" / "samples").glob("*.jpg"))
    (tmp_path / "artifacts").symlink_to(REPO / "artifacts")
    codes: list[int] = []
    for command, printed in steps:
        if command.startswith("find canary_set"):
            for listed in printed:
                name = Path(listed).name
                source = next(s for s in samples if name.startswith(s.stem))
                (tmp_path / listed).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, tmp_path / listed)
        elif command.startswith("batchscore canary"):
            done = _bash(command, tmp_path)
            said = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
            assert sorted(said) == sorted(line for line in printed if line.strip()), done.stderr
            codes.append(done.returncode)
        elif command == "echo $?":
            assert [str(codes[-1])] == printed
    assert codes == [0, 3]
    assert (tmp_path / "reports" / "canary" / "report.md").is_file()


def _library_example() -> str:
    block = re.search(r"```python\n(.*?)```", (DOCS / "library.md").read_text(), re.S)
    assert block is not None
    return block.group(1)


def _run_script(folder: Path, text: str) -> subprocess.CompletedProcess[str]:
    """`text` saved as lib.py beside a copy of the sample photos, run as a script."""
    shutil.copytree(REPO / "artifacts" / "samples", folder / "photos")
    (folder / "lib.py").write_text(text)
    return subprocess.run(
        [sys.executable, "lib.py"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_the_library_example_runs_as_a_saved_script(tmp_path: Path) -> None:
    done = _run_script(tmp_path, _library_example())
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("4 images: 4 ok, 0 errors")
    assert len(pd.read_parquet(tmp_path / "preds.parquet")) == 4


@pytest.mark.slow
def test_the_library_example_without_its_guard_stops_at_once_and_says_why(
    tmp_path: Path,
) -> None:
    """Spawned workers import the script again; unguarded, that used to print a traceback per
    worker and report every image as 'worker died', with exit 0."""
    lines = _library_example().splitlines()
    guard = lines.index('if __name__ == "__main__":')
    unguarded = lines[:guard] + [line.removeprefix("    ") for line in lines[guard + 1 :]]
    done = _run_script(tmp_path, "\n".join(unguarded) + "\n")
    assert done.returncode == 1
    assert done.stderr.count("Traceback") == 1  # the caller's own, and no worker's
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("batchscore.errors.ConfigError: worker processes died while starting")
    assert 'if __name__ == "__main__":' in last
    assert not (tmp_path / "preds.parquet").exists()


def test_the_own_models_page_shows_what_inspect_prints(tmp_path: Path) -> None:
    """docs/own-models.md's transcript: the command runs, and every line but the path and the
    timing is what it prints."""
    page = (DOCS / "own-models.md").read_text()
    command = re.search(r"```bash\n(.*?)```", page, re.S)
    shown = re.search(r"```\n(model .*?)```", page, re.S)
    assert command is not None and shown is not None
    (tmp_path / "artifacts").symlink_to(REPO / "artifacts")
    done = _bash(command.group(1), tmp_path)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.splitlines()
    for line in shown.group(1).splitlines():
        if line.startswith(("model ", "forward ")):
            assert any(p.startswith(line.split()[0]) for p in printed)
        else:
            assert line in printed, line


@pytest.mark.slow
def test_the_object_storage_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """docs/object-storage.md's walkthrough: its own S3 server, two runs, the runs listing."""
    page = (DOCS / "object-storage.md").read_text()
    section = page.split("## Try it on this machine", 1)[1]
    script, printed = re.findall(r"```(?:bash)?\n(.*?)```", section, re.S)[:2]
    (tmp_path / "artifacts").symlink_to(REPO / "artifacts")
    port = str(free_port())
    done = _bash(script.replace("5077", port), tmp_path)
    assert done.returncode == 0, done.stderr
    expected = printed.splitlines()
    assert done.stdout.splitlines() == expected[2:]
    summaries = done.stderr.splitlines()
    assert summaries[0].startswith(expected[0].split(" images/s")[0].rsplit(",", 1)[0])
    assert summaries[1] == expected[1]


_MONITOR_LINE = re.compile(r"^  (ALERT|ok|n/a)\s+(.+?): (-?\d+\.\d+|insufficient data)")


def _monitor_lines(text: str) -> list[tuple[str, str, str]]:
    """(verdict, signal, effect) of each signal line a `batchscore monitor` printed."""
    return [m.groups() for m in map(_MONITOR_LINE.match, text.splitlines()) if m]


@pytest.mark.slow
def test_the_monitor_example_prints_what_monitor_md_shows(tmp_path: Path) -> None:
    """docs/monitor.md's worked example, run as written (in a temporary workspace): each
    monitor command's verdict, and each signal's verdict and effect, are those the page
    shows (effects to 0.01: another onnxruntime may round a probability differently)."""
    page = (REPO / "docs" / "monitor.md").read_text()
    example = page.split("## A worked example", 1)[1]
    setup, shown = re.findall(r"```(?:bash)?\n(.*?)```", example, re.S)[:2]
    workspace = str(tmp_path / "mon")
    done = _bash(setup.replace("/tmp/mon", workspace), REPO)
    assert done.returncode == 0, done.stderr
    for block in shown.split("$ ")[1:]:
        command, _, printed = block.partition("\n")
        ran = _bash(command.replace("/tmp/mon", workspace), REPO)
        now = (ran.stdout + ran.stderr).replace(workspace, "/tmp/mon")
        assert now.splitlines()[0] == printed.splitlines()[0], (command, now)
        got, want = _monitor_lines(now), _monitor_lines(printed)
        assert [g[:2] for g in got] == [w[:2] for w in want], (command, now)
        for (_, name, value), (_, _, wanted) in zip(got, want, strict=True):
            if wanted != "insufficient data":
                assert float(value) == pytest.approx(float(wanted), abs=0.01), (name, now)
        assert ran.returncode == (3 if "ALERT" in printed else 0), now
