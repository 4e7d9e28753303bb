"""Sources and outputs in buckets, end to end, against a real S3 server on loopback (moto).

Faults come from a real HTTP proxy in front of that server (tests/object_store.py): the client
code paths (signing, retries, error parsing) are the real ones. Images are real PNGs scored by
the tiny colour model; what the tests check is what a reader of the bucket would see.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from click.testing import CliRunner, Result
from PIL import Image

from batchscore import storage
from batchscore.cli import cli
from batchscore.errors import LockHeld, WriteFailed
from batchscore.incremental import done_condition
from batchscore.lease import STORE_NOW, Lease
from batchscore.store import LOCK_NAME, STAGING_PREFIX
from tests.conftest import COLORS, noisy
from tests.models import color_model
from tests.object_store import (
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    Bucket,
    Container,
    FaultProxy,
    StaticServer,
    Store,
    free_port,
)
from tests.schedules import clock_ahead
from tests.test_resume import running

NAMES = list(COLORS)


def png(color: str, seed: int = 0, size: int = 24) -> bytes:
    buffer = io.BytesIO()
    noisy(COLORS[color], (size, size), seed=seed).save(buffer, "PNG")
    return buffer.getvalue()


def seed(bucket: Bucket, prefix: str, n: int) -> dict[str, str]:
    """n images under `prefix`; returns {URL: colour}."""
    truth = {}
    for i in range(n):
        color = NAMES[i % 3]
        key = f"{prefix}img_{i:04d}_{color}.png"
        bucket.put(key, png(color, seed=i))
        truth[bucket.uri(key)] = color
    return truth


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(color_model(tmp_path_factory.mktemp("model")))


@pytest.fixture
def proxy(s3: Bucket, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """Every S3 request of the test (and of the runs it starts) goes through the proxy."""
    with FaultProxy(s3.endpoint) as front:
        monkeypatch.setenv("AWS_ENDPOINT_URL", front.url)
        s3fs.S3FileSystem.clear_instance_cache()
        yield front
    s3fs.S3FileSystem.clear_instance_cache()


def read_dataset(url: str) -> pd.DataFrame:
    return pd.read_parquet(url)


def parts(bucket: Bucket, prefix: str) -> list[str]:
    return [k for k in bucket.keys(prefix) if k.endswith(".parquet") and "/_" not in k]


def test_a_prefix_is_listed_in_key_order_and_scored_like_the_same_local_files(
    s3: Bucket, model: str, tmp_path: Path
) -> None:
    truth = seed(s3, "uploads/2026/12/01/", 7)
    s3.put("uploads/2026/12/01/notes.txt", b"not an image")
    s3.put("uploads/2026/12/01/sub/LAST_BLUE.PNG", png("blue", seed=99))
    truth[s3.uri("uploads/2026/12/01/sub/LAST_BLUE.PNG")] = "blue"
    s3.put("uploads/2026/12/02/img_other_day.png", png("red"))  # outside the prefix

    done = invoke(
        "score", s3.uri("uploads/2026/12/01/"), "-o", str(tmp_path / "out.parquet"),
        "--model", model, "--workers", "2",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    scored = pd.read_parquet(tmp_path / "out.parquet")
    assert scored["path"].tolist() == sorted(truth)
    assert scored["image_id"].tolist() == sorted(truth)
    assert scored["pred_label"].tolist() == [truth[p] for p in sorted(truth)]
    assert scored["fingerprint"].str.fullmatch(r"\d+-[0-9a-f]{32}").all()  # size-ETag

    local = tmp_path / "local"
    local.mkdir()
    for url in truth:
        (local / url.rsplit("/", 1)[1]).write_bytes(s3.get(url.split("/", 3)[3]))
    invoke("score", str(local), "-o", str(tmp_path / "local.parquet"), "--model", model)
    here = pd.read_parquet(tmp_path / "local.parquet")
    by_name = dict(zip(here["path"].str.rsplit("/", n=1).str[1], here["probs"], strict=True))
    for path, probs in zip(scored["path"], scored["probs"], strict=True):
        np.testing.assert_array_equal(probs, by_name[path.rsplit("/", 1)[1]])


def test_a_prefix_is_listed_page_by_page_in_order(
    s3: Bucket, model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 answers 1,000 keys a page; with 3 a page, these 11 objects take 4 pages."""
    monkeypatch.setattr(storage, "LIST_PAGE_KEYS", 3)
    truth = seed(s3, "many/", 10)
    s3.put("many/zz/last_red.png", png("red"))
    truth[s3.uri("many/zz/last_red.png")] = "red"
    done = invoke(
        "score", s3.uri("many"), "-o", str(tmp_path / "o.parquet"), "--model", model,
        "--workers", "0",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    scored = pd.read_parquet(tmp_path / "o.parquet")
    assert scored["path"].tolist() == sorted(truth)
    assert scored["pred_label"].tolist() == [truth[p] for p in sorted(truth)]


def test_a_manifest_in_a_bucket_mixes_relative_keys_urls_and_web_servers(
    s3: Bucket, model: str, tmp_path: Path
) -> None:
    s3.put("lists/imgs/a_red.png", png("red"))
    s3.put("other/b_blue.png", png("blue"))
    web = tmp_path / "web"
    web.mkdir()
    (web / "c_green.png").write_bytes(png("green"))
    with StaticServer(web) as server:
        presigned = (
            f"{server.url_for('c_green.png')}?X-Amz-Signature=s3cr3tsig&X-Amz-Date=20261201&v=1"
        )
        rows = [
            "imgs/a_red.png",
            s3.uri("other/b_blue.png"),
            presigned,
            "imgs/missing.png",
            f"s3://AKIAEXAMPLE:s3cr3tkey@{s3.name}/other/b_blue.png",
            "ftp://example.org/x.png",
        ]
        s3.put("lists/tonight.csv", ("path\n" + "\n".join(rows) + "\n").encode())
        done = invoke(
            "score", s3.uri("lists/tonight.csv"), "-o", str(tmp_path / "out.parquet"),
            "--model", model, "--workers", "0",
        )  # fmt: skip
    assert done.exit_code == 0, done.output
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out["status"].tolist() == ["ok", "ok", "ok", "error", "error", "error"]
    assert out["pred_label"].tolist()[:3] == ["red", "blue", "green"]
    assert out["path"].tolist()[:4] == [
        s3.uri("lists/imgs/a_red.png"),
        s3.uri("other/b_blue.png"),
        f"{server.url_for('c_green.png')}?v=1",
        s3.uri("lists/imgs/missing.png"),
    ]
    errors = out["error"].tolist()
    assert errors[3] == "object not found (404)"
    assert "carries credentials" in errors[4]
    assert "unsupported URL scheme" in errors[5]
    # No secret anywhere: not in a column, not in the file's metadata.
    table = pq.read_table(tmp_path / "out.parquet")
    everything = str(table.to_pylist()) + str(table.schema.metadata)
    assert "s3cr3t" not in everything


def test_a_dataset_in_a_bucket_resumes_and_rescores_objects_whose_etag_changed(
    s3: Bucket, model: str
) -> None:
    truth = seed(s3, "uploads/", 6)
    preds = s3.uri("preds/")
    args = ("score", s3.uri("uploads/"), "-o", preds, "--model", model, "--incremental")
    first = invoke(*args, "--workers", "0")
    assert first.exit_code == 0, first.output
    keys = s3.keys("preds/")
    assert len(parts(s3, "preds/")) == 1
    assert sum(k.startswith("preds/_runs/") for k in keys) == 1
    assert "preds/_batchscore.lock" not in keys  # released

    again = invoke(*args)
    assert again.exit_code == 0
    assert "nothing new to score (6 images already scored)" in again.output

    changed = sorted(truth)[0]  # a red image, rewritten blue: new bytes, new ETag
    s3.put(changed.split("/", 3)[3], png("blue", seed=50))
    third = invoke(*args)
    assert third.exit_code == 0, third.output
    assert third.output.startswith("1 image: 1 ok")
    rows = read_dataset(preds)
    assert len(rows) == 7
    latest = rows.sort_values("scored_at").drop_duplicates("path", keep="last")
    assert latest.set_index("path").loc[changed, "pred_label"] == "blue"

    runs = invoke("runs", preds, "--field", "status,n_images,n_skipped")
    assert runs.output.splitlines() == ["complete\t6\t0", "complete\t0\t6", "complete\t1\t5"]


def test_missing_and_forbidden_objects_are_rows_throttling_and_resets_are_retried(
    s3: Bucket, proxy: FaultProxy, model: str, tmp_path: Path
) -> None:
    for name, color in [
        ("a_red", "red"),
        ("b_secret", "green"),
        ("c_hot", "blue"),
        ("d_cut", "red"),
    ]:
        s3.put(f"in/{name}.png", png(color))
    proxy.add_fault("b_secret", "forbidden", times=-1, method="GET")
    proxy.add_fault("c_hot", "slowdown", times=3, method="GET")
    proxy.add_fault("d_cut", "reset", times=2, method="GET")
    manifest = tmp_path / "list.txt"
    names = ["a_red", "b_secret", "c_hot", "d_cut", "e_gone"]
    manifest.write_text("".join(f"{s3.uri(f'in/{n}.png')}\n" for n in names))

    done = invoke(
        "score", str(manifest), "-o", str(tmp_path / "out.parquet"), "--model", model,
        "--workers", "0",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    out = pd.read_parquet(tmp_path / "out.parquet").set_index("path")
    row = {n: out.loc[s3.uri(f"in/{n}.png")] for n in names}
    assert row["a_red"]["pred_label"] == "red"
    assert row["b_secret"]["error"].startswith("access denied (403)")
    assert row["b_secret"]["status"] == "unavailable"  # the store's answer, not the image's
    assert row["e_gone"]["status"] == "error"
    assert row["c_hot"]["pred_label"] == "blue"
    assert row["d_cut"]["pred_label"] == "red"
    assert row["e_gone"]["error"] == "object not found (404)"
    assert proxy.count("c_hot", "GET") >= 4  # three 503s, then the answer
    assert proxy.count("d_cut", "GET") >= 3
    assert proxy.errors == []


@pytest.mark.slow
def test_a_store_fault_is_never_recorded_as_done_an_image_fault_is(
    s3: Bucket, proxy: FaultProxy, model: str
) -> None:
    """The nightly job's --incremental --no-retry-errors counted error rows as done, and an
    object's ETag never changes: six 503s on one GET, or a 403, used to lose that image for
    good. Now only the image's own failures (404, undecodable) count as done."""
    for i, color in enumerate(["red", "green", "blue", "red"]):
        s3.put(f"up/{i}_{color}.png", png(color, seed=i))
    s3.put("up/4_broken.png", b"not an image at all")
    manifest = "".join(f"{s3.uri(k)}\n" for k in s3.keys("up/")) + s3.uri("up/5_gone.png") + "\n"
    s3.put("lists/night.txt", manifest.encode())
    preds = s3.uri("preds/")
    args = ("score", s3.uri("lists/night.txt"), "-o", preds, "--model", model, "--workers", "0")
    nightly = (*args, "--incremental", "--no-retry-errors")
    proxy.add_fault("1_green", "slowdown", times=6, method="GET")  # every try of one read
    proxy.add_fault("2_blue", "forbidden", times=-1, method="GET")
    first = invoke(*nightly)
    assert first.exit_code == 0, first.output
    assert "6 images: 2 ok, 4 errors (2 the store's, tried again next run)" in first.output
    rows = read_dataset(preds).set_index("path")
    status = {Path(p).name: s for p, s in rows["status"].items()}
    assert status == {
        "0_red.png": "ok",
        "1_green.png": "unavailable",
        "2_blue.png": "unavailable",
        "3_red.png": "ok",
        "4_broken.png": "error",
        "5_gone.png": "error",
    }
    assert rows.loc[s3.uri("up/1_green.png"), "error"].startswith("no answer after 6 tries")

    proxy.clear_faults()
    second = invoke(*nightly)
    assert second.exit_code == 0, second.output
    assert second.output.startswith("2 images: 2 ok, 0 errors (4 already scored"), second.output
    latest = read_dataset(preds).sort_values("scored_at").drop_duplicates("path", keep="last")
    labels = latest.set_index("path")["pred_label"]
    assert labels[s3.uri("up/1_green.png")] == "green"
    assert labels[s3.uri("up/2_blue.png")] == "blue"
    assert "nothing new to score" in invoke(*nightly).output


def test_throttled_reads_of_the_dataset_s_own_parts_are_retried(
    s3: Bucket, proxy: FaultProxy, model: str
) -> None:
    """Found by the fault schedules (seed 100017): reading what the dataset holds goes through
    pyarrow and s3fs, which reported a 503 on a part's HEAD as a missing object, and the run
    exited 2, "cannot read what ... holds: object not found (404)"."""
    seed(s3, "uploads/", 4)
    args = ("score", s3.uri("uploads/"), "-o", s3.uri("preds/"), "--model", model)
    assert invoke(*args, "--workers", "0").exit_code == 0
    proxy.add_fault("preds/run_date", "slowdown", times=4)
    again = invoke(*args, "--workers", "0")
    assert again.exit_code == 0, again.output
    assert "nothing new to score (4 images already scored)" in again.output
    assert proxy.count("preds/run_date") >= 5


@pytest.mark.parametrize(
    ("failure", "image_fault"),
    [
        (FileNotFoundError("gone"), True),
        (IsADirectoryError("a prefix"), True),
        (storage.ObjectTooLarge("object larger than 512 MiB"), True),
        (PermissionError("403"), False),
        (ConnectionResetError("reset"), False),
        (ValueError("a client's own error"), False),
    ],
)
def test_which_failed_reads_are_the_image_s_own(failure: Exception, image_fault: bool) -> None:
    assert storage.is_image_fault(failure) is image_fault


def test_rows_a_store_failed_before_this_version_are_not_done() -> None:
    """Error rows that older versions wrote for a store's failure are tried again too."""
    table = pa.table(
        {
            "status": ["ok", "error", "error", "error", "unavailable"],
            "error": [None, "corrupt or truncated image: x", "object not found (404)",
                      "no answer after 6 tries: HTTP 503", "access denied (403): y"],
        }
    )  # fmt: skip
    kept = table.filter(done_condition(include_errors=True))
    assert kept.column("error").to_pylist() == [
        None, "corrupt or truncated image: x", "object not found (404)"
    ]  # fmt: skip
    assert table.filter(done_condition(include_errors=False)).num_rows == 1


@pytest.mark.slow
def test_a_store_that_is_down_at_start_is_exit_2_in_one_line(
    s3: Bucket, model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    s3fs.S3FileSystem.clear_instance_cache()
    started = time.monotonic()
    done = invoke("score", s3.uri("x/"), "-o", str(tmp_path / "o.parquet"), "--model", model)
    assert done.exit_code == 2
    assert done.output.count("\n") == 1
    assert "not answering" in done.output and "Traceback" not in done.output
    assert time.monotonic() - started < 60
    assert not (tmp_path / "o.parquet").exists()


def test_a_url_with_credentials_is_refused_and_never_printed(tmp_path: Path, model: str) -> None:
    done = invoke(
        "score", "s3://AKIAEXAMPLE:s3cr3t@bucket/x/", "-o", str(tmp_path / "o.parquet"),
        "--model", model,
    )  # fmt: skip
    assert done.exit_code == 2
    assert "carries credentials" in done.output
    assert "s3cr3t" not in done.output and "AKIAEXAMPLE" not in done.output


def test_of_runs_racing_for_a_lock_exactly_one_gets_it_and_an_expired_lease_is_taken_once(
    s3: Bucket,
) -> None:
    root = s3.uri("preds")

    won = race([Lease(f"{root}/{LOCK_NAME}", {}, lease_s=60) for _ in range(6)])
    assert len(won) == 1
    holder = won[0]
    holder._stop.set()  # the holder dies: it stops renewing and never releases
    assert holder._renewer is not None
    holder._renewer.join()
    time.sleep(1.5)  # the store's clock counts whole seconds
    assert (
        race([Lease(f"{root}/{LOCK_NAME}", {}, lease_s=60) for _ in range(3)]) == []
    )  # 60 s not run out
    # Contenders with a shorter lease of their own change nothing: the holder's lease counts.
    assert race([Lease(f"{root}/{LOCK_NAME}", {}, lease_s=0.5) for _ in range(3)]) == []

    short = Lease(s3.uri(f"short/{LOCK_NAME}"), {}, lease_s=0.5)
    short.acquire(wait=False)
    short._stop.set()
    assert short._renewer is not None
    short._renewer.join()
    time.sleep(2.1)
    takers = race([Lease(s3.uri(f"short/{LOCK_NAME}"), {}, lease_s=30) for _ in range(4)])
    assert len(takers) == 1
    for lease in (*takers, *won):
        lease._stop.set()


def race(leases: list[Lease]) -> list[Lease]:
    """Start every lease's acquire at the same instant, one thread each; the winners."""
    start = threading.Barrier(len(leases))
    won: list[Lease] = []

    def take(lease: Lease) -> None:
        start.wait()
        with suppress(LockHeld):
            lease.acquire(wait=False)
            won.append(lease)

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


def _lease(bucket: Store, lease_s: float = 60) -> Lease:
    return Lease(bucket.uri(f"preds/{LOCK_NAME}"), {}, lease_s)


def _stop_renewing(lease: Lease) -> None:
    lease._stop.set()
    if lease._renewer is not None:
        lease._renewer.join()


def test_a_renewal_changes_the_version_a_taker_read(s3: Bucket) -> None:
    """A renewal rewrote the same body, so the lock's ETag never changed: a run that read the
    lock before a renewal still took it over with If-Match after it."""
    holder = _lease(s3)
    holder.acquire(wait=False)
    _stop_renewing(holder)
    taker = _lease(s3)
    held = taker._held()
    assert held is not None
    seen, _ = held
    holder.renew()
    assert holder.lost is None
    assert str(seen.get("ETag")) != holder.version
    assert taker._take_over(seen) is False  # the version it read is gone
    holder.check()  # still the holder's


@pytest.mark.parametrize("store", ["s3", "azure"])
def test_a_host_whose_clock_runs_ahead_cannot_take_a_live_lease(
    store: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expiry was judged by the taker's own clock: a host 301 s ahead took a 300 s lease from
    a run that was alive. It is the store's clock (its Date against Last-Modified) now, on S3
    and on Azure alike."""
    where: Store = request.getfixturevalue(store)
    holder = _lease(where, lease_s=300)
    holder.acquire(wait=False)
    try:
        monkeypatch.setattr("batchscore.lease.datetime", clock_ahead(301))
        taker = _lease(where, lease_s=300)
        held = taker._held()
        assert held is not None and STORE_NOW in held[0]  # the store said its time
        with pytest.raises(LockHeld):
            taker.acquire(wait=False)
        holder.check()
    finally:
        holder.release()


def test_a_renewal_that_landed_but_lost_its_answer_keeps_the_lease(
    s3: Bucket, proxy: FaultProxy
) -> None:
    """The next If-Match then fails (412): the run read that as "another run took over" and
    stopped, though the lock was its own. It reads the lock back and finds its own write."""
    holder = _lease(s3)
    holder.acquire(wait=False)
    _stop_renewing(holder)
    proxy.add_fault("_batchscore.lock", "lost", times=1, method="PUT")
    holder.renew()  # lands, answer lost: transient, the version it knows is now stale
    assert proxy.count("_batchscore.lock", "PUT") >= 2
    holder.renew()  # If-Match on the stale version: 412, then the lock is read back
    assert holder.lost is None
    holder.check()
    holder.renew()  # and renewing goes on from the adopted version
    assert holder.lost is None
    holder.release()
    assert "preds/_batchscore.lock" not in s3.keys("preds/")


def test_on_azure_a_renewal_that_landed_but_lost_its_answer_keeps_the_lease(
    azure: Container, azurite_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Azure answers every write with a new ETag: when a renewal landed but its answer was
    lost, the next If-Match got 412 and the run exited 1 saying another run took over, though
    the lock was its own. It now reads the lock back and finds its own token and counter."""
    import adlfs

    server, _, account = azurite_endpoint.rpartition("/")
    with FaultProxy(server) as front:
        monkeypatch.setenv(
            "AZURE_STORAGE_CONNECTION_STRING",
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={front.url}/{account};",
        )
        adlfs.AzureBlobFileSystem.clear_instance_cache()
        holder = Lease(azure.uri(f"preds/{LOCK_NAME}"), {}, 60)
        holder.acquire(wait=False)
        _stop_renewing(holder)
        front.add_fault("_batchscore.lock", "lost", times=1, method="PUT")
        holder.renew()  # lands, its answer is lost
        holder.renew()  # If-Match on the version before it: 412
        assert holder.lost is None
        holder.check()
        holder.renew()
        assert holder.lost is None
        holder.release()
    adlfs.AzureBlobFileSystem.clear_instance_cache()
    assert [k for k in azure.keys("preds/") if "lock" in k] == []


def test_a_part_upload_stops_retrying_once_the_lease_may_be_gone(
    s3: Bucket, proxy: FaultProxy, tmp_path: Path
) -> None:
    """A part upload used to retry for minutes with no fence, past the lease. The lease is
    checked before every attempt: once it may have passed, nothing more is sent."""
    holder = _lease(s3, lease_s=2.0)
    holder.acquire(wait=False)
    _stop_renewing(holder)  # its renewals stop landing
    local = tmp_path / "part.parquet"
    local.write_bytes(b"PAR1" * 1000)
    proxy.add_fault("preds/part-x", "slowdown", times=-1, method="PUT")
    holder.renewed_at = time.monotonic()  # as if a renewal had just landed: 1.6 s in hand
    with pytest.raises(WriteFailed, match="could not renew this run's lock"):
        storage.put_file(str(local), s3.uri("preds/part-x.parquet"), {}, fence=holder.check)
    # Stopped by the fence, not by the retry limit (six tries take 3 to 6 s of backoff).
    assert proxy.count("preds/part-x", "PUT") < storage.ATTEMPTS
    assert "preds/part-x.parquet" not in s3.keys("preds/")


def command(source: str, output: str, model: str, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "batchscore", "score", source, "-o", output),
        *("--model", model, "--part-rows", "8", "--batch-size", "4", "--workers", "1", *extra),
    ]


def wait_for_first_part(bucket: Bucket, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not parts(bucket, "preds/"):
        assert process.poll() is None, "the run ended before committing a part"
        assert time.monotonic() < deadline, "no part committed within 60 s"
        time.sleep(0.05)


def check_exactly_once(bucket: Bucket, truth: dict[str, str]) -> None:
    rows = read_dataset(bucket.uri("preds/"))
    assert sorted(rows["path"]) == sorted(truth)
    assert (rows["pred_label"] == rows["path"].map(truth)).all()
    for key in parts(bucket, "preds/"):
        pq.read_table(io.BytesIO(bucket.get(key)))  # every visible part is whole


@pytest.mark.slow
def test_kill_9_leaves_whole_parts_and_the_rerun_resumes_at_once(
    s3: Bucket, proxy: FaultProxy, model: str
) -> None:
    """The killed run held the lock; its lease has not run out, but its host is this one and
    its pid is gone, so the rerun takes the lock over at once (as a flock would be dropped)."""
    truth = seed(s3, "uploads/", 240)
    proxy.latency_s = 0.05  # slow enough to kill it mid-run
    argv = command(s3.uri("uploads/"), s3.uri("preds/"), model)
    with running(argv) as process:
        wait_for_first_part(s3, process)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert "preds/_batchscore.lock" in s3.keys("preds/")  # a dead run cannot release it
    left = list(Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}{process.pid}-*"))
    assert left, "the killed run had no staging folder: nothing tested"
    proxy.latency_s = 0.0
    resumed = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    check_exactly_once(s3, truth)
    assert not any(folder.exists() for folder in left)  # the rerun removed the dead one's


def test_a_lock_held_by_a_run_on_another_machine_blocks_until_its_lease_runs_out(
    s3: Bucket, model: str
) -> None:
    seed(s3, "uploads/", 3)
    elsewhere = json.dumps({"host": "another-machine", "pid": 1, "lease_s": 3}).encode()
    s3.put("preds/_batchscore.lock", elsewhere)
    args = ("score", s3.uri("uploads/"), "-o", s3.uri("preds/"), "--model", model)
    blocked = invoke(*args)
    assert blocked.exit_code == 75, blocked.output
    assert "host another-machine, pid 1" in blocked.output
    time.sleep(4.1)  # the store's clock counts whole seconds
    taken = invoke(*args, "--workers", "0")
    assert taken.exit_code == 0, taken.output
    assert taken.output.startswith("3 images: 3 ok")


@pytest.mark.slow
def test_a_store_that_drops_mid_run_stops_it_cleanly_and_the_rerun_resumes(
    s3: Bucket, proxy: FaultProxy, model: str
) -> None:
    truth = seed(s3, "uploads/", 160)
    proxy.latency_s = 0.05
    argv = command(s3.uri("uploads/"), s3.uri("preds/"), model)
    with running(argv) as process:
        wait_for_first_part(s3, process)
        proxy.add_fault("uploads/", "reset", times=-1)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    assert stderr.count("\n") == 1 and "not answering" in stderr and "run again" in stderr
    proxy.clear_faults()
    proxy.latency_s = 0.0
    resumed = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    check_exactly_once(s3, truth)


@pytest.mark.slow
def test_the_dask_engine_reads_and_writes_the_bucket_with_no_shared_directory(
    s3: Bucket, model: str, tmp_path: Path
) -> None:
    truth = seed(s3, "uploads/", 30)
    os.chdir(tmp_path)
    done = invoke(
        "score", s3.uri("uploads/"), "-o", s3.uri("preds/"), "--model", model,
        "--engine", "dask", "--workers", "2", "--part-rows", "10",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert len(parts(s3, "preds/")) >= 2  # one part per partition, each uploaded by a worker
    check_exactly_once(s3, truth)
    assert list(tmp_path.iterdir()) == []  # nothing written on this machine's disk
    assert not [k for k in s3.keys("preds/") if "/." in k]  # no token or check object left


@pytest.mark.slow
def test_on_dask_no_partition_starts_once_the_lease_may_be_gone(
    s3: Bucket, proxy: FaultProxy, model: str, tmp_path: Path
) -> None:
    """The Dask bucket path never checked the lease: a run whose renewals all failed went on
    committing parts after another run could have taken the lock."""
    seed(s3, "uploads/", 30)
    argv = command(s3.uri("uploads/"), s3.uri("preds/"), model, "--engine", "dask")
    argv += ["--lock-lease", "2", "--part-rows", "10"]
    with running(argv) as process:
        deadline = time.monotonic() + 30
        while "preds/_batchscore.lock" not in s3.keys("preds/"):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proxy.add_fault("_batchscore.lock", "slowdown", times=-1, method="PUT")  # no renewal
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    assert "could not renew this run's lock for most of its lease" in stderr
    assert parts(s3, "preds/") == []


def test_a_single_file_output_and_a_canary_report_go_to_the_bucket(s3: Bucket, model: str) -> None:
    for i, color in enumerate(NAMES * 2):
        s3.put(f"canary/{color}/img_{i}.png", png(color, seed=i))
    file_run = invoke(
        "score", s3.uri("canary/"), "-o", s3.uri("out/preds.parquet"), "--model", model
    )
    assert file_run.exit_code == 0, file_run.output
    assert len(read_dataset(s3.uri("out/preds.parquet"))) == 6
    canary = invoke(
        "canary", s3.uri("canary/"), "--model", model, "--min-accuracy", "0.9",
        "--report", s3.uri("reports/v1/"),
    )  # fmt: skip
    assert canary.exit_code == 0, canary.output
    assert re.search(r"^accuracy +1\.0000", canary.output, re.MULTILINE), canary.output
    assert s3.keys("reports/v1/") == [
        f"reports/v1/{name}"
        for name in (
            "canary.json",
            "confusion_matrix.svg",
            "predictions.parquet",
            "reliability.svg",
            "report.md",
        )
    ]


def test_the_nightly_job_scores_a_bucket_into_a_bucket_logs_locally_and_monitors(
    s3: Bucket, model: str, tmp_path: Path
) -> None:
    from tests.test_jobs import job

    for i, color in enumerate(NAMES * 2):
        s3.put(f"canary/{color}/img_{i}.png", png(color, seed=i))
    reference = s3.uri("reports/v1/")
    canary = invoke("canary", s3.uri("canary/"), "--model", model, "--report", reference)
    assert canary.exit_code == 0, canary.output
    truth = seed(s3, "uploads/", 6)  # the canary set's very images: no drift
    settings = {"UPLOADS": s3.uri("uploads/"), "DATASET": s3.uri("preds"), "MODEL": model}
    refused = job("nightly.sh", **settings)
    assert refused.returncode == 2
    assert (
        refused.stderr == "nightly.sh: DATASET is in a bucket: set LOG (or --log) to a local file\n"
    )
    log = tmp_path / "logs" / "nightly.log"
    for _ in range(2):
        done = job("nightly.sh", LOG=str(log), MONITOR_REFERENCE=reference, **settings)
        assert done.returncode == 0, done.stderr + log.read_text()
    check_exactly_once(s3, truth)
    assert "against s3://" in log.read_text()
    assert len(list((tmp_path / "logs" / "_monitor").glob("*/monitor.json"))) == 1

    monitored = invoke("monitor", s3.uri("preds/"), "--reference", reference, "--run", "x")
    assert monitored.exit_code == 2  # no run x: the same messages as on disk
    assert "nothing scored in s3://" in monitored.output


@pytest.mark.slow
def test_a_dead_or_failing_web_server_in_a_manifest_is_an_error_row_not_a_stopped_run(
    s3: Bucket, model: str, tmp_path: Path
) -> None:
    s3.put("in/a_red.png", png("red"))
    web = tmp_path / "web"
    web.mkdir()
    (web / "g.png").write_bytes(png("green"))
    with StaticServer(web) as server, FaultProxy(server.url) as failing:
        failing.add_fault("g.png", "slowdown", times=-1)
        rows = [
            s3.uri("in/a_red.png"),
            f"http://127.0.0.1:{free_port()}/gone.png",  # nothing listens there
            f"{failing.url}/g.png",  # always 503
            server.url_for("g.png"),
        ]
        (tmp_path / "list.txt").write_text("".join(f"{row}\n" for row in rows))
        done = invoke(
            "score", str(tmp_path / "list.txt"), "-o", str(tmp_path / "o.parquet"),
            "--model", model, "--workers", "0",
        )  # fmt: skip
        # --incremental asks each listed object for its fingerprint first: the same rows.
        again = invoke(
            "score", str(tmp_path / "list.txt"), "-o", str(tmp_path / "preds") + "/",
            "--model", model, "--workers", "0", "--incremental",
        )  # fmt: skip
    assert done.exit_code == 0, done.output
    out = pd.read_parquet(tmp_path / "o.parquet")
    assert out["status"].tolist() == ["ok", "unavailable", "unavailable", "ok"]
    assert out["error"][1].startswith("no answer after 6 tries: ")
    assert out["error"][2].startswith("no answer after 6 tries: HTTP 503")
    assert again.exit_code == 0, again.output
    rows = pd.read_parquet(tmp_path / "preds")
    assert rows["status"].tolist() == ["ok", "unavailable", "unavailable", "ok"]
    assert rows["error"][1].startswith("no answer after 6 tries: ")
    assert rows["error"][2].startswith("no answer after 6 tries: HTTP 503")


def test_odd_keys_relative_paths_and_empty_objects(s3: Bucket, model: str, tmp_path: Path) -> None:
    s3.put("in/tab\tname.png", png("red"))
    s3.put("in/q?x=1.png", png("blue"))
    s3.put("in/zero.png", b"")
    s3.put("lists/sub/m.txt", b"../../in/q?x=1.png\n" + str(tmp_path / "local.png").encode())
    noisy(COLORS["green"], (24, 24)).save(tmp_path / "local.png")
    prefix = invoke(
        "score", s3.uri("in/"), "-o", str(tmp_path / "a.parquet"), "--model", model,
        "--workers", "0",
    )  # fmt: skip
    assert prefix.exit_code == 0, prefix.output
    out = pd.read_parquet(tmp_path / "a.parquet").set_index("path")
    tab = s3.uri("in/tab\tname.png")
    assert out.loc[tab, "pred_label"] == "red"
    assert out.loc[tab, "path_bytes"] == tab.encode()
    assert out.loc[s3.uri("in/zero.png"), "error"] == "empty file (0 bytes)"
    one = invoke(
        "score", s3.uri("in/q?x=1.png"), "-o", str(tmp_path / "b.parquet"), "--model", model
    )
    assert one.exit_code == 0, one.output
    manifest = invoke(
        "score", s3.uri("lists/sub/m.txt"), "-o", str(tmp_path / "c.parquet"), "--model", model
    )
    assert manifest.exit_code == 0, manifest.output
    listed = pd.read_parquet(tmp_path / "c.parquet")
    assert listed["path"].tolist() == [s3.uri("in/q?x=1.png"), str(tmp_path / "local.png")]
    assert listed["pred_label"].tolist() == ["blue", "green"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("score", "s3:///x/", "-o", "o.parquet"), "no bucket name after s3://"),
        (("score", "s3://b/x/", "-o", "s3://"), "no bucket name after s3://"),
        (("runs", "s3://"), "no bucket name after s3://"),
        (("score", "s3://b/x/", "-o", "https://h/out/"), "a web server is a source only"),
        (("canary", "s3://b/c/", "--report", "https://h/r/"), "a web server is a source only"),
        (("monitor", "s3://b/p/", "--reference", "r/", "--report", "s3://b/m/"), "local folder"),
        (("score", "https://h/dir/?sig=S", "-o", "o.parquet"), "cannot carry a query"),
        (("diff", "s3://b/preds/", "other.parquet"), "reads local outputs only"),
    ],
)
def test_malformed_or_unsupported_urls_are_one_line_exit_2(
    args: tuple[str, ...], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    done = invoke(*args)
    assert done.exit_code == 2, done.output
    assert message in done.output and done.output.count("\n") == 1


def test_a_missing_object_named_on_the_command_line_is_exit_2(
    s3: Bucket, model: str, tmp_path: Path
) -> None:
    done = invoke("score", s3.uri("in/none.png"), "-o", str(tmp_path / "o.parquet"))
    assert done.exit_code == 2
    assert done.output == f"batchscore: error: source not found: {s3.uri('in/none.png')}\n"


def test_storage_options_read_booleans_numbers_and_json_like_a_user_writes_them() -> None:
    from batchscore.cli.options import parse_storage_options

    parsed = parse_storage_options(
        ("anon=False", "use_ssl=TRUE", "max_concurrency=4", 'client_kwargs={"region_name": "x"}',
         "endpoint_url=http://h:9000", "profile=nightly")
    )  # fmt: skip
    assert parsed == {
        "anon": False,
        "use_ssl": True,
        "max_concurrency": 4,
        "client_kwargs": {"region_name": "x"},
        "endpoint_url": "http://h:9000",
        "profile": "nightly",
    }


def test_azure_blob_storage_dataset_incremental_runs_and_the_lock(
    azure: Container, model: str
) -> None:
    """az:// end to end on Azurite: the same dataset promises, the lock's exclusive create,
    and a takeover of an expired lease by delete-then-create (Azure's fsspec backend has no
    conditional overwrite)."""
    truth = {}
    for i in range(6):
        color = NAMES[i % 3]
        azure.put(f"uploads/img_{i}_{color}.png", png(color, seed=i))
        truth[azure.uri(f"uploads/img_{i}_{color}.png")] = color
    preds = azure.uri("preds/")
    args = ("score", azure.uri("uploads/"), "-o", preds, "--model", model, "--incremental")
    assert invoke(*args, "--workers", "0").output.startswith("6 images: 6 ok")
    assert "nothing new to score (6 images" in invoke(*args).output
    changed = sorted(truth)[0]
    azure.put(changed.split("/", 3)[3], png("blue", seed=70))
    assert invoke(*args).output.startswith("1 image: 1 ok")
    rows = pd.read_parquet(f"{azure.name}/preds/", filesystem=azure.fs)
    assert len(rows) == 7
    latest = rows.sort_values("scored_at").drop_duplicates("path", keep="last")
    assert latest.set_index("path").loc[changed, "pred_label"] == "blue"
    assert [k for k in azure.keys("preds/") if "lock" in k] == []
    # ADLS Gen2's own form of the same container (it used to be refused as credentials)
    gen2 = f"abfss://{azure.name}@{AZURITE_ACCOUNT}.dfs.core.windows.net"
    again = invoke("score", f"{gen2}/uploads/", "-o", f"{gen2}/preds/", "--model", model)
    assert again.exit_code == 0, again.output
    assert again.output.startswith("6 images: 6 ok")  # another spelling, another identity
    rows = pd.read_parquet(f"{azure.name}/preds/", filesystem=azure.fs)
    assert len(rows) == 13
    assert sum(path.startswith(f"{gen2}/uploads/img_") for path in rows["path"]) == 6

    won = race([Lease(azure.uri(f"locked/{LOCK_NAME}"), {}, lease_s=60) for _ in range(4)])
    assert len(won) == 1  # an exclusive create: one of four
    won[0]._stop.set()  # its run dies: no renewal, no release
    assert won[0]._renewer is not None
    won[0]._renewer.join()
    azure.put("locked/_batchscore.lock", json.dumps({"host": "elsewhere", "lease_s": 1}).encode())
    time.sleep(2.1)
    takers = race([Lease(azure.uri(f"locked/{LOCK_NAME}"), {}, lease_s=30) for _ in range(4)])
    assert len(takers) == 1  # the etag condition lets exactly one take it over
    takers[0].release()

    # The store's Last-Modified counts whole seconds: a 3 s lease is surely live at once.
    elsewhere = json.dumps({"host": "another-machine", "pid": 1, "lease_s": 3}).encode()
    azure.put("preds/_batchscore.lock", elsewhere)
    assert invoke(*args).exit_code == 75
    time.sleep(4.1)
    assert invoke(*args).exit_code == 0


@pytest.mark.slow
def test_on_dask_an_image_that_kills_its_worker_is_an_error_row_in_the_bucket(
    s3: Bucket, model: str
) -> None:
    """The partition that holds a worker-killer (a 100 MP PNG on 400 MB workers) is scored one
    image per task from the client, and its part is uploaded to the bucket like the others."""

    from batchscore.score import score
    from batchscore.scorer import WORKER_DIED
    from batchscore.settings import PipelineOptions, ScoreSettings
    from tests.test_dask_engine import small_workers_cluster

    truth = seed(s3, "uploads/", 12)
    big = io.BytesIO()
    Image.new("RGB", (10_000, 10_000), COLORS["red"]).save(big, "PNG")
    s3.put("uploads/big.png", big.getvalue())
    cluster = small_workers_cluster()
    with cluster:
        settings = ScoreSettings(
            model=model,
            engine="dask",
            dask_address=cluster.scheduler_address,
            pipeline=PipelineOptions(workers=2),
        )
        summary = score([s3.uri("uploads/")], s3.uri("preds/"), settings)
    rows = read_dataset(s3.uri("preds/")).set_index("path")
    assert len(rows) == 13
    assert rows.loc[s3.uri("uploads/big.png"), "error"] == WORKER_DIED
    assert (rows.drop(s3.uri("uploads/big.png"))["pred_label"] == pd.Series(truth)).all()
    assert len(summary.stats) and summary.stats["n_images"] == 13


def test_query_parameters_that_name_an_image_keep_images_apart(tmp_path: Path, model: str) -> None:
    """`?assetKey=` was dropped as if it were a signature: Tuesday's new image had Monday's
    identity ("nothing new to score") and both were written as `.../asset.png`. A signature
    that changes at each signing still leaves one identity."""
    web = tmp_path / "web"
    web.mkdir()
    (web / "asset.png").write_bytes(png("green"))
    dataset = str(tmp_path / "preds") + "/"
    nights = {
        "monday": "asset.png?assetKey=monday-0001&X-Amz-Signature=aa&X-Amz-Date=20261207",
        "tuesday": "asset.png?assetKey=tuesday-0002&X-Amz-Signature=bb&X-Amz-Date=20261208",
        "monday re-signed": "asset.png?assetKey=monday-0001&X-Amz-Signature=cc&X-Amz-Date=2",
    }
    said = []
    with StaticServer(web) as server:
        for night, query in nights.items():
            manifest = tmp_path / f"{night}.txt"
            manifest.write_text(f"{server.url}/{query}\n")
            done = invoke("score", str(manifest), "-o", dataset, "--model", model, "--workers", "0")
            assert done.exit_code == 0, done.output
            said.append(done.output.split(",")[0].split(" ->")[0])
        paths = sorted(pd.read_parquet(dataset)["path"])
    assert said == [
        "1 image: 1 ok",
        "1 image: 1 ok",
        "nothing new to score (1 image already scored)",
    ]
    assert paths == [
        f"{server.url}/asset.png?assetKey=monday-0001",
        f"{server.url}/asset.png?assetKey=tuesday-0002",
    ]


@pytest.mark.parametrize(
    "url", ["abfss://box@acct.dfs.core.windows.net/in/", "abfs://box@acct.dfs.core.windows.net/x"]
)
def test_an_adls_gen2_url_is_accepted(url: str) -> None:
    """ADLS Gen2's standard form names the container before '@': not credentials."""
    storage.check_url(url)


@pytest.mark.parametrize(
    ("url", "written"),
    [
        (
            "https://h/x.jpg?X-Amz-Algorithm=A&X-Amz-Credential=K%2F1&X-Amz-Date=20261201"
            "&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=abc&v=2",
            "https://h/x.jpg?v=2",
        ),
        ("https://h/x.jpg?X-Goog-Signature=abc&X-Goog-Date=1&GoogleAccessId=a", "https://h/x.jpg"),
        ("https://h/x.jpg?Expires=1&Signature=s&Key-Pair-Id=k", "https://h/x.jpg"),
        ("https://host?sig=S", "https://host"),
        ("az://c/blob.jpg?sv=1&se=2&sp=r&sig=S", "az://c/blob.jpg"),
        ("https://user:pw@h/a.jpg", "https://h/a.jpg"),
        ("s3://b/q?x=1.jpg", "s3://b/q?x=1.jpg"),  # in a bucket key '?' is a character
        (
            "https://h/asset.png?assetKey=a1&apiVersion=2",
            "https://h/asset.png?assetKey=a1&apiVersion=2",
        ),
        ("https://h/a.png?monkey=1&tokens=2&key=3", "https://h/a.png?monkey=1&tokens=2"),
        (
            "abfss://box@acct.dfs.core.windows.net/a.jpg",
            "abfss://box@acct.dfs.core.windows.net/a.jpg",
        ),
        ("abfss://u:pw@acct.dfs.core.windows.net/a.jpg", "abfss://acct.dfs.core.windows.net/a.jpg"),
        ("s3://b/tab\tname.jpg", "s3://b/tab\tname.jpg"),
    ],
)
def test_what_a_url_is_written_as(url: str, written: str) -> None:
    from batchscore.names import redact_url

    assert redact_url(url) == written


@pytest.mark.slow
def test_three_runs_started_together_on_one_bucket_dataset_one_scores_two_exit_75(
    s3: Bucket, proxy: FaultProxy, model: str
) -> None:
    truth = seed(s3, "uploads/", 120)
    proxy.latency_s = 0.05  # the winner runs for seconds: the others find its lock
    argv = command(s3.uri("uploads/"), s3.uri("preds/"), model)
    processes = [
        subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for _ in range(3)
    ]
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in processes]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 75, 75], results
    assert all("is writing to" in err for code, err in results if code == 75)
    check_exactly_once(s3, truth)
