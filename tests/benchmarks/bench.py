"""batchscore against the loop a user writes by hand, on the same files, in one run.

Not a test: it prints figures (and `--json` writes them) for docs/performance.md, and asserts
nothing about time. On a shared machine timings are noisy, so every figure is the median of
`--repeats` runs, and each ratio is taken between runs of the same repeat, on the same files.

What it measures, per corpus (12 MP camera-like JPEGs, 1080p JPEGs, 1080p PNGs, made here from
artifacts/samples/*.jpg, upscaled with sensor-like noise):

- naive: one process, `Image.open().convert('RGB')` at full size, resize, numpy normalise,
  an ONNX Runtime session with default threads, batches of 32;
- batchscore: `batchscore.score.score` with default settings. Its steady rate is marginal:
  (K-1)*N / (time for the corpus listed K times - time for it listed once), so the pool
  start-up, reported on its own, does not count against it; the end-to-end rate of the K-pass
  run (start-up included) is printed beside it;
- CPU seconds per image of decode+preprocess and of inference (time.process_time, one
  process, batchscore's own code at its default batch size), and the bound
  cores / (decode + inference);
- peak RSS of the whole process tree (the CLI in a subprocess plus its workers, summed, sampled
  from /proc every 20 ms) for N and 10N images (the same files listed 10 times);
- start-up: wall time of `batchscore score one.jpg -o x.parquet` in a subprocess.

On a shared machine other processes take cores that the bound assumes free. So each timed run
first waits (`--wait-idle`) for the CPUs to go quiet, and the table shows the share of all
cores that other processes still used during batchscore's runs (from /proc/stat), and the
share of the bound reached on the cores they left free.

Run from the repository root (a few minutes on 2 cores):

    python -m tests.benchmarks.bench
    python -m tests.benchmarks.bench --workdir /tmp/bench --count 40 --json bench.json
    python -m tests.benchmarks.bench --model artifacts/model_int8.onnx --corpora 1080p-jpeg

`--sweep SOURCE` instead finds the fastest --workers / --batch-size on your own images:

    python -m tests.benchmarks.bench --sweep photos/ --sweep-batch-sizes 1,4,8,16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import PIL
from PIL import Image

from batchscore.model import bundled_model_dir, create_session, load_model
from batchscore.preprocess import load_image, tensor_batch
from batchscore.score import score
from batchscore.settings import PipelineOptions, ScoreSettings, default_workers
from batchscore.sources import iter_refs, open_sources
from batchscore.spec import ModelSpec

SAMPLES = bundled_model_dir() / "samples"
NAIVE_BATCH = 32
RSS_SAMPLE_S = 0.02


@dataclass(frozen=True)
class CorpusKind:
    """How to fake one kind of input: landscape size, format and sensor noise (8-bit levels)."""

    name: str
    size: tuple[int, int]  # (width, height) for landscape sources; swapped for portrait ones
    fmt: str
    noise: float


CORPORA = {
    kind.name: kind
    for kind in (
        CorpusKind("12mp-jpeg", (4032, 3024), "JPEG", 3.0),
        CorpusKind("1080p-jpeg", (1920, 1080), "JPEG", 2.0),
        CorpusKind("1080p-png", (1920, 1080), "PNG", 2.0),
    )
}


def _fake_photo(kind: CorpusKind, sample: str, seed: int, target: str) -> None:
    """Crop/flip a real photo to the target aspect, upscale it and add luma + chroma noise."""
    rng = np.random.default_rng(seed)
    source = Image.open(sample).convert("RGB")
    if seed % 2:
        source = source.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    width, height = kind.size if source.width >= source.height else kind.size[::-1]
    aspect = width / height
    crop_w = min(source.width, round(source.height * aspect))
    crop_h = round(crop_w / aspect)
    scale = rng.uniform(0.8, 1.0)
    crop_w, crop_h = max(1, round(crop_w * scale)), max(1, round(crop_h * scale))
    left = int(rng.integers(0, source.width - crop_w + 1))
    top = int(rng.integers(0, source.height - crop_h + 1))
    region = source.crop((left, top, left + crop_w, top + crop_h))
    pixels = np.asarray(region.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    sigma = kind.noise * rng.uniform(0.8, 1.2)
    pixels += rng.standard_normal((height, width, 1), dtype=np.float32) * sigma
    pixels += rng.standard_normal((height, width, 3), dtype=np.float32) * (sigma / 2)
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
    image.save(target, kind.fmt, **({"quality": 90} if kind.fmt == "JPEG" else {}))


def make_corpus(root: Path, kind: CorpusKind, count: int) -> list[Path]:
    """`count` files under root/kind.name, reused when an earlier run made the same set."""
    folder = root / kind.name
    suffix = ".jpg" if kind.fmt == "JPEG" else ".png"
    paths = [folder / f"img_{i:03d}{suffix}" for i in range(count)]
    stamp = folder / "corpus.json"
    recipe = json.dumps({**asdict(kind), "count": count})
    if stamp.is_file() and all(p.is_file() for p in paths):
        made = json.loads(stamp.read_text())
        if made.pop("count", 0) >= count and json.dumps({**made, "count": count}) == recipe:
            return paths  # the first `count` of an earlier, larger corpus: the same files
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    samples = sorted(str(p) for p in SAMPLES.glob("*.jpg"))
    with ProcessPoolExecutor(default_workers(), mp_context=get_context("spawn")) as pool:
        jobs = [
            pool.submit(_fake_photo, kind, samples[i % len(samples)], i, str(path))
            for i, path in enumerate(paths)
        ]
        for job in jobs:
            job.result()
    stamp.write_text(recipe)
    return paths


def write_manifest(path: Path, files: Sequence[Path], times: int) -> Path:
    path.write_text("".join(f"{f}\n" for _ in range(times) for f in files))
    return path


def naive_rate(paths: Sequence[Path], spec: ModelSpec) -> float:
    """Images/s of the straightforward single-process loop (session built before timing)."""
    config = spec.preprocess
    assert isinstance(config.resize_size, int) and isinstance(config.crop_size, int)
    resize, crop = config.resize_size, config.crop_size
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    session = ort.InferenceSession(spec.path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: np.zeros((1, 3, crop, crop), np.float32)})  # warm-up
    start = time.perf_counter()
    pending: list[np.ndarray] = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        scale = resize / min(image.size)
        image = image.resize(
            (round(image.width * scale), round(image.height * scale)),
            Image.Resampling.BILINEAR,
        )
        left, top = (image.width - crop) // 2, (image.height - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
        tensor = (np.asarray(image, dtype=np.float32) / 255.0 - mean) / std
        pending.append(tensor.transpose(2, 0, 1))
        if len(pending) == NAIVE_BATCH or path is paths[-1]:
            session.run(None, {name: np.stack(pending)})
            pending = []
    return len(paths) / (time.perf_counter() - start)


@dataclass(frozen=True)
class Usage:
    """One timed call: wall seconds, CPU seconds of this process tree and of the machine."""

    wall: float
    ours: float
    machine: float

    def others_share(self, cores: int) -> float:
        """Share of the machine's cores that other processes used meanwhile (shared machine)."""
        return max(0.0, self.machine - self.ours) / (self.wall * cores)


