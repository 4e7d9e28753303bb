"""Sources: folder walks, manifests of every format, broken entries, extra columns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchscore.errors import SourceError
from batchscore.sources import (
    CsvSource,
    DirectorySource,
    ImageFolderSource,
    merged_extra_columns,
    open_source,
)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_folder_walk_is_recursive_sorted_and_case_insensitive(tmp_path: Path) -> None:
    names = [
        "b.JPG",
        "a.png",
        "sub/z.TiFF",
        "sub/a.webp",
        "A2/c.bmp",
        "notes.txt",
        "d.gif",
        "e.jpeg",
        "f.tif",
        "sub/deeper/g.JPEG",
    ]
    for name in names:
        touch(tmp_path / name)
    source = open_source(tmp_path)
    assert isinstance(source, DirectorySource)
    got = [Path(ref.path).relative_to(tmp_path).as_posix() for ref in source if ref.path]
    assert got == [
        "a.png",
        "b.JPG",
        "d.gif",
        "e.jpeg",
        "f.tif",
        "A2/c.bmp",
        "sub/a.webp",
        "sub/z.TiFF",
        "sub/deeper/g.JPEG",
    ]
    assert source.count() == 9


def test_empty_folder_says_what_it_accepts(tmp_path: Path) -> None:
    touch(tmp_path / "readme.txt")
    with pytest.raises(SourceError, match=r"no images found .*\.jpg, \.jpeg, \.png"):
        open_source(tmp_path)


def test_image_folder_labels_come_from_sub_folders(tmp_path: Path) -> None:
    touch(tmp_path / "cat" / "1.jpg")
    touch(tmp_path / "dog" / "x" / "2.png")
    touch(tmp_path / "loose.png")
    source = open_source(tmp_path, labelled_folders=True)
    assert isinstance(source, ImageFolderSource)
    assert [ref.label for ref in source] == [None, "cat", "dog"]  # top-level files first


@pytest.mark.parametrize("bad", ["nowhere.csv", "file.xyz"])
def test_unknown_or_missing_sources_are_errors(tmp_path: Path, bad: str) -> None:
    if bad == "file.xyz":
        touch(tmp_path / bad)
    with pytest.raises(SourceError):
        open_source(tmp_path / bad)


def test_types_of_extra_columns(tmp_path: Path) -> None:
    pd.DataFrame({"path": ["a.png"], "n": [3], "when": [1.5]}).to_parquet(tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("path,n,camera\na.png,3,x\n")
    (tmp_path / "m.jsonl").write_text('{"path": "a.png", "n": 3}\n{"path": "b.png", "tags": [1]}\n')
    parquet, csv, jsonl = (
        open_source(tmp_path / f"m.{ext}") for ext in ("parquet", "csv", "jsonl")
    )
    assert parquet.extra_columns() == {"n": pa.int64(), "when": pa.float64()}
    assert csv.extra_columns() == {"n": pa.string(), "camera": pa.string()}
    assert jsonl.extra_columns() == {"n": pa.string(), "tags": pa.string()}
    assert merged_extra_columns([parquet, csv])["n"] == pa.string()  # clash -> string
    assert [ref.extras.get("tags") for ref in jsonl] == [None, "[1]"]


text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=0, max_size=12)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=st.lists(st.tuples(text, text, text), min_size=1, max_size=8))
def test_csv_rows_round_trip_whatever_they_contain(
    tmp_path: Path, rows: list[tuple[str, str, str]]
) -> None:
    frame = pd.DataFrame(
        [
            {"path": f"img{i}.png", "id": f"id{i}", "label": a, "note": b, "other": c}
            for i, (a, b, c) in enumerate(rows)
        ]
    )
    path = tmp_path / "m.csv"
    frame.to_csv(path, index=False)
    refs = list(CsvSource(path))
    assert [Path(ref.path or "").name for ref in refs] == list(frame["path"])
    assert [ref.image_id for ref in refs] == list(frame["id"])
    assert [ref.label for ref in refs] == [label or None for label, _, _ in rows]
    for ref, (_, note, other) in zip(refs, rows, strict=True):
        assert (ref.extras["note"] or "") == note
        assert (ref.extras["other"] or "") == other


def test_jsonl_broken_lines_keep_their_place(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"path": "a.png"}\n[1, 2]\n\n{"path": ""}\n{bad\n')
    refs = list(open_source(path))
    assert [ref.problem is None for ref in refs] == [True, False, False, False]
    assert "not a JSON object" in (refs[1].problem or "")
    assert "missing 'path'" in (refs[2].problem or "")
    assert "invalid JSON" in (refs[3].problem or "")


def test_unlistable_sub_folder_is_an_error_entry(tmp_path: Path) -> None:
    import os

    touch(tmp_path / "a.png")
    locked = tmp_path / "locked"
    touch(locked / "hidden.png")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as a user that ignores folder permissions")
        refs = list(open_source(tmp_path))
    finally:
        locked.chmod(0o755)
    assert [ref.problem for ref in refs] == [None, "cannot list folder: Permission denied"]
    assert refs[1].path == str(locked)
