"""Install batchscore as a user does and run the README's first command, verbatim.

CI installs the project editable, which imports straight from the source tree and so cannot
see a module the wheel leaves out. This module builds the sdist and the wheel, checks the wheel
against the source tree, and runs the README's first command in a fresh clone and a fresh venv
on the oldest and the newest Python that `requires-python` allows and this machine has.

`python -m tests.install` does all of that (`.ci/run` calls it); tests/test_install.py uses
the same checks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import tomllib
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
PROBABILITY_TOLERANCE = 1e-3  # CPUs of another kind may round the last digits differently
SUMMARY = re.compile(r"^\d+ images?: \d+ ok, \d+ errors", re.M)
ROW = re.compile(
    r"^\d+\s+(?P<path>.*?\.jpg)\s+(?P<label>.+?)\s+(?P<prob>\d\.\d+)\s+\[(?P<topk>.*)\]$"
)


def setup_commands(readme: str) -> list[str]:
    """The README's two set-up commands: the lines of its first bash block."""
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    if block is None:
        raise ValueError("README.md has no ```bash block")
    return [line for line in block.group(1).splitlines() if line.strip()]


def shown_output(readme: str) -> str:
    """What the README says its first command printed: the plain block after the commands."""
    after = readme.split("What the first command printed here:", 1)[1]
    block = re.search(r"```\n(.*?)```", after, re.S)
    if block is None:
        raise ValueError("README.md shows no output under its first command")
    return block.group(1)


@dataclass(frozen=True)
class Prediction:
    name: str
    label: str
    prob: float
    topk: tuple[str, ...]


def predictions(printed: str) -> dict[str, Prediction]:
    """The rows of the printed pandas frame, by file name."""
    found = {}
    for line in printed.splitlines():
        match = ROW.match(line.strip())
        if match:
            name = Path(match["path"]).name
            topk = tuple(label.strip() for label in match["topk"].split(","))
            found[name] = Prediction(name, match["label"], float(match["prob"]), topk)
    return found


def differences(printed: str, shown: str) -> list[str]:
    """How what the command printed differs from what the README shows: the summary's counts,
    the labels and top-k exactly, the probabilities within PROBABILITY_TOLERANCE."""
    wrong = []
    expected_counts, got_counts = SUMMARY.search(shown), SUMMARY.search(printed)
    if expected_counts is None:
        wrong.append("the README shows no summary line")
    elif got_counts is None or got_counts.group() != expected_counts.group():
        wrong.append(f"summary: README {expected_counts.group()!r}, printed {got_counts}")
    expected, got = predictions(shown), predictions(printed)
    if not expected:
        wrong.append("the README shows no predictions")
    if sorted(expected) != sorted(got):
        wrong.append(f"images: README {sorted(expected)}, printed {sorted(got)}")
    for name in sorted(set(expected) & set(got)):
        want, have = expected[name], got[name]
        if (want.label, want.topk) != (have.label, have.topk):
            wrong.append(
                f"{name}: README {want.label} {want.topk}, printed {have.label} {have.topk}"
            )
        if abs(want.prob - have.prob) > PROBABILITY_TOLERANCE:
            wrong.append(f"{name}: README pred_prob {want.prob}, printed {have.prob}")
    return wrong


def package_files(root: Path) -> set[str]:
    """What a wheel must hold, as paths inside it: every module under batchscore/ and every
    bundled artifact that pyproject.toml's package-data ships."""
    modules = {
        path.relative_to(root).as_posix()
        for path in (root / "batchscore").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    artifacts = root / "artifacts"
    shipped = {
        f"batchscore/artifacts/{path.relative_to(artifacts).as_posix()}"
        for path in artifacts.rglob("*")
        if path.is_file() and (path.parent.name == "samples" or not path.name.endswith(".py"))
    }
    return modules | shipped


def missing_from_wheel(wheel: Path, root: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        held = set(archive.namelist())
    return sorted(package_files(root) - held)


def build(root: Path, outdir: Path) -> tuple[Path, Path]:
    """`python -m build`: the sdist, then the wheel built from that sdist, as pip would."""
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(outdir), str(root)],
        check=True,
        capture_output=True,
        text=True,
    )
    (sdist,) = outdir.glob("*.tar.gz")
    (wheel,) = outdir.glob("*.whl")
    return sdist, wheel


