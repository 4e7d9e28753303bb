"""The store interface's promises, held by every store the same way: a local folder, an S3
bucket (moto on loopback) and an Azure container (Azurite). The commit protocol in dataset.py
and output.py relies on nothing else, so what passes here for a store passes for its datasets.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.errors import LockHeld, WriteFailed
from batchscore.output import FileSink
from batchscore.store import LOCK_NAME, STAGING_PREFIX, BucketStore, LocalStore, Store

STORES = ["folder", "s3", "azure"]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "folder":
        return LocalStore(tmp_path / "out")
    place = request.getfixturevalue(request.param)
    return BucketStore(place.uri("out"), {})


def test_stage_then_commit_makes_the_file_visible_whole(store: Store) -> None:
    assert store.names() == []  # nothing there yet: no error either
    staged = store.stage("run_date=2026-12-07/part-a.parquet")
    pq.write_table(pa.table({"x": [1, 2, 3]}), staged)
    assert "run_date=2026-12-07/part-a.parquet" not in store.names()  # not before the commit
    store.commit(staged, "run_date=2026-12-07/part-a.parquet")
    assert not staged.exists()
    assert store.names() == ["run_date=2026-12-07/part-a.parquet"]
    parts = store.parts(store.names())
    assert parts.dataset().to_table()["x"].to_pylist() == [1, 2, 3]


def test_a_fence_that_raises_commits_nothing_and_leaves_nothing_staged(store: Store) -> None:
    staged = store.stage("p/part.parquet")
    staged.write_bytes(b"whole file")

    def lost() -> None:
        raise WriteFailed("the lock is another run's now")

    with pytest.raises(WriteFailed, match="another run's"):
        store.commit(staged, "p/part.parquet", fence=lost)
    assert not staged.exists()
    assert store.names() == []


def test_put_get_exists_delete_and_names_below(store: Store) -> None:
    store.put("_runs/a.1.json", b'{"run_id": "a"}')
    store.put("_runs/.hidden.tmp", b"")
    store.put("run_date=2026-12-07/part-x.parquet", b"x")
    assert store.get("_runs/a.1.json") == b'{"run_id": "a"}'
    assert store.exists("_runs/a.1.json") and not store.exists("_runs/b.json")
    assert store.names("_runs") == ["_runs/.hidden.tmp", "_runs/a.1.json"]
    assert store.names("missing") == []
    store.put("_runs/a.1.json", b"replaced")  # a put replaces, whole
    assert store.get("_runs/a.1.json") == b"replaced"
    store.delete("_runs/a.1.json")
    store.delete("_runs/a.1.json")  # gone already: fine
    assert not store.exists("_runs/a.1.json")
    with pytest.raises(FileNotFoundError):
        store.get("_runs/a.1.json")


def test_the_lock_is_held_by_one_run_at_a_time(store: Store) -> None:
    with store.lock(wait=False, lease_s=60) as held:
        held.check()  # ours: nothing to raise
        assert store.exists(LOCK_NAME)
        with pytest.raises(LockHeld, match="another batchscore run"):
            store.lock(wait=False, lease_s=60).__enter__()
    with store.lock(wait=False, lease_s=60) as again:  # released: the next run gets it
        again.check()


def test_a_file_sink_is_visible_only_once_finished_and_stages_nothing_after(
    store: Store,
) -> None:
    before = staging_folders()
    schema = pa.schema([("x", pa.int64())])
    sink = FileSink(store, "preds.parquet", schema, {"run_id": "r1"})
    sink.write(pa.record_batch([pa.array([1, 2])], schema=schema))
    assert "preds.parquet" not in store.names()
    sink.finish({"n_images": 2})
    assert store.names() == ["preds.parquet"]
    table = store.parts(["preds.parquet"]).dataset().to_table()
    assert table["x"].to_pylist() == [1, 2]
    assert staging_folders() == before  # a bucket's staging folder goes with the run


def staging_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}{os.getpid()}-*"))


def test_a_stopped_file_sink_leaves_nothing(store: Store) -> None:
    schema = pa.schema([("x", pa.int64())])
    sink = FileSink(store, "preds.parquet", schema, {})
    sink.write(pa.record_batch([pa.array([1])], schema=schema))
    assert "discarded" in sink.stop({"n_images": 1})
    assert store.names() == []
