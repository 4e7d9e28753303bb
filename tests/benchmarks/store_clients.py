"""Would obstore serve batchscore better than fsspec (s3fs)? The figures behind the choice in
docs/object-storage.md, measured in one run against a moto S3 server on loopback.

Not a test; it needs `pip install obstore` (not a dependency of batchscore). It prints:
- the CPU time this process spends per GET of the same JPEG objects, through batchscore's own
  read path (`storage.read_object`: s3fs, a ranged read with retries), through a plain s3fs
  `cat_file` and through obstore, medians over the repeats;
- that difference as a share of what batchscore spends per image anyway (decode, preprocess,
  inference, Parquet: `batchscore score` on the same files from local disk, all processes);
- which conditional writes each client offers against this server (the lock needs a create
  that fails when the object exists and an overwrite that fails when its version changed).

    python -m tests.benchmarks.store_clients
    python -m tests.benchmarks.store_clients --count 100 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import obstore
import s3fs
from obstore.store import S3Store

from batchscore import storage
from tests.benchmarks.bench import CORPORA, make_corpus
from tests.benchmarks.object_store import BUCKET, upload_corpus
from tests.object_store import MotoServer


def cpu_ms_per_call(action: Callable[[str], object], keys: Sequence[str]) -> float:
    """CPU milliseconds of this process per call (the store runs in another process)."""
    started = time.process_time()
    for key in keys:
        action(key)
    return (time.process_time() - started) * 1000 / len(keys)


def batchscore_cpu_ms_per_image(files: Sequence[Path], output: Path) -> float:
    """CPU milliseconds per image of `batchscore score` on local files, its workers included,
    start-up excluded: (CPU of all the files - CPU of the first alone) / (count - 1)."""

    def cpu_seconds(source: Path) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(
            [sys.executable, "-m", "batchscore", "score", str(source), "-o", str(output), "-q"],
            check=True,
            capture_output=True,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        output.unlink()
        return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

    spent = cpu_seconds(files[0].parent) - cpu_seconds(files[0])
    return spent * 1000 / (len(files) - 1)


def conditional_writes(fs: s3fs.S3FileSystem, store: S3Store) -> dict[str, tuple[bool, bool]]:
    """(s3fs, obstore): whether a second create is refused, and a stale overwrite refused."""

    def refused(action: Callable[[], object]) -> bool:
        try:
            action()
        except Exception:
            return True
        return False

    fs.pipe_file(f"{BUCKET}/lock-a", b"1", mode="create")
    create_a = refused(lambda: fs.pipe_file(f"{BUCKET}/lock-a", b"2", mode="create"))
    old = fs.info(f"{BUCKET}/lock-a")["ETag"]
    fs.pipe_file(f"{BUCKET}/lock-a", b"3", IfMatch=old)
    stale_a = refused(lambda: fs.pipe_file(f"{BUCKET}/lock-a", b"4", IfMatch=old))

    obstore.put(store, "lock-b", b"1", mode="create")
    create_b = refused(lambda: obstore.put(store, "lock-b", b"2", mode="create"))
    first = obstore.head(store, "lock-b")["e_tag"]
    obstore.put(store, "lock-b", b"3", mode={"e_tag": first})
    stale_b = refused(lambda: obstore.put(store, "lock-b", b"4", mode={"e_tag": first}))
    return {
        "a second create is refused": (create_a, create_b),
        "an overwrite of a stale version is refused": (stale_a, stale_b),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=60, help="objects to GET per repeat")
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="1080p-jpeg")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="batchscore-clients-"))
    files = make_corpus(work / "corpus", CORPORA[args.corpus], args.count)
    with MotoServer(work) as moto:
        fs, uploaded = upload_corpus(moto.url, files)
        keys = [key.removeprefix(f"{BUCKET}/") for key in uploaded]
        store = S3Store(
            BUCKET,
            endpoint=moto.url,
            region="us-east-1",
            access_key_id="bench",
            secret_access_key="bench",
            client_options={"allow_http": True},
            conditional_put="etag",
        )
        ours: list[float] = []
        plain: list[float] = []
        theirs: list[float] = []
        per_image: list[float] = []
        for _ in range(args.repeats):
            ours.append(
                cpu_ms_per_call(lambda key: storage.read_object(f"s3://{BUCKET}/{key}", {}), keys)
            )
            plain.append(cpu_ms_per_call(lambda key: fs.cat_file(f"{BUCKET}/{key}"), keys))
            theirs.append(cpu_ms_per_call(lambda key: obstore.get(store, key).bytes(), keys))
            per_image.append(batchscore_cpu_ms_per_image(files, work / "out.parquet"))
        writes = conditional_writes(fs, store)
    size_kb = statistics.median(path.stat().st_size for path in files) / 1024
    s3fs_ms, plain_ms, obstore_ms, image_ms = (
        statistics.median(x) for x in (ours, plain, theirs, per_image)
    )
    print(f"{args.count} objects ({args.corpus}, median {size_kb:.0f} KB), moto on loopback,")
    print(f"{os.cpu_count()} cores, median of {args.repeats} repeats\n")
    print("| | CPU | share of batchscore's CPU per image |")
    print("|---|---|---|")
    print(f"| s3fs (batchscore's read path) | {s3fs_ms:.2f} ms | {s3fs_ms / image_ms:.1%} |")
    print(f"| s3fs, a plain `cat_file` | {plain_ms:.2f} ms | {plain_ms / image_ms:.1%} |")
    print(f"| obstore | {obstore_ms:.2f} ms | {obstore_ms / image_ms:.1%} |")
    print(f"| batchscore score per image (local files, start-up excluded) | {image_ms:.1f} ms |")
    print(
        f"\nobstore would save {s3fs_ms - obstore_ms:.2f} ms of CPU per image:"
        f" {(s3fs_ms - obstore_ms) / image_ms:.1%} of a run's CPU.\n"
    )
    print("| conditional write | s3fs | obstore |")
    print("|---|---|---|")
    for what, (a, b) in writes.items():
        print(f"| {what} | {'yes' if a else 'no'} | {'yes' if b else 'no'} |")


if __name__ == "__main__":
    main()