def _version(python: Path) -> Version:
    said = subprocess.run(
        [str(python), "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Version(said.stdout.strip())


def offered_pythons() -> dict[Version, Path]:
    """This interpreter and every CPython that pyenv holds on this machine."""
    offered = {_version(Path(sys.executable)): Path(sys.executable)}
    pyenv = shutil.which("pyenv")
    if pyenv is not None:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True, check=True)
        for binary in sorted(Path(root.stdout.strip()).glob("versions/*/bin/python3")):
            offered.setdefault(_version(binary), binary)
    return offered


def chosen_pythons(root: Path) -> tuple[list[Path], list[str]]:
    """This interpreter and the oldest and the newest that `requires-python` allows and this
    machine offers; and a line for the oldest allowed minor version when it is missing."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    allowed = SpecifierSet(project["requires-python"])
    usable = {v: path for v, path in offered_pythons().items() if allowed.contains(v)}
    this = _version(Path(sys.executable))
    chosen = sorted({min(usable), max(usable), this})
    notes = []
    floors = [Version(spec.version) for spec in allowed if spec.operator == ">="]
    if floors and min(usable).release[:2] != floors[0].release[:2]:
        notes.append(
            f"skipped: Python {floors[0]} (the oldest that requires-python allows) is not on "
            "this machine"
        )
    return [usable[v] for v in chosen], notes


IMPORT_EVERY_MODULE = """
import importlib, importlib.metadata, pkgutil, batchscore
for module in pkgutil.walk_packages(batchscore.__path__, "batchscore."):
    if module.name == "batchscore.__main__":  # importing it runs the CLI
        continue
    try:
        importlib.import_module(module.name)
    except ModuleNotFoundError as exc:  # an extra's dependency may be absent; our own may not
        if (exc.name or "").startswith("batchscore"):
            raise
names = ("onnxruntime", "numpy", "pillow", "pandas", "pyarrow")
print(", ".join(f"{name} {importlib.metadata.version(name)}" for name in names))
"""


def _is_result(line: str) -> bool:
    """A line of the first command's own output, not of pip's."""
    return bool(SUMMARY.match(line) or ROW.match(line.strip()) or "pred_label" in line)


def _venv_env(venv: Path) -> dict[str, str]:
    """The environment of a shell with `venv` activated; nothing of this interpreter's."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def try_fresh_install(python: Path, work: Path) -> list[str]:
    """A fresh clone and a fresh venv on `python`: the README's first command verbatim, then
    `batchscore score` from another working directory with cron's bare environment. Returns
    what went wrong."""
    clone, venv, elsewhere = work / "clone", work / "venv", work / "elsewhere"
    subprocess.run(["git", "clone", "--quiet", "--no-local", str(REPO), str(clone)], check=True)
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True)
    env = _venv_env(venv)
    readme = (clone / "README.md").read_text()
    first = setup_commands(readme)[0]
    print(f"$ {first}", flush=True)
    done = _run(["bash", "-c", first], clone, env)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        return [f"the README's first command exited {done.returncode}:\n{tail}"]
    printed = done.stdout + done.stderr
    shown = [line for line in printed.splitlines() if _is_result(line)]
    print("\n".join(shown), flush=True)
    wrong = differences(printed, shown_output(readme))
    elsewhere.mkdir()
    cron_env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(elsewhere), "LANG": "C"}
    scored = _run(
        ["batchscore", "score", str(clone / "artifacts" / "samples"), "-o", "nightly.parquet"],
        elsewhere,
        cron_env,
    )
    print(f"$ cd {elsewhere} && batchscore score …/artifacts/samples -o nightly.parquet")
    print(scored.stderr.strip())
    if scored.returncode != 0 or "4 images: 4 ok, 0 errors" not in scored.stderr:
        wrong.append(f"batchscore score from another directory exited {scored.returncode}")
    imported = _run([str(venv / "bin" / "python"), "-c", IMPORT_EVERY_MODULE], elsewhere, cron_env)
    if imported.returncode != 0:
        wrong.append(f"importing every module failed: {imported.stderr.strip().splitlines()[-1]}")
    else:
        print(f"every module imports; with {imported.stdout.strip()}")
    return wrong


def main() -> int:
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="batchscore-install-") as scratch:
        work = Path(scratch)
        clone = work / "build-clone"
        subprocess.run(["git", "clone", "--quiet", "--no-local", str(REPO), str(clone)], check=True)
        sdist, wheel = build(clone, work / "dist")
        missing = missing_from_wheel(wheel, clone)
        print(f"built {sdist.name} and {wheel.name}: {len(package_files(clone))} files expected")
        failures += [f"{wheel.name} lacks {path}" for path in missing]
        chosen, notes = chosen_pythons(clone)
        for note in notes:
            print(note)
        for python in chosen:
            version = _version(python)
            print(f"\n== Python {version}: fresh clone, fresh venv ==", flush=True)
            where = work / f"py{version}"
            where.mkdir()
            failures += [f"Python {version}: {w}" for w in try_fresh_install(python, where)]
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    print("fresh install: " + ("failed" if failures else f"ok on {len(chosen)} Pythons"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