def _machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine so far, all processes (from /proc/stat)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_seconds() -> float:
    """CPU seconds of this process plus its reaped children (the pool's workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def wait_for_idle(limit_s: float, threshold: float = 0.15) -> float:
    """On a shared machine: wait up to `limit_s` until other processes use less than
    `threshold` of all cores (sampled over 0.5 s); return the share seen last."""
    deadline = time.monotonic() + limit_s
    cores = os.cpu_count() or 1
    while True:
        busy, start = _machine_busy_seconds(), time.perf_counter()
        time.sleep(0.5)
        share = (_machine_busy_seconds() - busy) / ((time.perf_counter() - start) * cores)
        if not share >= threshold or time.monotonic() >= deadline:  # also stops on NaN
            return share


def batchscore_run(manifest: Path, output: Path, settings: ScoreSettings) -> Usage:
    """One library call (pool start-up included)."""
    cpu, busy, start = _tree_cpu_seconds(), _machine_busy_seconds(), time.perf_counter()
    summary = score([manifest], output, settings)
    wall = time.perf_counter() - start
    usage = Usage(wall, _tree_cpu_seconds() - cpu, _machine_busy_seconds() - busy)
    if summary.stats["n_errors"]:
        raise SystemExit(f"batchscore failed on {summary.stats['error_reasons']}")
    return usage


def stage_costs(paths: Sequence[Path], spec: ModelSpec) -> tuple[float, float]:
    """CPU seconds per image: (decode + preprocess into the batch buffer, inference)."""
    options = PipelineOptions(workers=0)
    session = create_session(spec, options.threads_per_worker)
    decode = infer = 0.0
    starts = [0, *range(0, len(paths), options.batch_size)]  # the first chunk twice: warm-up
    for index, start in enumerate(starts):
        chunk = paths[start : start + options.batch_size]
        t0 = time.process_time()
        images = [load_image(str(p), spec.preprocess).pixels for p in chunk]
        batch = tensor_batch(
            images, spec.preprocess, spec.input_dtype, layout=spec.layout, channels=spec.channels
        )
        t1 = time.process_time()
        session.run(None, {spec.input_name: batch})
        t2 = time.process_time()
        if index > 0:
            decode, infer = decode + t1 - t0, infer + t2 - t1
    return decode / len(paths), infer / len(paths)


class TreeRss:
    """Peak of the summed RSS of a process and all its descendants, sampled from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _tree_bytes(self) -> int:
        parents: dict[int, int] = {}
        rss: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(entry.name)
            parents[pid] = int(fields[1])  # field 4 of stat: ppid
            rss[pid] = int(fields[21]) * self._page  # field 24 of stat: rss in pages
        total = 0
        for pid, size in rss.items():
            walk = pid
            while walk not in (0, 1, self.pid):
                walk = parents.get(walk, 0)
            if walk == self.pid:
                total += size
        return total

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self.peak = max(self.peak, self._tree_bytes())


