"""Scoring from a bucket against scoring the same files from a local disk, in one run.

Not a test: it prints the table in docs/object-storage.md and asserts nothing about time.
A moto S3 server runs on loopback; a fault proxy in front of it adds 0 or 50 ms to every
request (a real store answers a GET in tens of milliseconds). Each repeat scores the same
1080p JPEGs from local files, then from the bucket at each latency, with the bundled model and
default settings (`batchscore score` in a subprocess), and writes to a local Parquet file, so
only the read path differs. Figures are medians over the repeats; each ratio is taken within
one repeat.

Here the store runs on the same cores as the job, which a real one does not: the table shows
the CPU time the store's side (moto and the proxy) took, as a share of the cores during the
run, so the cost of the store can be told apart from the cost of reading from one.

It also times the loop a user would write first: one GET after another through the same
proxy (no decoding at all), which bounds any sequential reader.

    python -m tests.benchmarks.object_store
    python -m tests.benchmarks.object_store --count 200 --repeats 5 --workdir /tmp/osbench
    python -m tests.benchmarks.object_store --corpus 12mp-jpeg --count 40
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
from collections.abc import Sequence
from pathlib import Path

import s3fs

from tests.benchmarks.bench import CORPORA, make_corpus
from tests.object_store import FaultProxy, MotoServer

LATENCIES_S = (0.0, 0.05)
BUCKET = "bench"


def rate(source: str, output: Path, server_pid: int) -> tuple[float, float, float]:
    """images/s of one CLI run, the share of all cores the store's side used meanwhile, and
    the CPU seconds batchscore itself used (the CLI and its workers, start-up included)."""
    server_before, proxy_before = _cpu_seconds(server_pid), time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "batchscore", "score", source, "-o", str(output)],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    store = _cpu_seconds(server_pid) - server_before + time.process_time() - proxy_before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    output.unlink()
    images_per_s = float(done.stderr.split(" images/s")[0].rsplit(", ", 1)[1])
    return images_per_s, store / (wall * (os.cpu_count() or 1)), own


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def upload_corpus(endpoint: str, files: Sequence[Path]) -> tuple[s3fs.S3FileSystem, list[str]]:
    """The corpus under BUCKET/uploads/ of the S3 store at `endpoint` (moto, or a proxy in front
    of it), which the environment then names for every client; a client and the keys."""
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    for path in files:
        fs.put_file(str(path), f"{BUCKET}/uploads/{path.name}")
    return fs, [f"{BUCKET}/uploads/{path.name}" for path in files]


def sequential_gets(fs: s3fs.S3FileSystem, keys: Sequence[str]) -> float:
    started = time.perf_counter()
    for key in keys:
        fs.cat_file(key)
    return len(keys) / (time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=120, help="images to score")
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="1080p-jpeg")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="batchscore-osbench-"))
    files = make_corpus(work / "corpus", CORPORA[args.corpus], args.count)
    local = str(files[0].parent)
    with MotoServer(work) as moto, FaultProxy(moto.url) as proxy:
        fs, keys = upload_corpus(proxy.url, files)
        assert moto.proc is not None
        pid = moto.proc.pid
        rows: dict[str, list[float]] = {"local": []}
        cpu: dict[str, list[float]] = {"local": []}
        store_share: dict[float, list[float]] = {latency: [] for latency in LATENCIES_S}
        ratios: dict[float, list[float]] = {latency: [] for latency in LATENCIES_S}
        naive: list[float] = []
        for _ in range(args.repeats):
            proxy.latency_s = 0.0
            here, _, own = rate(local, work / "out.parquet", pid)
            rows["local"].append(here)
            cpu["local"].append(own * 1000 / args.count)
            for latency in LATENCIES_S:
                proxy.latency_s = latency
                there, share, own = rate(f"s3://{BUCKET}/uploads/", work / "out.parquet", pid)
                rows.setdefault(f"s3, {latency * 1000:.0f} ms", []).append(there)
                cpu.setdefault(f"s3, {latency * 1000:.0f} ms", []).append(own * 1000 / args.count)
                ratios[latency].append(there / here)
                store_share[latency].append(share)
            proxy.latency_s = 0.05
            naive.append(sequential_gets(fs, keys[:20]))
    print(f"{args.count} images ({args.corpus}), bundled model, default settings,", end=" ")
    print(f"{os.cpu_count()} cores,")
    print(f"median of {args.repeats} repeats (ratio: bucket / local in the same repeat)\n")
    print(
        "| source | images/s | vs local | the store's CPU (share of all cores)"
        " | batchscore's CPU per image |"
    )
    print("|---|---|---|---|---|")
    local_cpu = statistics.median(cpu["local"])
    print(
        f"| local files | {statistics.median(rows['local']):.1f} | 1.00 | - | {local_cpu:.1f} ms |"
    )
    for latency in LATENCIES_S:
        name = f"s3, {latency * 1000:.0f} ms"
        print(
            f"| S3 (moto), {latency * 1000:.0f} ms per request |"
            f" {statistics.median(rows[name]):.1f} | {statistics.median(ratios[latency]):.2f} |"
            f" {statistics.median(store_share[latency]):.0%} |"
            f" {statistics.median(cpu[name]):.1f} ms |"
        )
    print(
        f"| one GET after another, 50 ms, no decoding | {statistics.median(naive):.1f} |"
        f" {statistics.median(naive) / statistics.median(rows['local']):.2f} | - | - |"
    )


if __name__ == "__main__":
    main()
