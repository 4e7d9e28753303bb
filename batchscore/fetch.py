"""Image bytes read from object stores ahead of use, so that request latency costs no CPU time."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from batchscore.errors import StoreUnavailable
from batchscore.names import is_url
from batchscore.sources import ImageRef
from batchscore.storage import (
    StorageOptions,
    StoreHealth,
    authority,
    is_image_fault,
    read_object,
    reason,
)

PREFETCH_WINDOW = 32  # objects being fetched at once, per process that fetches


def prefetched(
    refs: Iterable[ImageRef], options: StorageOptions, window: int = PREFETCH_WINDOW
) -> Iterator[ImageRef]:
    """`refs` in order, each object URL's bytes read ahead into `ref.data`, `window` at once.

    An object store answers each GET in tens of milliseconds; one GET after another would
    leave the CPUs idle. Fetching the next `window` objects concurrently while earlier ones
    are decoded hides that latency, and the window bounds the memory it takes. A missing or
    forbidden object becomes the ref's problem (an error row); a store that keeps failing
    raises StoreUnavailable. Local files pass through untouched: workers read those.

    An object whose store still fails after every retry (throttling, 5xx, timeouts, resets)
    is an error row, so one dead web server named in a manifest never blocks a nightly run.
    But when a store that did answer earlier in the run fails for `STORE_DOWN_AFTER` objects
    in a row, it went down mid-run: the run stops, keeping what it committed, and a rerun
    resumes, instead of turning the rest of the night into error rows."""
    health = StoreHealth()
    pending: deque[tuple[ImageRef, Future[bytes] | None]] = deque()
    pool = ThreadPoolExecutor(max_workers=window, thread_name_prefix="prefetch")
    try:
        for ref in refs:
            future = None
            if ref.problem is None and ref.path is not None and is_url(ref.path):
                future = pool.submit(read_object, ref.path, options)
            pending.append((ref, future))
            if len(pending) >= window:
                yield _fetched(*pending.popleft(), health)
        while pending:
            yield _fetched(*pending.popleft(), health)
    finally:
        # A stopped run must not wait for reads still retrying: their results are not needed.
        pool.shutdown(wait=False, cancel_futures=True)


def _fetched(ref: ImageRef, future: Future[bytes] | None, health: StoreHealth) -> ImageRef:
    if future is None:
        return ref
    store = authority(str(ref.path))
    try:
        data = future.result()
    except StoreUnavailable as exc:
        return replace(ref, problem=health.left_unanswered(store, exc), unavailable=True)
    except Exception as exc:  # 404, 403...: the store answered, about this object
        health.answer(store)
        return replace(ref, problem=reason(exc), unavailable=not is_image_fault(exc))
    health.answer(store)
    return replace(ref, data=data)