def cli_command() -> list[str]:
    """The installed console script next to this Python (no pyenv shim), else `-m`."""
    script = Path(sys.executable).with_name("batchscore")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "batchscore"]


def cli_run(args: Sequence[str], *, rss: bool = False) -> tuple[float, int]:
    """Wall seconds and peak tree RSS (bytes; 0 unless asked) of one `batchscore` call."""
    start = time.perf_counter()
    process = subprocess.Popen([*cli_command(), *args])
    if rss:
        with TreeRss(process.pid) as sampler:
            code = process.wait()
        peak = sampler.peak
    else:
        code, peak = process.wait(), 0
    elapsed = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"batchscore {' '.join(args)} exited {code}")
    return elapsed, peak


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def steady_rate(
    paths: Sequence[Path], work: Path, settings: ScoreSettings, passes: int
) -> tuple[float, Usage]:
    """Images/s with start-up excluded: (K-1)*N / (time of K passes - time of one pass)."""
    once = write_manifest(work / "steady-x1.txt", paths, 1)
    many = write_manifest(work / f"steady-x{passes}.txt", paths, passes)
    small = batchscore_run(once, work / "steady.parquet", settings)
    big = batchscore_run(many, work / "steady.parquet", settings)
    span = big.wall - small.wall
    return ((passes - 1) * len(paths) / span if span > 0 else math.nan), big


def bench_corpus(
    paths: list[Path],
    spec: ModelSpec,
    work: Path,
    repeats: int,
    passes: int,
    idle_s: float,
) -> dict[str, Any]:
    name = paths[0].parent.name
    settings = ScoreSettings(model=spec.path)  # default settings, this model
    n = len(paths)
    cores = default_workers()
    naive, steady, end_to_end, ratios, others, cpu_use = [], [], [], [], [], []
    steady_rate(paths[:1], work, settings, 2)  # warm the model file and the code
    for _ in range(repeats):
        wait_for_idle(idle_s)
        naive.append(naive_rate(paths, spec))
        wait_for_idle(idle_s)
        rate, big = steady_rate(paths, work, settings, passes)
        steady.append(rate)
        end_to_end.append(passes * n / big.wall)
        ratios.append(rate / naive[-1])
        others.append(big.others_share(cores))
        cpu_use.append(big.ours / (big.wall * cores))
    costs = [stage_costs(paths, spec) for _ in range(repeats)]
    decode = median([c[0] for c in costs])
    infer = median([c[1] for c in costs])
    bound = cores / (decode + infer)
    return {
        "corpus": name,
        "n": n,
        "mb_per_image": sum(p.stat().st_size for p in paths) / n / 1e6,
        "naive_img_s": median(naive),
        "batchscore_img_s": median(steady),
        "batchscore_end_to_end_img_s": median(end_to_end),
        "x_naive": median(ratios),
        "decode_ms": decode * 1e3,
        "infer_ms": infer * 1e3,
        "bound_img_s": bound,
        "of_bound": median(steady) / bound,
        "batchscore_cpu_use": median(cpu_use),
        "others_cpu_share": median(others),
        "of_available": median(
            [rate / (bound * (1 - share)) for rate, share in zip(steady, others, strict=True)]
        ),
        "runs": {"naive": naive, "batchscore": steady, "x_naive": ratios},
    }


def bench_memory(paths: list[Path], work: Path, model: list[str]) -> dict[str, Any]:
    peaks = {}
    for times in (1, 10):
        manifest = write_manifest(work / f"rss-x{times}.txt", paths, times)
        _, peaks[times] = cli_run(
            ["score", str(manifest), "-o", str(work / "rss.parquet"), "-q", *model], rss=True
        )
    return {
        "corpus": paths[0].parent.name,
        "n": len(paths),
        "peak_rss_mb_n": peaks[1] / 2**20,
        "peak_rss_mb_10n": peaks[10] / 2**20,
        "ratio": peaks[10] / peaks[1],
    }


def bench_startup(image: Path, work: Path, repeats: int, model: list[str]) -> dict[str, Any]:
    args = ["score", str(image), "-o", str(work / "one.parquet"), "-q", *model]
    cli_run(args)  # warm the page cache
    times = [cli_run(args)[0] for _ in range(repeats)]
    return {"command": " ".join([*cli_command(), *args]), "median_s": median(times), "runs": times}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(
        f"\nmachine: {m['cpu']}, {m['cores']} cores, load average {m['load_before']}"
        f" -> {m['load_after']}; Python {m['python']}, onnxruntime {m['onnxruntime']},"
        f" Pillow {m['pillow']}"
    )
    print(f"model: {report['model']}; batchscore defaults: {report['defaults']}")
    print(f"medians of {report['repeats']} repeats\n")
    print(
        f"{'corpus':<11} {'n':>3} {'MB/img':>6} {'naive':>7} {'batchscore':>10} {'(e2e)':>7}"
        f" {'x naive':>7} {'decode':>7} {'infer':>6} {'bound':>7} {'of bound':>8}"
        f" {'bs CPU':>6} {'others':>6} {'of avail':>8}"
    )
    print(
        f"{'':<11} {'':>3} {'':>6} {'img/s':>7} {'img/s':>10} {'img/s':>7} {'':>7}"
        f" {'ms/img':>7} {'ms/img':>6} {'img/s':>7} {'':>8} {'use':>6} {'CPU':>6} {'bound':>8}"
    )
    for r in report["corpora"]:
        print(
            f"{r['corpus']:<11} {r['n']:>3} {r['mb_per_image']:>6.2f} {r['naive_img_s']:>7.1f}"
            f" {r['batchscore_img_s']:>10.1f} {r['batchscore_end_to_end_img_s']:>7.1f}"
            f" {r['x_naive']:>6.2f}x {r['decode_ms']:>7.1f} {r['infer_ms']:>6.1f}"
            f" {r['bound_img_s']:>7.1f} {r['of_bound']:>8.0%}"
            f" {r['batchscore_cpu_use']:>6.0%} {r['others_cpu_share']:>6.0%}"
            f" {r['of_available']:>8.0%}"
        )
    print(
        "batchscore: steady rate (start-up excluded, see --passes); e2e: start-up included."
        "\nbs CPU use / others CPU: share of all cores used by batchscore's process tree /"
        " by other processes during its runs;\nof avail bound: batchscore / (bound x (1 -"
        " others CPU)), the bound on the cores the others left free"
    )
    if "memory" in report:
        mem = report["memory"]
        print(
            f"\npeak RSS, process tree ({mem['corpus']}): N={mem['n']}:"
            f" {mem['peak_rss_mb_n']:.0f} MB, 10N={10 * mem['n']}: {mem['peak_rss_mb_10n']:.0f} MB"
            f" ({mem['ratio']:.2f}x)"
        )
    if "startup" in report:
        up = report["startup"]
        runs = ", ".join(f"{t:.2f}" for t in up["runs"])
        print(f"start-up: {up['median_s']:.2f} s median ({runs}) for: {up['command']}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, help="keep the corpus here (default: temp dir)")
    parser.add_argument("--count", type=int, default=32, help="images per corpus")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--passes", type=int, default=5, help="K of the steady-rate run")
    parser.add_argument("--corpora", default=",".join(CORPORA), help="comma-separated")
    parser.add_argument("--model", default=None, help="model dir or .onnx (default: bundled)")
    parser.add_argument("--no-memory", action="store_true", help="skip the RSS runs")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up runs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=30.0,
        help="before each timed run, wait up to this many seconds for other processes to"
        " leave the CPUs (shared machines); 0: do not wait",
    )
    parser.add_argument(
        "--sweep",
        type=Path,
        metavar="SOURCE",
        help="instead: steady images/s of your own images (a folder or manifest) for each"
        " --sweep-workers x --sweep-batch-sizes",
    )
    parser.add_argument("--sweep-workers", default=None, help="e.g. 1,2,3 (default: 1..cores)")
    parser.add_argument("--sweep-batch-sizes", default="1,4,8,16,32", help="comma-separated")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="batchscore-bench-") as temp:
        work = args.workdir or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        spec = load_model(args.model)
        model_args = ["--model", args.model] if args.model else []
        if args.sweep:
            return sweep(args, work)
        kinds = [CORPORA[name.strip()] for name in args.corpora.split(",") if name.strip()]
        corpora = {kind.name: make_corpus(work / "corpus", kind, args.count) for kind in kinds}
        load_before = os.getloadavg()[0]
        report: dict[str, Any] = {
            "model": spec.file_name,
            "defaults": _defaults(),
            "repeats": args.repeats,
            "corpora": [],
        }
        for paths in corpora.values():
            row = bench_corpus(paths, spec, work, args.repeats, args.passes, args.wait_idle)
            report["corpora"].append(row)
            _progress(report["corpora"][-1])
        first = next(iter(corpora.values()))
        if not args.no_memory:
            wait_for_idle(args.wait_idle)
            report["memory"] = bench_memory(first, work, model_args)
        if not args.no_startup:
            wait_for_idle(args.wait_idle)
            report["startup"] = bench_startup(first[0], work, max(5, args.repeats), model_args)
        report["machine"] = {
            "cpu": cpu_model(),
            "cores": default_workers(),
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "pillow": PIL.__version__,
        }
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def sweep(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Steady rate per (workers, batch size) on the user's own images, best first."""
    refs = iter_refs(open_sources([args.sweep]))
    paths = [Path(r.path) for r in refs if r.path and not r.problem][: args.count]
    cores = default_workers()
    workers = _ints(args.sweep_workers) if args.sweep_workers else list(range(1, cores + 1))
    rows = []
    for w in workers:
        for b in _ints(args.sweep_batch_sizes):
            options = PipelineOptions(workers=w, batch_size=b)
            settings = ScoreSettings(model=args.model, pipeline=options)
            rates = []
            for _ in range(args.repeats):
                wait_for_idle(args.wait_idle)
                rates.append(steady_rate(paths, work, settings, args.passes)[0])
            rows.append({"workers": w, "batch_size": b, "img_s": median(rates)})
            print(f"--workers {w} --batch-size {b}: {rows[-1]['img_s']:.1f} images/s", flush=True)
    rows.sort(key=lambda row: -row["img_s"])
    best = rows[0]
    print(
        f"best on {len(paths)} images from {args.sweep}: --workers {best['workers']}"
        f" --batch-size {best['batch_size']} ({best['img_s']:.1f} images/s, medians of"
        f" {args.repeats})"
    )
    return {"sweep": rows}


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _defaults() -> str:
    options = PipelineOptions()
    return (
        f"workers={options.workers} batch_size={options.batch_size}"
        f" threads_per_worker={options.threads_per_worker} fast_jpeg={options.fast_jpeg}"
    )


def _progress(row: dict[str, Any]) -> None:
    print(
        f"{row['corpus']}: naive {row['naive_img_s']:.1f} img/s, batchscore"
        f" {row['batchscore_img_s']:.1f} img/s ({row['x_naive']:.2f}x),"
        f" {row['of_bound']:.0%} of bound",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    main()
